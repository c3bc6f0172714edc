"""Tiny builders of the ComfyUI model classes of the DiT families beyond the base ones of ``tiny.py`` (issue 21):
Wan VACE / Camera / Animate / 2.2 5B / S2V / HuMo and Chroma Radiance, each a real ``comfy.model_base`` class from
its ``comfy.supported_models`` config, shrunk."""
from __future__ import annotations

import torch

import comfy.supported_models as sm

from tiny import Tiny, _dit, patcher, tiny_chroma

WAN = {"image_model": "wan2.1", "model_type": "t2v", "dim": 64, "out_dim": 16, "num_heads": 4, "ffn_dim": 128,
       "num_layers": 8, "patch_size": (1, 2, 2), "freq_dim": 256, "window_size": (-1, -1), "qk_norm": True,
       "cross_attn_norm": True, "eps": 1e-6, "in_dim": 16, "text_dim": 64}


def _wan(config_cls, frames: int = 3, **cfg) -> Tiny:
    model = _dit(config_cls(dict(WAN, **cfg)), 0, True)
    t = Tiny("wan", patcher(model), 64, int(getattr(config_cls, "latent_format")().latent_channels))
    t.frames = frames
    return t


def tiny_wan_vace(layers: int = 8, vace_layers: int = 4) -> Tiny:
    """Wan 2.1 VACE: ``vace_layers`` hint blocks whose full-length hints are added after blocks 0, n/v, 2n/v..."""
    return _wan(sm.WAN21_Vace, num_layers=layers, model_type="vace", vace_layers=vace_layers, vace_in_dim=96)


def tiny_wan_camera() -> Tiny:
    return _wan(sm.WAN21_Camera, model_type="camera", in_dim=32)


def tiny_wan_animate() -> Tiny:
    """Wan 2.2 Animate (i2v input channels; face adapter after every 5th block when face pixels are given)."""
    return _wan(sm.WAN22_Animate, model_type="animate", in_dim=36)


def tiny_wan22_5b() -> Tiny:
    """Wan 2.2 TI2V 5B layout: 48 latent channels, per-token timesteps (``comfy.model_base.WAN22``)."""
    return _wan(sm.WAN22_T2V, in_dim=48, out_dim=48, frames=2)


def tiny_wan_s2v() -> Tiny:
    return _wan(sm.WAN22_S2V, model_type="s2v")


def tiny_wan_humo() -> Tiny:
    return _wan(sm.WAN21_HuMo, model_type="humo")


def tiny_chroma_radiance() -> Tiny:
    cfg = {"image_model": "chroma_radiance", "in_channels": 3, "out_channels": 3, "patch_size": 16,
           "context_in_dim": 64, "hidden_size": 64, "mlp_ratio": 2.0, "num_heads": 4, "depth": 1,
           "depth_single_blocks": 1, "axes_dim": [4, 6, 6], "theta": 10000, "qkv_bias": True, "in_dim": 64,
           "out_dim": 64, "hidden_dim": 64, "n_layers": 1, "nerf_hidden_size": 16, "nerf_mlp_ratio": 2,
           "nerf_depth": 1, "nerf_max_freqs": 4, "nerf_tile_size": 0, "nerf_final_head_type": "linear",
           "nerf_embedder_dtype": torch.float32}
    model = _dit(sm.ChromaRadiance(cfg), 0, False)
    return Tiny("chroma", patcher(model), 64, 3, pooled=32, extra={"guidance": 0.0})


__all__ = ["tiny_wan_vace", "tiny_wan_camera", "tiny_wan_animate", "tiny_wan22_5b", "tiny_wan_s2v", "tiny_wan_humo",
           "tiny_chroma_radiance", "tiny_chroma"]
