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

UNET_COMMON = {"use_checkpoint": False, "image_size": 32, "use_spatial_transformer": True, "legacy": False,
               "in_channels": 4, "out_channels": 4, "use_temporal_attention": False,
               "use_temporal_resblock": False}


def init_weights(module: torch.nn.Module, seed: int = 0, std: float = 0.02, qk_std: float = 0.02) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.endswith("bias"):
                p.zero_()
            elif p.ndim == 1:
                p.fill_(1.0)
            else:
                s = qk_std if name.endswith(("to_q.weight", "to_k.weight")) else std
                p.copy_(torch.randn(p.shape, generator=g) * s)


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

    def latent(self, h: int, w: int, batch: int = 1):
        return torch.zeros(batch, self.latent_channels, h, w)


def tiny_sd15(channels: int = 32, context_dim: int = 64, qk_std: float = 0.02, seed: int = 0, depth: int = 1) -> Tiny:
    cfg = dict(UNET_COMMON, adm_in_channels=None, model_channels=channels, num_res_blocks=[1, 1],
               channel_mult=[1, 2], transformer_depth=[depth, depth], transformer_depth_output=[depth] * 4,
               transformer_depth_middle=depth, use_linear_in_transformer=False, context_dim=context_dim)
    mc = comfy.supported_models.SD15(cfg)
    mc.set_inference_dtype(torch.float32, None)
    model = mc.get_model({})
    init_weights(model.diffusion_model, seed=seed, qk_std=qk_std)
    return Tiny("sd15", patcher(model), context_dim, 4)


def tiny_sdxl(channels: int = 32, context_dim: int = 64, qk_std: float = 0.02, seed: int = 0) -> Tiny:
    cfg = dict(UNET_COMMON, num_classes="sequential", adm_in_channels=2816, model_channels=channels,
               num_res_blocks=[1, 1, 1], channel_mult=[1, 2, 4], transformer_depth=[0, 1, 1],
               transformer_depth_output=[0, 0, 1, 1, 1, 1], transformer_depth_middle=1,
               use_linear_in_transformer=True, context_dim=context_dim)
    mc = comfy.supported_models.SDXL(cfg)
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


def sample(model, tiny: Tiny, h: int = 16, w: int = 16, steps: int = 4, cfg: float = 5.0, sampler: str = "euler",
           scheduler: str = "normal", denoise: float = 1.0, seed: int = 0, batch: int = 1, latent=None,
           start_step=None, last_step=None, positive=None, negative=None):
    """comfy.sample.sample on a tiny model (what KSampler runs), under inference_mode."""
    latent = tiny.latent(h, w, batch) if latent is None else latent
    latent = comfy.sample.fix_empty_latent_channels(model, latent)
    noise = comfy.sample.prepare_noise(latent, seed)
    pos = tiny.cond(1) if positive is None else positive
    neg = tiny.cond(2) if negative is None else negative
    with torch.inference_mode():
        return comfy.sample.sample(model, noise, steps, cfg, sampler, scheduler, pos, neg, latent, denoise=denoise,
                                   start_step=start_step, last_step=last_step, seed=seed, disable_pbar=True)
