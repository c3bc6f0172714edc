"""The site layer: the only code that knows where things are in a model and how to hook them.

* model facts: :func:`detect_model` (family, UNet block levels and attention levels);
* sites: :func:`attention_sites` (self/cross attention modules of UNet transformer blocks and
  PixArt blocks), :func:`transformer_stacks` (UNet ``SpatialTransformer`` stacks, AT-EDM),
  :func:`block_sites` (DiT blocks: Flux double/single, SD3 joint, Wan, Qwen-Image, PixArt; in ``sites_dit.py``);
* hooks: :func:`patch_forward` (object patch of a ``forward`` attribute, chained to this clone's
  pending patch; one rule for "another node patched it", :func:`forward_is_patched`),
  :func:`with_attention_override` / :func:`add_attention_override` (the attention override chained
  to any override already set, e.g. a SageAttention patch), :func:`add_block_replace` (a ``dit``
  block replace chained to an existing one; in ``sites_dit.py``).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch

from ..core.pruning import LayerShape, UNetInventory, stage_edges
from .sites_dit import BlockSite, add_block_replace, block_sites, dit_block_shapes  # noqa: F401  (re-exported)

# ------------------------------------------------------------------------------------------------
# model family and block levels
# ------------------------------------------------------------------------------------------------
FAMILY_LABELS = {"sd1": "SD1.x/SD2.x", "sdxl": "SDXL", "flux": "Flux", "sd3": "SD3", "pixart": "PixArt",
                 "wan": "Wan", "qwen": "Qwen-Image", "other": "other"}
# comfy.model_base class names (any in the MRO) -> family; first match wins
_DIT_FAMILIES = (("Flux", "flux"), ("SD3", "sd3"), ("PixArt", "pixart"), ("WAN21", "wan"), ("QwenImage", "qwen"))
# comfy.model_base classes of those families that every FreeSpeed node refuses, by class name (any in the MRO) ->
# why; docs/dit-support.md is the table of every class (tests/host/test_dit_model_classes.py keeps them in step)
REFUSED_CLASSES = {
    "WAN22_S2V": "Wan 2.2 S2V's blocks get no transformer_options (WanModel_S2V.forward_orig in "
                 "comfy/ldm/wan/model.py), so no attention override and no block tag reaches them: the nodes would "
                 "silently do nothing, and its audio injector adds full-length residuals after blocks.",
    "ChromaRadiance": "Chroma Radiance works in pixel space (16x16-pixel patches decoded by a NeRF head); FreeSpeed's "
                      "token layouts, resolution bands and DiT defaults are untested on it.",
    "WAN21_HuMo": "Wan HuMo's audio cross-attention inside each block regroups the image tokens per frame and its "
                  "reference latent is appended after the video tokens; FreeSpeed's token layout does not know either.",
}


@dataclass(frozen=True)
class ModelInfo:
    family: str                                   # a key of FAMILY_LABELS
    model_class: str                              # e.g. "comfy.model_base.SDXL"
    diffusion_class: str                          # e.g. "UNetModel"
    block_level: dict = field(default_factory=dict)       # UNet block -> resolution level (1 = full latent)
    block_depth: dict = field(default_factory=dict)       # UNet block -> transformer depth
    attention_levels: tuple = ()                  # resolution levels that hold attention, ascending
    refused: str = ""                             # why every node refuses this model class (REFUSED_CLASSES)

    @property
    def label(self) -> str:
        return FAMILY_LABELS[self.family]

    @property
    def is_unet(self) -> bool:
        return self.family in ("sd1", "sdxl")

    def attention_level(self, block) -> Optional[int]:
        """Attention level (1 = highest-resolution attention) of a ("input", i)-style block key."""
        lvl = self.block_level.get(tuple(block[:2])) if block is not None else None
        if lvl is None or lvl not in self.attention_levels:
            return None
        return self.attention_levels.index(lvl) + 1


def mro_names(obj) -> list[str]:
    return [c.__name__ for c in type(obj).__mro__]


def _has(block, name: str) -> bool:
    return any(type(m).__name__ == name for m in block.modules())


def _unet_blocks(dm):
    """(part, index, block, level) of every UNet block in forward order; level = resolution level."""
    lvl = 1
    for i, block in enumerate(dm.input_blocks):
        yield "input", i, block, lvl
        if _has(block, "Downsample"):      # a Downsample layer, or a ResBlock(down=True)'s h_upd
            lvl += 1
    if getattr(dm, "middle_block", None) is not None:
        yield "middle", 0, dm.middle_block, lvl
    for i, block in enumerate(dm.output_blocks):
        yield "output", i, block, lvl
        if _has(block, "Upsample"):
            lvl -= 1


def _stacks_in(block) -> list:
    return [m for m in block.modules() if "SpatialTransformer" in mro_names(m)]


def detect_model(model) -> ModelInfo:
    """Family and block layout of a ModelPatcher's model."""
    base = model.model
    dm = base.diffusion_model
    names = mro_names(base)
    model_class = f"{type(base).__module__}.{type(base).__name__}"
    dm_class = type(dm).__name__
    if dm_class == "UNetModel" and hasattr(dm, "input_blocks"):
        if getattr(dm, "use_temporal_resblocks", False) or any("Video" in type(m).__name__ for m in dm.modules()):
            return ModelInfo("other", model_class, dm_class)
        sdxl = any(n.startswith("SDXL") for n in names) or getattr(dm, "adm_in_channels", None) in (2816, 2560)
        levels, depth = {}, {}
        for part, i, block, lvl in _unet_blocks(dm):
            ts = _stacks_in(block)
            if ts:
                levels[(part, i)] = lvl
                depth[(part, i)] = len(ts[0].transformer_blocks)
        return ModelInfo("sdxl" if sdxl else "sd1", model_class, dm_class, levels, depth,
                         tuple(sorted(set(levels.values()))))
    refused = next((REFUSED_CLASSES[n] for n in names if n in REFUSED_CLASSES), "")
    if refused:
        return ModelInfo("other", model_class, dm_class, refused=refused)
    for cls, family in _DIT_FAMILIES:
        if cls in names:
            return ModelInfo(family, model_class, dm_class)
    return ModelInfo("other", model_class, dm_class)


