"""Models the bench runs: full-size SD1.5 / SDXL UNets with random weights, and tiny ones for tests.

Full-size models are real ``comfy.model_base`` models built from the real ``unet_config`` of the
architecture (the one ComfyUI's own checkpoint detection produces for an SD1.5 / SDXL checkpoint;
:func:`build` checks that ``comfy.model_detection`` maps it back to ``comfy.supported_models.SD15``
/ ``SDXL``), wrapped in a real ``ModelPatcher``.  Weights are random (N(0, 0.02), norms 1, biases 0):
right for *speed*, meaningless for image quality.  ``comfy.ops.disable_weight_init`` leaves the
parameters uninitialised, so every builder initialises them itself.

The ``tiny-*`` models are shrunken versions of the same architectures (a fraction of a second per
evaluation on CPU) for the bench's own tests; they are not offered in ``--help``.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Any, Optional

import torch

# The unet_config ComfyUI builds for an SD1.5 / SDXL checkpoint (what comfy.model_detection derives
# from the state dict's key names and shapes).  "dtype" is filled by set_inference_dtype.
SD15_UNET = {
    "use_checkpoint": False, "image_size": 32, "in_channels": 4, "out_channels": 4,
    "use_spatial_transformer": True, "legacy": False, "adm_in_channels": None,
    "model_channels": 320, "num_res_blocks": [2, 2, 2, 2], "channel_mult": [1, 2, 4, 4],
    "transformer_depth": [1, 1, 1, 1, 1, 1, 0, 0], "transformer_depth_middle": 1,
    "transformer_depth_output": [1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0],
    "use_linear_in_transformer": False, "context_dim": 768, "num_heads": 8, "num_head_channels": -1,
    "use_temporal_attention": False, "use_temporal_resblock": False,
}
SDXL_UNET = {
    "use_checkpoint": False, "image_size": 32, "in_channels": 4, "out_channels": 4,
    "use_spatial_transformer": True, "legacy": False, "num_classes": "sequential", "adm_in_channels": 2816,
    "model_channels": 320, "num_res_blocks": [2, 2, 2], "channel_mult": [1, 2, 4],
    "transformer_depth": [0, 0, 2, 2, 10, 10], "transformer_depth_middle": 10,
    "transformer_depth_output": [0, 0, 0, 2, 2, 2, 10, 10, 10],
    "use_linear_in_transformer": True, "context_dim": 2048, "num_head_channels": 64,
    "use_temporal_attention": False, "use_temporal_resblock": False,
}


def tiny_unet_config(family: str, channels: int = 32, context_dim: int = 64, depth: int = 1) -> dict:
    """The one definition of the tiny UNets used by tests and the bench's own checks: SD1.5 with two
    levels of attention, SDXL with none at its first level (a few hundred thousand parameters)."""
    if family == "sd15":
        return dict(SD15_UNET, model_channels=channels, num_res_blocks=[1, 1], channel_mult=[1, 2],
                    transformer_depth=[depth, depth], transformer_depth_middle=depth,
                    transformer_depth_output=[depth] * 4, context_dim=context_dim)
    if family == "sdxl":
        return dict(SDXL_UNET, model_channels=channels, num_res_blocks=[1, 1, 1], channel_mult=[1, 2, 4],
                    transformer_depth=[0, depth, depth], transformer_depth_middle=depth,
                    transformer_depth_output=[0, 0, depth, depth, depth, depth], context_dim=context_dim,
                    num_head_channels=16)
    raise ValueError(f"no tiny UNet for {family!r}")


TINY_SD15_UNET = tiny_unet_config("sd15")
TINY_SDXL_UNET = tiny_unet_config("sdxl")

# DiTs (issues 15-16): the unet_config ComfyUI's detection (comfy.model_detection.detect_unet_config) builds for
# each checkpoint; model_config_from_unet_config maps each back to its comfy.supported_models class.
FLUX_DEV = {"image_model": "flux", "in_channels": 16, "patch_size": 2, "out_channels": 16, "vec_in_dim": 768,
            "context_in_dim": 4096, "hidden_size": 3072, "mlp_ratio": 4.0, "num_heads": 24, "depth": 19,
            "depth_single_blocks": 38, "axes_dim": [16, 56, 56], "theta": 10000, "qkv_bias": True,
            "guidance_embed": True}
SD35_LARGE = {"in_channels": 16, "patch_size": 2, "out_channels": 16, "depth": 38, "input_size": None,
              "adm_in_channels": 2048,
              "context_embedder_config": {"target": "torch.nn.Linear", "params": {"in_features": 4096, "out_features": 2432}},
              "num_patches": 36864, "pos_embed_max_size": 192, "qk_norm": "rms", "pos_embed_scaling_factor": None,
              "x_block_self_attn_layers": []}
SD35_MEDIUM = {"in_channels": 16, "patch_size": 2, "out_channels": 16, "depth": 24, "input_size": None,
               "adm_in_channels": 2048,
               "context_embedder_config": {"target": "torch.nn.Linear", "params": {"in_features": 4096, "out_features": 1536}},
               "num_patches": 147456, "pos_embed_max_size": 384, "qk_norm": "rms", "pos_embed_scaling_factor": None,
               "x_block_self_attn_layers": list(range(13))}
WAN21_1_3B = {"image_model": "wan2.1", "model_type": "t2v", "dim": 1536, "out_dim": 16, "num_heads": 12,
              "ffn_dim": 8960, "num_layers": 30, "patch_size": (1, 2, 2), "freq_dim": 256, "window_size": (-1, -1),
              "qk_norm": True, "cross_attn_norm": True, "eps": 1e-6, "in_dim": 16}
# Flux-dev does not fit this project's 23 GB CPU machine (12 B parameters: 48 GB in fp32): its full-width slice
# keeps Flux-dev's blocks exactly (hidden 3072, 24 heads) and its 1:2 ratio of double to single blocks
FLUX_DEV_SLICE = dict(FLUX_DEV, depth=2, depth_single_blocks=4)


@dataclass(frozen=True)
class ModelSpec:
    """What the bench needs to know to build and condition one architecture."""
    name: str
    family: str                 # "sd15" | "sdxl" | "flux" | "sd3" | "wan": which comfy.supported_models class
    unet_config: dict = field(repr=False)
    context_dim: int = 768
    pooled_dim: int = 0         # SDXL: CLIP-G pooled output; Flux: CLIP-L; SD3: CLIP-L + G
    tokens: int = 77            # text tokens per conditioning
    hidden: bool = False        # not offered in --help (test fixtures)
    detect: bool = True         # check the config against comfy.model_detection
    display: str = ""           # label of a DiT
    frames: int = 0             # video: latent frames (Wan)

    @property
    def label(self) -> str:
        if self.display:
            return self.display
        return {"sd15": "SD1.5", "sdxl": "SDXL"}[self.family] + (" (tiny)" if self.hidden else " UNet")

    @property
    def is_dit(self) -> bool:
        return self.family in DIT_CLASSES

    @property
    def latent_channels(self) -> int:
        return 16 if self.is_dit else 4


# family -> comfy.supported_models class name
DIT_CLASSES = {"flux": "Flux", "sd3": "SD3", "wan": "WAN21_T2V"}


SPECS: dict[str, ModelSpec] = {
    "sd15": ModelSpec("sd15", "sd15", SD15_UNET, context_dim=768),
    "sdxl": ModelSpec("sdxl", "sdxl", SDXL_UNET, context_dim=2048, pooled_dim=1280),
    "tiny-sd15": ModelSpec("tiny-sd15", "sd15", TINY_SD15_UNET, context_dim=64, hidden=True, detect=False),
    "tiny-sdxl": ModelSpec("tiny-sdxl", "sdxl", TINY_SDXL_UNET, context_dim=64, pooled_dim=1280, hidden=True,
                           detect=False),
    # T5 tokens: Flux 256 (ComfyUI's T5 padding for Flux), SD3 77 CLIP + 77 T5, Wan's umT5 512
    "flux-dev": ModelSpec("flux-dev", "flux", FLUX_DEV, 4096, 768, 256, display="Flux-dev (12 B)"),
    "flux-dev-slice": ModelSpec("flux-dev-slice", "flux", FLUX_DEV_SLICE, 4096, 768, 256,
                                display="Flux-dev slice (2 double + 4 single full-size blocks)"),
    "sd35-large": ModelSpec("sd35-large", "sd3", SD35_LARGE, 4096, 2048, 154, display="SD3.5 Large (8 B)"),
    "sd35-medium": ModelSpec("sd35-medium", "sd3", SD35_MEDIUM, 4096, 2048, 154, display="SD3.5 Medium (2.5 B)"),
    "wan21-1.3b": ModelSpec("wan21-1.3b", "wan", WAN21_1_3B, 4096, 0, 512, display="Wan 2.1 T2V 1.3B", frames=2),
}
PUBLIC_MODELS = tuple(k for k, s in SPECS.items() if not s.hidden)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """``auto`` = fp16 on CUDA (what ComfyUI runs SD1.5/SDXL in there), fp32 on CPU."""
    if name == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    table = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
    if name not in table:
        raise ValueError(f"unknown dtype {name!r}; expected auto, {', '.join(table)}")
    return table[name]


def init_weights(module: torch.nn.Module, seed: int = 0, std: float = 0.02, qk_std: Optional[float] = None,
                 fan_in: bool = False) -> torch.nn.Module:
    """Deterministic random weights (in place; ``comfy.ops.disable_weight_init`` leaves them empty):
    matrices/kernels N(0, std) drawn on the CPU from ``seed`` (``fan_in``: N(0, 1/fan-in), the fixtures'
    training init), 1-D scales 1, biases 0.  ``qk_std`` (default ``std``) for the query/key projections:
    random weights at the usual init give nearly uniform attention, so tests of attention methods raise
    it (0.2-0.3) to get peaked maps."""
    g = torch.Generator().manual_seed(seed)
    qk_std = std if qk_std is None else qk_std
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.endswith("bias"):
                p.zero_()
            elif p.ndim == 1:
                p.fill_(1.0)
            elif fan_in:
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(p[0].numel()))
            else:
                s = qk_std if name.endswith(("to_q.weight", "to_k.weight")) else std
                p.copy_(torch.randn(p.shape, generator=g) * s)
    return module


def model_config(spec: ModelSpec, dtype: torch.dtype):
    """The ``comfy.supported_models`` config object for ``spec`` (SD15, SDXL, Flux, SD3, WAN21_T2V)."""
    import comfy.model_detection
    import comfy.supported_models
    names = {"sd15": "SD15", "sdxl": "SDXL", **DIT_CLASSES}
    cls = getattr(comfy.supported_models, names[spec.family])
    unet = copy.deepcopy(spec.unet_config)
    if spec.detect:
        # the same lookup a checkpoint load does: the config must come back as exactly this class
        mc = comfy.model_detection.model_config_from_unet_config(dict(unet))
        if type(mc) is not cls:
            raise RuntimeError(f"{spec.name}: unet_config detected as {type(mc).__name__}, expected {cls.__name__}")
    mc = cls(unet)
    # BASE.__init__ merges unet_extra_config (SDXL forces num_head_channels 64); keep the spec's value
    for k in ("num_head_channels", "num_heads"):
        if k in spec.unet_config:
            mc.unet_config[k] = spec.unet_config[k]
    mc.set_inference_dtype(dtype, None)
    return mc


@dataclass
class BenchModel:
    """A built model: its ModelPatcher plus how to condition it."""
    spec: ModelSpec
    patcher: Any
    dtype: torch.dtype
    device: torch.device
    params: int

    def cond(self, seed: int, batch: int = 1, width: int = 1024, height: int = 1024) -> list:
        """One ComfyUI conditioning list ``[[context, extras]]`` with random text embeddings."""
        g = torch.Generator().manual_seed(seed)
        extras: dict[str, Any] = {}
        if self.spec.is_dit:
            if self.spec.pooled_dim:
                extras["pooled_output"] = torch.randn(batch, self.spec.pooled_dim, generator=g)
            if self.spec.family == "flux":
                extras["guidance"] = 3.5
        elif self.spec.pooled_dim:
            extras = {"pooled_output": torch.randn(batch, self.spec.pooled_dim, generator=g),
                      "width": width, "height": height, "crop_w": 0, "crop_h": 0,
                      "target_width": width, "target_height": height}
        return [[torch.randn(batch, self.spec.tokens, self.spec.context_dim, generator=g), extras]]

    def latent(self, width: int, height: int, batch: int = 1) -> torch.Tensor:
        """An empty latent for a ``width`` × ``height`` image (latent = pixels / 8; Wan: ``spec.frames`` latent
        frames, 5-D)."""
        if self.spec.frames:
            return torch.zeros(batch, self.spec.latent_channels, self.spec.frames, height // 8, width // 8)
        return torch.zeros(batch, self.spec.latent_channels, height // 8, width // 8)


def build(name: str, device: Optional[torch.device] = None, dtype: torch.dtype = torch.float32,
          seed: int = 0) -> BenchModel:
    """Build ``SPECS[name]`` with random weights on ``device`` in a real ModelPatcher."""
    import comfy.model_management as mm
    import comfy.model_patcher
    spec = SPECS[name]
    device = torch.device(device) if device is not None else mm.get_torch_device()
    mc = model_config(spec, dtype)
    model = mc.get_model({}, device=device)
    init_weights(model.diffusion_model, seed=seed)
    model.eval()
    offload = device if device.type == "cpu" else mm.unet_offload_device()
    patcher = comfy.model_patcher.ModelPatcher(model, load_device=device, offload_device=offload)
    params = sum(p.numel() for p in model.diffusion_model.parameters())
    return BenchModel(spec, patcher, dtype, device, params)
