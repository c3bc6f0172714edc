"""Tiny real ComfyUI models for host tests: real comfy.model_base models from comfy.supported_models
configs (shrunk), real ModelPatcher, sampled through comfy.sample on CPU in a fraction of a second.

``comfy.ops.disable_weight_init`` leaves weights uninitialised, so every builder initialises them.
With the usual small init softmax(QKᵀ) is nearly uniform and any attention approximation looks
free; ``qk_std`` raises the query/key projection init so maps are peaked (see ``map_entropy``).
"""
from __future__ import annotations

import math

import torch

import comfy.model_management as mm
import comfy.model_patcher
import comfy.sample
import comfy.supported_models

from bench.models import init_weights, tiny_unet_config  # noqa: F401  (the one init and the one tiny UNet)


def patcher(model):
    return comfy.model_patcher.ModelPatcher(model, load_device=mm.get_torch_device(),
                                            offload_device=mm.unet_offload_device())


class Tiny:
    """A tiny model plus how to condition and size it."""

    def __init__(self, arch, model, context_dim, latent_channels, pooled=0, extra=None):
        self.arch = arch
        self.model = model
        self.context_dim = context_dim
        self.latent_channels = latent_channels
        self.pooled = pooled
        self.extra = extra or {}

    def cond(self, seed: int, batch: int = 1, tokens: int = 77):
        g = torch.Generator().manual_seed(seed)
        d = dict(self.extra)
        if self.pooled:
            d["pooled_output"] = torch.randn(batch, self.pooled, generator=g)
        return [[torch.randn(batch, tokens, self.context_dim, generator=g), d]]

    def latent(self, h: int, w: int, batch: int = 1, frames: int | None = None):
        """An empty latent; 5-D ``[B, C, frames, H, W]`` for video models (Wan: ``frames`` or the model's
        default frame count)."""
        frames = frames if frames is not None else self.extra_frames
        if frames:
            return torch.zeros(batch, self.latent_channels, frames, h, w)
        return torch.zeros(batch, self.latent_channels, h, w)

    @property
    def extra_frames(self) -> int:
        return int(getattr(self, "frames", 0) or 0)


def tiny_sd15(channels: int = 32, context_dim: int = 64, qk_std: float = 0.02, seed: int = 0, depth: int = 1) -> Tiny:
    mc = comfy.supported_models.SD15(tiny_unet_config("sd15", channels, context_dim, depth))
    mc.set_inference_dtype(torch.float32, None)
    model = mc.get_model({})
    init_weights(model.diffusion_model, seed=seed, qk_std=qk_std)
    return Tiny("sd15", patcher(model), context_dim, 4)


def tiny_sdxl(channels: int = 32, context_dim: int = 64, qk_std: float = 0.02, seed: int = 0) -> Tiny:
    mc = comfy.supported_models.SDXL(tiny_unet_config("sdxl", channels, context_dim))
    mc.unet_config["num_head_channels"] = 16
    mc.set_inference_dtype(torch.float32, None)
    model = mc.get_model({})
    init_weights(model.diffusion_model, seed=seed, qk_std=qk_std)
    return Tiny("sdxl", patcher(model), context_dim, 4, pooled=1280, extra={"width": 128, "height": 128})


def tiny_flux(seed: int = 0) -> Tiny:
    cfg = {"image_model": "flux", "guidance_embed": True, "in_channels": 16, "out_channels": 16, "patch_size": 2,
           "vec_in_dim": 32, "context_in_dim": 64, "hidden_size": 64, "mlp_ratio": 2.0, "num_heads": 4,
           "depth": 1, "depth_single_blocks": 1, "axes_dim": [4, 6, 6], "theta": 10000, "qkv_bias": True}
    mc = comfy.supported_models.Flux(cfg)
    mc.set_inference_dtype(torch.float32, None)
    model = mc.get_model({})
    init_weights(model.diffusion_model, seed=seed)
    return Tiny("flux", patcher(model), 64, 16, pooled=32, extra={"guidance": 3.5})