class UnsupportedModelError(ValueError):
    """Raised at node execution for a model a technique cannot work on."""


def unsupported(technique: str, info: ModelInfo, why: str, supported: str) -> UnsupportedModelError:
    return UnsupportedModelError(f"FreeSpeed {technique}: {info.model_class} ({info.label}, diffusion model "
                                 f"{info.diffusion_class}) is not supported. {info.refused or why} "
                                 f"Supported: {supported}.")


def family_reason(model) -> str:
    """Why a model outside the supported families is one: what it is, in a clause for a refusal message (a video
    UNet's temporal layers, a DiT whose blocks FreeSpeed does not know); whether it has cross-attention is said,
    since that is not the reason."""
    dm = model.model.diffusion_model
    cross = any(getattr(m, "attn2", None) is not None or "CrossAttention" in type(m).__name__ for m in dm.modules())
    has = "It has cross-attention, but it" if cross else "It"
    if type(dm).__name__ == "UNetModel":
        return (f"{has} is a video UNet (temporal attention and residual layers over the frames of its batch), "
                "which FreeSpeed's UNet hooks do not handle")
    return f"{has} is a {type(dm).__name__} diffusion model, whose blocks and attention sites FreeSpeed does not know"


def require_unet(info: ModelInfo, technique: str, why: str) -> None:
    if not info.is_unet:
        raise unsupported(technique, info, why, "SD1.x/SD2.x and SDXL UNets")


# ------------------------------------------------------------------------------------------------
# attention sites
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class AttentionSite:
    """One attention module: ``kind`` "self" or "cross", its path under ``diffusion_model``, ComfyUI's
    replace-patch key (``("input", 4, 0)`` for UNets, ``("block", i)`` for PixArt and Wan) and, on UNets, its
    attention level (1 = the highest resolution with attention)."""
    kind: str
    path: str
    key: tuple
    level: Optional[int] = None

    @property
    def block(self) -> tuple:
        return self.key[:2]


_UNET_BLOCK = re.compile(r"^(input_blocks|middle_block|output_blocks)\.(\d+)\..*transformer_blocks\.(\d+)$")
_PART = {"input_blocks": "input", "middle_block": "middle", "output_blocks": "output"}


