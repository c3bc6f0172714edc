"""The site layer's DiT part: the blocks of each DiT family (:func:`block_sites`: Flux double/single, SD3
joint, Wan, Qwen-Image, PixArt), their linear weights per stream (:func:`dit_block_shapes`, for FLOPs) and the
``dit`` block replace hook chained to an existing one (:func:`add_block_replace`).  ``nodes/sites.py``
re-exports all of it; this module imports only ``core``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch

from ..core.pruning import DiTBlockShape


# ------------------------------------------------------------------------------------------------
# DiT blocks
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class BlockSite:
    """One DiT block: ``kind`` ("double", "single", "joint", "block"), its index among blocks of that
    kind, its path under ``diffusion_model`` and its ``patches_replace["dit"]`` key (None where the
    model has no block replace: PixArt)."""
    kind: str
    index: int
    path: str
    replace_key: Optional[tuple]


# family -> ((module list attribute, kind, dit replace name or None), ...), in forward order
_DIT_BLOCKS = {
    "flux": (("double_blocks", "double", "double_block"), ("single_blocks", "single", "single_block")),
    "sd3": (("joint_blocks", "joint", "double_block"),),
    "wan": (("blocks", "block", "double_block"),),
    "qwen": (("transformer_blocks", "block", "double_block"),),
    "pixart": (("blocks", "block", None),),
}


def block_sites(model, info) -> list[BlockSite]:
    """The DiT blocks of ``model`` (``info``: its ``sites.ModelInfo``), in forward order."""
    dm = model.model.diffusion_model
    out = []
    for attr, kind, replace in _DIT_BLOCKS.get(info.family, ()):
        for i, _ in enumerate(getattr(dm, attr, None) or ()):
            out.append(BlockSite(kind, i, f"{attr}.{i}", (replace, i) if replace else None))
    return out


# per family: (prefix -> stream) rules for the linear weights of one block, first match wins; "mod" = per
# sample (modulation), "ctx" = per context token of a separate cross-attention, "cat" = every token (Flux single)
_DIT_STREAMS = {
    ("flux", "double"): (("img_mod", "mod"), ("txt_mod", "mod"), ("img_", "img"), ("txt_", "txt")),
    ("flux", "single"): (("modulation", "mod"), ("", "cat")),
    ("sd3", "joint"): (("x_block.adaLN", "mod"), ("context_block.adaLN", "mod"), ("x_block.", "img"),
                       ("context_block.", "txt")),
    ("wan", "block"): (("cross_attn.k", "ctx"), ("cross_attn.v", "ctx"), ("", "img")),
    ("qwen", "block"): (("img_mod", "mod"), ("txt_mod", "mod"), ("txt_", "txt"), ("attn.add_", "txt"),
                        ("attn.to_add_out", "txt"), ("", "img")),
    ("pixart", "block"): (("cross_attn.kv_linear", "ctx"), ("", "img")),
}


def dit_block_shapes(model, info) -> dict:
    """{(kind, index): core.pruning.DiTBlockShape} of every DiT block: its linear weights per stream (read off
    the modules), hidden size and attentions (the FLOPs counter of AT-EDM and the bench's Amdahl figures)."""
    dm = model.model.diffusion_model
    out = {}
    for site in block_sites(model, info):
        rules = _DIT_STREAMS.get((info.family, site.kind))
        if rules is None:
            continue
        block = dm.get_submodule(site.path)
        w = {"img": 0, "txt": 0, "ctx": 0, "cat": 0, "mod": 0}
        for name, m in block.named_modules():
            if isinstance(m, torch.nn.Linear):
                w[next(st for pre, st in rules if name.startswith(pre))] += int(m.weight.numel())
        qkv = getattr(getattr(getattr(block, "x_block", None), "attn", None), "qkv", None)      # SD3
        dim = hidden = int(getattr(block, "hidden_size", 0) or getattr(block, "dim", 0)
                           or (qkv.in_features if qkv is not None else 0))
        dual = int(getattr(getattr(block, "x_block", None), "x_block_self_attn", False))
        if info.family in ("wan", "pixart"):
            shape = DiTBlockShape(img=w["img"], ctx=w["ctx"], dim=hidden or dim, joint=False, image_self=1, cross=True)
        elif site.kind == "single":
            shape = DiTBlockShape(img=w["cat"], txt=w["cat"], dim=hidden or dim, joint=True)
        else:
            shape = DiTBlockShape(img=w["img"], txt=w["txt"], dim=hidden or dim, joint=True, image_self=dual)
        out[(site.kind, site.index)] = shape
    return out


def add_block_replace(model, site: BlockSite, mine: Callable) -> None:
    """Install ``mine(args, extra)`` as the ``dit`` block replace of ``site``, chained: an existing
    replace of that block becomes ``extra["original_block"]`` for ``mine``."""
    if site.replace_key is None:
        raise ValueError(f"{site.path} has no block replace hook")
    name, index = site.replace_key
    prev = (model.model_options.get("transformer_options", {}).get("patches_replace", {}).get("dit", {})
            .get((name, index)))
    def chained(args, extra):
        orig = extra["original_block"]
        return mine(args, {**extra, "original_block": lambda a: prev(a, {**extra, "original_block": orig})})
    model.set_model_patch_replace(mine if prev is None else chained, "dit", name, index)


__all__ = ["BlockSite", "block_sites", "dit_block_shapes", "add_block_replace"]