def tiny_sd3(seed: int = 0) -> Tiny:
    cfg = {"in_channels": 16, "out_channels": 16, "patch_size": 2, "depth": 2, "input_size": None,
           "adm_in_channels": 32,
           "context_embedder_config": {"target": "torch.nn.Linear", "params": {"in_features": 64, "out_features": 128}},
           "num_patches": 256, "pos_embed_max_size": 16, "qk_norm": "rms", "pos_embed_scaling_factor": None,
           "x_block_self_attn_layers": []}
    mc = comfy.supported_models.SD3(cfg)
    mc.set_inference_dtype(torch.float32, None)
    model = mc.get_model({})
    init_weights(model.diffusion_model, seed=seed)
    from comfy.ldm.modules.diffusionmodules.mmdit import get_2d_sincos_pos_embed
    dm = model.diffusion_model
    table = get_2d_sincos_pos_embed(dm.pos_embed.shape[-1], math.isqrt(dm.pos_embed.shape[1]))
    with torch.no_grad():
        dm.pos_embed.copy_(torch.from_numpy(table).float().reshape(dm.pos_embed.shape))
    return Tiny("sd3", patcher(model), 64, 16, pooled=32)


def tiny_pixart(seed: int = 0) -> Tiny:
    cfg = {"image_model": "pixart_alpha", "input_size": 16, "patch_size": 2, "in_channels": 4, "hidden_size": 64,
           "depth": 2, "num_heads": 4, "caption_channels": 32, "model_max_length": 16, "micro_condition": False,
           "pred_sigma": True}
    mc = comfy.supported_models.PixArtAlpha(cfg)
    mc.set_inference_dtype(torch.float32, None)
    model = mc.get_model({})
    init_weights(model.diffusion_model, seed=seed, qk_std=0.3)
    return Tiny("pixart", patcher(model), 32, 4)


# DiT attention: q/k are RMS-normalised per head in Flux, SD3 (rms), Wan and Qwen-Image, so a raised q/k
# projection init has no effect there; the norm gains set the logit scale instead (gain g: logits ~ g² N(0, 1))
QK_NORMS = ("query_norm.scale", "key_norm.scale", "norm_q.weight", "norm_k.weight", "norm_added_q.weight",
            "norm_added_k.weight", "ln_q.weight", "ln_k.weight")