def attention_sites(model, info: ModelInfo) -> list[AttentionSite]:
    """Every self- and cross-attention module of a UNet's transformer blocks, of PixArt's and of Wan's blocks."""
    dm = model.model.diffusion_model
    sites: list[AttentionSite] = []
    if info.is_unet:
        for name, mod in dm.named_modules():
            m = _UNET_BLOCK.match(name)
            if m is None or "BasicTransformerBlock" not in mro_names(mod):
                continue
            part = _PART[m.group(1)]
            key = (part, 0 if part == "middle" else int(m.group(2)), int(m.group(3)))
            level = info.attention_level(key)
            if getattr(mod, "attn1", None) is not None:
                sites.append(AttentionSite("self", f"{name}.attn1", key, level))
            if getattr(mod, "attn2", None) is not None and not getattr(mod, "switch_temporal_ca_to_sa", False):
                sites.append(AttentionSite("cross", f"{name}.attn2", key, level))
        keys = [s.key for s in sites if s.kind == "cross"]
        if len(keys) != len(set(keys)):           # several transformers in one block: key by path
            sites = [AttentionSite(s.kind, s.path, (s.path,), s.level) for s in sites]
    elif info.family in ("pixart", "wan") and hasattr(dm, "blocks"):
        attn = "attn" if info.family == "pixart" else "self_attn"
        for i, blk in enumerate(dm.blocks):
            if hasattr(blk, attn):
                sites.append(AttentionSite("self", f"blocks.{i}.{attn}", ("block", i)))
            if hasattr(blk, "cross_attn"):
                sites.append(AttentionSite("cross", f"blocks.{i}.cross_attn", ("block", i)))
    return sites


# ------------------------------------------------------------------------------------------------
# UNet transformer stacks (AT-EDM) and the FLOPs inventory
# ------------------------------------------------------------------------------------------------
@dataclass
class StackSite:
    key: tuple                 # ("input"|"middle"|"output", i)
    path: str                  # e.g. "input_blocks.4.1"
    level: int                 # resolution level (1 = full latent)
    att_level: int             # attention level (1 = highest resolution with attention)
    edge: bool                 # first stack of a down stage / last of an up stage (AT-EDM's DSAP)
    module: Any
    shapes: tuple              # LayerShape per transformer layer


def layer_shape(block) -> LayerShape:
    dim = int(block.attn1.to_q.weight.shape[0])
    ctx = int(block.attn2.to_k.weight.shape[1]) if getattr(block, "attn2", None) is not None else 0
    ff = sum(int(m.weight.numel()) for m in block.ff.modules() if isinstance(m, torch.nn.Linear))
    return LayerShape(dim=dim, ctx_dim=ctx, ff_params=ff, heads=int(block.n_heads))


def transformer_stacks(model, info: ModelInfo, levels: tuple) -> list[StackSite]:
    """The ``SpatialTransformer`` stacks of a UNet at the given attention levels."""
    dm = model.model.diffusion_model
    edges = stage_edges(info.block_level)
    out = []
    for part, i, block, lvl in _unet_blocks(dm):
        att = info.attention_level((part, i))
        if att is None or att not in levels:
            continue
        for j, layer in enumerate(block):
            names = mro_names(layer)
            if "SpatialTransformer" not in names or "SpatialVideoTransformer" in names:
                continue
            path = f"middle_block.{j}" if part == "middle" else f"{part}_blocks.{i}.{j}"
            out.append(StackSite((part, i), path, lvl, att, (part, i) in edges, layer,
                                 tuple(layer_shape(b) for b in layer.transformer_blocks)))
    return out


def unet_inventory(model, pruned: set) -> UNetInventory:
    """The FLOPs inventory of a UNet outside the stacks whose modules' ids are in ``pruned``."""
    dm = model.model.diffusion_model
    convs, projections, stacks = [], [], []

    def walk(module, lvl):
        for name, m in module.named_modules():
            if "transformer_blocks" in name or "emb_layers" in name:
                continue
            names = mro_names(m)
            if "SpatialTransformer" in names:
                if id(m) not in pruned:
                    stacks.append((lvl - 1, tuple(layer_shape(b) for b in m.transformer_blocks)))
                continue
            if isinstance(m, torch.nn.Conv2d):
                parent = module.get_submodule(name.rsplit(".", 1)[0]) if "." in name else module
                up = ".conv" in f".{name}" and "Upsample" in mro_names(parent)
                convs.append((m.weight.numel(), max(lvl - 2, 0) if up else lvl - 1, m.stride[0], m.stride[1]))
            elif isinstance(m, torch.nn.Linear) and ("proj_in" in name or "proj_out" in name):
                projections.append((m.weight.numel(), lvl - 1))

    for _, _, block, lvl in _unet_blocks(dm):
        walk(block, lvl)
    if getattr(dm, "out", None) is not None:
        walk(dm.out, 1)
    return UNetInventory(tuple(convs), tuple(projections), tuple(stacks))


