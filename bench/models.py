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

# tiny variants for tests (same families, a few hundred thousand parameters)
TINY_SD15_UNET = dict(SD15_UNET, model_channels=32, num_res_blocks=[1, 1], channel_mult=[1, 2],
                      transformer_depth=[1, 1], transformer_depth_middle=1, transformer_depth_output=[1, 1, 1, 1],
                      context_dim=64)
TINY_SDXL_UNET = dict(SDXL_UNET, model_channels=32, num_res_blocks=[1, 1, 1], channel_mult=[1, 2, 4],
                      transformer_depth=[0, 1, 1], transformer_depth_middle=1,
                      transformer_depth_output=[0, 0, 1, 1, 1, 1], context_dim=64, num_head_channels=16)


@dataclass(frozen=True)
class ModelSpec:
    """What the bench needs to know to build and condition one architecture."""
    name: str
    family: str                 # "sd15" | "sdxl": which comfy.supported_models class
    unet_config: dict = field(repr=False)
    context_dim: int = 768
    pooled_dim: int = 0         # SDXL: CLIP-G pooled output
    tokens: int = 77            # text tokens per conditioning
    hidden: bool = False        # not offered in --help (test fixtures)
    detect: bool = True         # check the config against comfy.model_detection

    @property
    def label(self) -> str:
        return {"sd15": "SD1.5", "sdxl": "SDXL"}[self.family] + (" (tiny)" if self.hidden else " UNet")


SPECS: dict[str, ModelSpec] = {
    "sd15": ModelSpec("sd15", "sd15", SD15_UNET, context_dim=768),
    "sdxl": ModelSpec("sdxl", "sdxl", SDXL_UNET, context_dim=2048, pooled_dim=1280),
    "tiny-sd15": ModelSpec("tiny-sd15", "sd15", TINY_SD15_UNET, context_dim=64, hidden=True, detect=False),
    "tiny-sdxl": ModelSpec("tiny-sdxl", "sdxl", TINY_SDXL_UNET, context_dim=64, pooled_dim=1280, hidden=True,
                           detect=False),
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


def init_weights_(module: torch.nn.Module, seed: int = 0, std: float = 0.02) -> torch.nn.Module:
    """Deterministic random weights: matrices/kernels N(0, std), 1-D scales 1, biases 0 (in place)."""
    g = None
    with torch.no_grad():
        for name, p in module.named_parameters():
            if g is None or g.device != p.device:
                g = torch.Generator(device=p.device).manual_seed(seed)
            if name.endswith("bias"):
                p.zero_()
            elif p.ndim == 1:
                p.fill_(1.0)
            else:
                p.normal_(0.0, std, generator=g)
    return module


def model_config(spec: ModelSpec, dtype: torch.dtype):
    """The ``comfy.supported_models`` config object for ``spec`` (SD15 or SDXL)."""
    import comfy.model_detection
    import comfy.supported_models
    cls = {"sd15": comfy.supported_models.SD15, "sdxl": comfy.supported_models.SDXL}[spec.family]
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
        if self.spec.pooled_dim:
            extras = {"pooled_output": torch.randn(batch, self.spec.pooled_dim, generator=g),
                      "width": width, "height": height, "crop_w": 0, "crop_h": 0,
                      "target_width": width, "target_height": height}
        return [[torch.randn(batch, self.spec.tokens, self.spec.context_dim, generator=g), extras]]

    def latent(self, width: int, height: int, batch: int = 1) -> torch.Tensor:
        """An empty latent for a ``width`` × ``height`` image (latent = pixels / 8)."""
        return torch.zeros(batch, 4, height // 8, width // 8)


def build(name: str, device: Optional[torch.device] = None, dtype: torch.dtype = torch.float32,
          seed: int = 0) -> BenchModel:
    """Build ``SPECS[name]`` with random weights on ``device`` in a real ModelPatcher."""
    import comfy.model_management as mm
    import comfy.model_patcher
    spec = SPECS[name]
    device = torch.device(device) if device is not None else mm.get_torch_device()
    mc = model_config(spec, dtype)
    model = mc.get_model({}, device=device)
    init_weights_(model.diffusion_model, seed=seed)
    model.eval()
    offload = device if device.type == "cpu" else mm.unet_offload_device()
    patcher = comfy.model_patcher.ModelPatcher(model, load_device=device, offload_device=offload)
    params = sum(p.numel() for p in model.diffusion_model.parameters())
    return BenchModel(spec, patcher, dtype, device, params)