def peak_dit_attention(dm: torch.nn.Module, gain: float = 1.6, qk_scale: float = 6.0) -> None:
    """Peaked attention on a randomly initialised DiT: q/k norm gains set to ``gain``; where there is no q/k
    norm (PixArt-alpha), the q and k rows of the projections are scaled by ``qk_scale``."""
    normed = any(n.endswith(QK_NORMS) for n, _ in dm.named_parameters())
    with torch.no_grad():
        for name, p in dm.named_parameters():
            if name.endswith(QK_NORMS):
                p.fill_(gain)
            elif name.endswith("attn.qkv.weight") and not normed:
                d = p.shape[0] // 3
                p[: 2 * d] *= qk_scale
            elif name.endswith(("cross_attn.q_linear.weight",)):
                p *= qk_scale
            elif name.endswith("cross_attn.kv_linear.weight"):
                p[: p.shape[0] // 2] *= qk_scale


def _dit(mc, seed: int, peaked: bool):
    mc.set_inference_dtype(torch.float32, None)
    model = mc.get_model({})
    init_weights(model.diffusion_model, seed=seed)
    if peaked:
        peak_dit_attention(model.diffusion_model)
    return model


def tiny_wan(seed: int = 0, frames: int = 3, peaked: bool = True, layers: int = 4, wan22: bool = False) -> Tiny:
    """Wan 2.1 T2V: 5-D latents ``[B, 16, frames, H, W]``, self-attention (3-D RoPE) + separate cross-attention
    per block, ``("double_block", i)`` replaces.  ``wan22``: Wan 2.2 TI2V 5B-shaped (``comfy.model_base.WAN22``),
    48-channel latents of the 16x Wan 2.2 VAE, so one token (patch 2x2) covers 32x32 pixels."""
    ch = 48 if wan22 else 16
    cfg = {"image_model": "wan2.1", "model_type": "t2v", "dim": 64, "out_dim": ch, "num_heads": 4, "ffn_dim": 128,
           "num_layers": layers, "patch_size": (1, 2, 2), "freq_dim": 256, "window_size": (-1, -1), "qk_norm": True,
           "cross_attn_norm": True, "eps": 1e-6, "in_dim": ch, "text_dim": 64}
    mc = comfy.supported_models.WAN22_T2V(cfg) if wan22 else comfy.supported_models.WAN21_T2V(cfg)
    model = _dit(mc, seed, peaked)
    t = Tiny("wan", patcher(model), 64, ch)
    t.frames = frames
    return t


def tiny_wan22(seed: int = 0, frames: int = 1, layers: int = 2) -> Tiny:
    return tiny_wan(seed, frames, True, layers, wan22=True)


def tiny_qwen(seed: int = 0, peaked: bool = True, layers: int = 3) -> Tiny:
    """Qwen-Image: joint attention (txt first) with RoPE, 5-D latents with one frame."""
    cfg = {"image_model": "qwen_image", "in_channels": 64, "out_channels": 16, "num_layers": layers,
           "attention_head_dim": 16, "num_attention_heads": 4, "joint_attention_dim": 64,
           "axes_dims_rope": (4, 6, 6)}
    model = _dit(comfy.supported_models.QwenImage(cfg), seed, peaked)
    return Tiny("qwen", patcher(model), 64, 16)


def tiny_chroma(seed: int = 0, peaked: bool = True) -> Tiny:
    """Chroma (Flux architecture without CLIP pooled input, modulations from an approximator)."""
    cfg = {"image_model": "chroma", "in_channels": 64, "out_channels": 64, "patch_size": 2, "context_in_dim": 64,
           "hidden_size": 64, "mlp_ratio": 2.0, "num_heads": 4, "depth": 2, "depth_single_blocks": 2,
           "axes_dim": [4, 6, 6], "theta": 10000, "qkv_bias": True, "in_dim": 64, "out_dim": 64, "hidden_dim": 64,
           "n_layers": 1}
    model = _dit(comfy.supported_models.Chroma(cfg), seed, peaked)
    return Tiny("chroma", patcher(model), 64, 16, pooled=32, extra={"guidance": 0.0})


def tiny_flux_deep(seed: int = 0, peaked: bool = True, double: int = 2, single: int = 3) -> Tiny:
    """Flux with a few double and single blocks and peaked attention (the DiT-wave tests)."""
    cfg = {"image_model": "flux", "guidance_embed": True, "in_channels": 16, "out_channels": 16, "patch_size": 2,
           "vec_in_dim": 32, "context_in_dim": 64, "hidden_size": 64, "mlp_ratio": 2.0, "num_heads": 4,
           "depth": double, "depth_single_blocks": single, "axes_dim": [4, 6, 6], "theta": 10000, "qkv_bias": True}
    model = _dit(comfy.supported_models.Flux(cfg), seed, peaked)
    return Tiny("flux", patcher(model), 64, 16, pooled=32, extra={"guidance": 3.5})


def tiny_sd3_deep(seed: int = 0, peaked: bool = True, depth: int = 3, dual: tuple = ()) -> Tiny:
    """SD3 with ``depth`` joint blocks (the last is pre-only on the text side), ``dual``: SD3.5-style
    x-block self-attention layers."""
    cfg = {"in_channels": 16, "out_channels": 16, "patch_size": 2, "depth": depth, "input_size": None,
           "adm_in_channels": 32,
           "context_embedder_config": {"target": "torch.nn.Linear", "params": {"in_features": 64, "out_features": 64 * depth}},
           "num_patches": 1024, "pos_embed_max_size": 32, "qk_norm": "rms", "pos_embed_scaling_factor": None,
           "x_block_self_attn_layers": list(dual)}
    model = _dit(comfy.supported_models.SD3(cfg), seed, peaked)
    from comfy.ldm.modules.diffusionmodules.mmdit import get_2d_sincos_pos_embed
    dm = model.diffusion_model
    table = get_2d_sincos_pos_embed(dm.pos_embed.shape[-1], math.isqrt(dm.pos_embed.shape[1]))
    with torch.no_grad():
        dm.pos_embed.copy_(torch.from_numpy(table).float().reshape(dm.pos_embed.shape))
    return Tiny("sd3", patcher(model), 64, 16, pooled=32)


def tiny_pixart_peaked(seed: int = 0, depth: int = 4) -> Tiny:
    """PixArt-alpha with ``depth`` blocks and peaked self-/cross-attention (latents need (H+W)/2 > 32)."""
    cfg = {"image_model": "pixart_alpha", "input_size": 16, "patch_size": 2, "in_channels": 4, "hidden_size": 64,
           "depth": depth, "num_heads": 4, "caption_channels": 32, "model_max_length": 16, "micro_condition": False,
           "pred_sigma": True}
    model = _dit(comfy.supported_models.PixArtAlpha(cfg), seed, True)
    return Tiny("pixart", patcher(model), 32, 4)


def tiny_flux_controlnet(seed: int = 3, double: int = 1, single: int = 2, cover_all: bool = False):
    """A tiny in-process Flux ControlNet (InstantX-style latent input, no VAE needed) for ``tiny_flux_deep``: its
    residuals go to the first ``double`` double blocks and the first ``single`` single blocks, or (``cover_all``,
    what ComfyUI does with a real Flux ControlNet) repeated over all of Flux-dev's 19 + 38 blocks."""
    import comfy.controlnet
    import comfy.ops
    from comfy.ldm.flux.controlnet import ControlNetFlux
    cfg = {"in_channels": 16, "out_channels": 16, "patch_size": 2, "vec_in_dim": 32, "context_in_dim": 64,
           "hidden_size": 64, "mlp_ratio": 2.0, "num_heads": 4, "depth": double, "depth_single_blocks": single,
           "axes_dim": [4, 6, 6], "theta": 10000, "qkv_bias": True, "guidance_embed": True}
    cm = ControlNetFlux(latent_input=True, control_latent_channels=16, operations=comfy.ops.disable_weight_init,
                        dtype=torch.float32, device=torch.device("cpu"), **cfg)
    init_weights(cm, seed=seed, std=0.05)
    if not cover_all:
        cm.main_model_double, cm.main_model_single = double, single
    return comfy.controlnet.ControlNet(cm, compression_ratio=1, latent_format=None, load_device=torch.device("cpu"),
                                       manual_cast_dtype=None, extra_conds=["y", "guidance"])


def with_control(cond: list, controlnet, hint: torch.Tensor, strength: float = 1.0) -> list:
    """A conditioning with a ControlNet applied (what ControlNetApplyAdvanced does), to both branches."""
    return [[c, {**d, "control": controlnet.copy().set_cond_hint(hint, strength, (0.0, 1.0)),
                 "control_apply_to_uncond": True}] for c, d in cond]


def tiny_lumina2(seed: int = 0) -> Tiny:
    """Lumina 2 (NextDiT): a DiT family FreeSpeed does not know (the refusal tests)."""
    cfg = {"image_model": "lumina2", "patch_size": 2, "in_channels": 16, "dim": 64, "cap_feat_dim": 32, "n_layers": 2,
           "n_heads": 4, "n_kv_heads": 4, "qk_norm": True, "axes_dims": [4, 6, 6], "axes_lens": [300, 512, 512],
           "n_refiner_layers": 1}
    model = _dit(comfy.supported_models.Lumina2(cfg), seed, False)
    return Tiny("lumina2", patcher(model), 32, 16)


def sample(model, tiny: Tiny, h: int = 16, w: int = 16, steps: int = 4, cfg: float = 5.0, sampler: str = "euler",
           scheduler: str = "normal", denoise: float = 1.0, seed: int = 0, batch: int = 1, latent=None,
           start_step=None, last_step=None, positive=None, negative=None, frames=None):
    """comfy.sample.sample on a tiny model (what KSampler runs), under inference_mode."""
    latent = tiny.latent(h, w, batch, frames) if latent is None else latent
    latent = comfy.sample.fix_empty_latent_channels(model, latent)
    noise = comfy.sample.prepare_noise(latent, seed)
    pos = tiny.cond(1) if positive is None else positive
    neg = tiny.cond(2) if negative is None else negative
    with torch.inference_mode():
        return comfy.sample.sample(model, noise, steps, cfg, sampler, scheduler, pos, neg, latent, denoise=denoise,
                                   start_step=start_step, last_step=last_step, seed=seed, disable_pbar=True)


def technique_of(model, key: str):
    """The technique with wrapper ``key`` installed on a patched MODEL (fails the test when absent)."""
    from comfyui_freespeed.nodes.hooks import find
    t = find(model, key)
    assert t is not None, f"{key} is not installed"
    return t