# ------------------------------------------------------------------------------------------------
# hooks
# ------------------------------------------------------------------------------------------------
def forward_is_patched(fn, module) -> bool:
    """The one rule for "another node patched this forward": ``fn`` is not the module's own bound
    ``forward`` (at install time ``fn`` is what ``get_model_object`` returns for this clone; while
    sampling, the live ``module.forward``, where object patches are applied)."""
    return not (getattr(fn, "__self__", None) is module and getattr(fn, "__func__", None) is type(module).forward)


def patch_forward(model, path: str, make: Callable[[Callable], Callable], leave_patched: bool = False) -> bool:
    """Object-patch ``diffusion_model.<path>.forward`` on the clone ``model`` with ``make(original)``.

    The original is this clone's pending patch, else the module's own forward (never the live
    attribute, which may still hold a previous clone's patch).  ``leave_patched``: a forward another
    node already patched is left to it (returns False) instead of being wrapped.
    """
    name = f"diffusion_model.{path}.forward"
    orig = model.get_model_object(name)
    if leave_patched and forward_is_patched(orig, model.model.diffusion_model.get_submodule(path)):
        return False
    model.add_object_patch(name, make(orig))
    return True


ROLE_KEY = "freespeed.role"


class RoleSequence:
    """The roles of a block's kernel calls in the order the block's code makes them (SD3.5's dual blocks: the
    joint attention, then the image-only one); resolved to one role per kernel call by the outermost FreeSpeed
    override (:func:`chain_attention_override`), cyclically if a block replace runs the block again."""

    def __init__(self, roles: tuple):
        self.roles, self.i = tuple(roles), 0

    def next(self) -> str:
        role = self.roles[self.i % len(self.roles)]
        self.i += 1
        return role


def with_resolved_role(kwargs: dict) -> dict:
    """A kernel call's kwargs whose ``transformer_options`` carry this call's role (a str) under
    :data:`ROLE_KEY`, where the site gave a :class:`RoleSequence`."""
    to = kwargs.get("transformer_options")
    if isinstance(to, dict) and isinstance(to.get(ROLE_KEY), RoleSequence):
        return {**kwargs, "transformer_options": {**to, ROLE_KEY: to[ROLE_KEY].next()}}
    return kwargs


def chain_attention_override(prev: Optional[Callable], mine: Callable) -> Callable:
    """An ``optimized_attention_override`` that runs ``mine(call_next, func, *args, **kwargs)``, where
    ``call_next`` is the override already set (another node's, e.g. SageAttention) or the kernel."""
    def call_next(func, *args, **kwargs):
        return prev(func, *args, **kwargs) if prev is not None else func(*args, **kwargs)

    def override(func, *args, **kwargs):
        return mine(call_next, func, *args, **with_resolved_role(kwargs))
    return override


def with_attention_override(transformer_options: dict, mine: Callable) -> dict:
    """A copy of ``transformer_options`` with ``mine`` chained in front of its attention override."""
    to = dict(transformer_options)
    to["optimized_attention_override"] = chain_attention_override(to.get("optimized_attention_override"), mine)
    return to


def add_attention_override(model, mine: Callable) -> None:
    """Chain ``mine`` in front of the clone's attention override (model-wide)."""
    to = model.model_options.setdefault("transformer_options", {})
    to["optimized_attention_override"] = chain_attention_override(to.get("optimized_attention_override"), mine)


__all__ = ["FAMILY_LABELS", "REFUSED_CLASSES", "ModelInfo", "detect_model", "UnsupportedModelError", "unsupported",
           "family_reason", "require_unet", "AttentionSite", "attention_sites", "StackSite", "layer_shape",
           "transformer_stacks", "unet_inventory", "BlockSite", "block_sites", "dit_block_shapes", "forward_is_patched",
           "patch_forward", "ROLE_KEY", "RoleSequence", "with_resolved_role", "chain_attention_override",
           "with_attention_override", "add_attention_override", "add_block_replace", "mro_names"]
