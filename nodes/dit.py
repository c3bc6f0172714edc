"""DiT plumbing shared by every technique (issues 15-16): the per-call token layout, block identity and
attention-call parsing.  Model-structure knowledge only; the maths is in ``core/`` (``core/tokens.py``).

* :func:`layout_for_call` reads one model call's token layout (text count, image grids per frame,
  reference latents, ControlNet blocks) from the latent and the conditioning, once, in an APPLY_MODEL
  wrapper (:func:`with_layout`); it travels down in a *copy* of ``transformer_options`` under
  :data:`LAYOUT_KEY`, so block replaces and the attention override of every FreeSpeed node read it.
  APPLY_MODEL fires for every family (DIFFUSION_MODEL does not fire for SD3 and PixArt).
* :func:`tag_blocks` chains a ``dit`` block replace in front of each block that passes a copy of
  ``transformer_options`` carrying the block (:data:`BLOCK_KEY`) to ``extra["original_block"]``: the
  attention override then knows which block a kernel call belongs to (DiTs set no block keys).
* :class:`AttnCall` parses a kernel call seen by the attention override (Flux: ``[B, H, L, D]`` with
  ``skip_reshape``; SD3/Wan/Qwen: ``[B, L, H*D]``; the mask positional or keyword) and rebuilds it.

Nothing here copies a model's ``forward``; see docs/architecture.md.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch

from ..core.tokens import Grid, TokenLayout
from .sites import BlockSite, ModelInfo, add_block_replace, block_sites

LAYOUT_KEY = "freespeed.layout"
BLOCK_KEY = "freespeed.block"
TAGGED_KEY = "freespeed.blocks_tagged"
DIT_FAMILIES = ("flux", "sd3", "pixart", "wan", "qwen")
APPLY_NAMES = ("c_concat", "c_crossattn", "control", "transformer_options")


# ------------------------------------------------------------------------------------------------
# the token layout of one call
# ------------------------------------------------------------------------------------------------
def _ceil(a: int, p: int) -> int:
    return -(-int(a) // int(p))


def _control_blocks(control, family: str) -> frozenset:
    """(block kind, index) of the blocks after which ComfyUI adds a full-length ControlNet residual."""
    if not isinstance(control, dict):
        return frozenset()
    kinds = {"flux": {"input": "double", "output": "single"}, "sd3": {"output": "joint"},
             "qwen": {"input": "block"}}.get(family, {})
    out = set()
    for part, kind in kinds.items():
        for i, add in enumerate(control.get(part) or ()):
            if add is not None:
                out.add((kind, i))
    return frozenset(out)


def _hint_blocks(family: str, dm, kwargs: dict, to: Optional[dict]) -> frozenset:
    """(block kind, index) of the blocks after which the model itself adds a full-length stream inside the block
    stack (not a ControlNet): Wan VACE's hints (``vace_layers_mapping``), Wan Animate's face adapter (every 5th
    block, with face pixels), Qwen-Image's ``double_block`` patches (e.g. the block-wise DiffSynth ControlNet of
    ``comfy_extras/nodes_model_patch.py``, after every block).  Pruned ranges end before them (issue 21)."""
    if family == "wan":
        mapping = getattr(dm, "vace_layers_mapping", None)
        if isinstance(mapping, dict) and kwargs.get("vace_context") is not None:
            return frozenset(("block", int(i)) for i in mapping)
        if getattr(dm, "face_adapter", None) is not None and kwargs.get("face_pixel_values") is not None:
            return frozenset(("block", i) for i in range(len(dm.blocks)) if i % 5 == 0)
    if family == "qwen" and ((to or {}).get("patches") or {}).get("double_block"):
        return frozenset(("block", i) for i in range(len(dm.transformer_blocks)))
    return frozenset()


def layout_for_call(info: ModelInfo, dm, x: torch.Tensor, c_crossattn, control, kwargs: dict,
                    to: Optional[dict] = None) -> Optional[TokenLayout]:
    """The token layout of one model call (``x``: the latent APPLY_MODEL gets), or None when unknown."""
    fam = info.family
    hints = _hint_blocks(fam, dm, kwargs, to)
    control = _control_blocks(control, fam) | hints
    txt = int(c_crossattn.shape[1]) if torch.is_tensor(c_crossattn) and c_crossattn.ndim == 3 else 0
    try:
        if fam == "flux" and x.ndim == 4:
            p = int(getattr(dm, "patch_size", 2))
            groups = [Grid(1, _ceil(x.shape[-2], p), _ceil(x.shape[-1], p))]
            for ref in kwargs.get("ref_latents") or ():
                groups.append(Grid(1, _ceil(ref.shape[-2], p), _ceil(ref.shape[-1], p)))
            return TokenLayout("flux", txt, tuple(groups), 0, True, control)
        if fam == "sd3" and x.ndim == 4:
            p = int(dm.x_embedder.patch_size[0])
            txt += int(getattr(dm, "register_length", 0) or 0)
            return TokenLayout("sd3", txt, (Grid(1, _ceil(x.shape[-2], p), _ceil(x.shape[-1], p)),), 0, True,
                               control)
        if fam == "qwen" and x.ndim in (4, 5):
            p = int(getattr(dm, "patch_size", 2))
            groups = [Grid(1, _ceil(x.shape[-2], p), _ceil(x.shape[-1], p))]
            for ref in kwargs.get("ref_latents") or ():
                groups.append(Grid(1, _ceil(ref.shape[-2], p), _ceil(ref.shape[-1], p)))
            return TokenLayout("qwen", txt, tuple(groups), 0, True, control)
        if fam == "wan" and x.ndim == 5:
            pt, ph, pw = (int(v) for v in dm.patch_size)
            frames = _ceil(x.shape[2], pt)
            tdc = kwargs.get("time_dim_concat")
            if torch.is_tensor(tdc) and tdc.ndim == 5:
                frames += _ceil(tdc.shape[2], pt)
            groups = [Grid(frames, _ceil(x.shape[-2], ph), _ceil(x.shape[-1], pw))]
            ref = kwargs.get("reference_latent")
            if getattr(dm, "ref_conv", None) is not None and torch.is_tensor(ref):
                groups.insert(0, Grid(1, int(ref.shape[-2]) // ph, int(ref.shape[-1]) // pw))
                return TokenLayout("wan", 0, tuple(groups), 1, True, control)
            return TokenLayout("wan", 0, tuple(groups), 0, True, control)
        if fam == "pixart" and x.ndim == 4:
            p = int(getattr(dm, "patch_size", 2))
            return TokenLayout("pixart", 0, (Grid(1, int(x.shape[-2]) // p, int(x.shape[-1]) // p),), 0, True)
    except (AttributeError, TypeError, ValueError, IndexError):
        return None
    return None


def skipped_blocks(dm) -> frozenset:
    """(block kind, index) of the blocks a model skips on every call: Chroma's ``skip_mmdit`` (double blocks) and
    ``skip_dit`` (single blocks) lists; their block replaces are never called."""
    out = set()
    for attr, kind in (("skip_mmdit", "double"), ("skip_dit", "single")):
        for i in getattr(dm, attr, None) or ():
            out.add((kind, int(i)))
    return frozenset(out)


def apply_args(args: tuple, kwargs: dict) -> dict:
    """APPLY_MODEL's ``c_concat, c_crossattn, control, transformer_options`` from a wrapper's args."""
    vals = dict(zip(APPLY_NAMES, args))
    vals.update({k: kwargs[k] for k in APPLY_NAMES if k in kwargs})
    return vals


def with_transformer_options(args: tuple, kwargs: dict, to: dict) -> tuple[tuple, dict]:
    """(args, kwargs) of an APPLY_MODEL call with ``transformer_options`` replaced by ``to``."""
    if "transformer_options" in kwargs or len(args) <= 3:
        return args, {**kwargs, "transformer_options": to}
    return args[:3] + (to,) + args[4:], kwargs


def with_layout(info: ModelInfo, dm, x: torch.Tensor, args: tuple, kwargs: dict):
    """(args, kwargs, layout) of an APPLY_MODEL call whose ``transformer_options`` carry the call's layout: the
    one an outer FreeSpeed wrapper already put there, else a copy of the options with a fresh one."""
    vals = apply_args(args, kwargs)
    to = vals.get("transformer_options")
    to = to if isinstance(to, dict) else {}
    layout = to.get(LAYOUT_KEY)
    if layout is not None:
        return args, kwargs, layout
    extra = {k: v for k, v in kwargs.items() if k not in APPLY_NAMES}
    layout = layout_for_call(info, dm, x, vals.get("c_crossattn"), vals.get("control"), extra, to)
    if layout is None:
        return args, kwargs, None
    args, kwargs = with_transformer_options(args, kwargs, {**to, LAYOUT_KEY: layout})
    return args, kwargs, layout


def layout_of(transformer_options) -> Optional[TokenLayout]:
    return transformer_options.get(LAYOUT_KEY) if isinstance(transformer_options, dict) else None


def block_of(transformer_options) -> Optional[BlockSite]:
    return transformer_options.get(BLOCK_KEY) if isinstance(transformer_options, dict) else None


# ------------------------------------------------------------------------------------------------
# block identity
# ------------------------------------------------------------------------------------------------
def tagged_args(args: dict, site: BlockSite, **extra) -> dict:
    """A copy of a block replace's ``args`` whose ``transformer_options`` (copied) name the block."""
    to = dict(args.get("transformer_options") or {})
    to[BLOCK_KEY] = site
    to.update(extra)
    return {**args, "transformer_options": to}


def tag_blocks(model, info: ModelInfo) -> list[BlockSite]:
    """Chain a block replace that names its block in front of every DiT block with a replace hook (once per
    clone); returns the block sites."""
    sites = block_sites(model, info)
    to = model.model_options.setdefault("transformer_options", {})
    if to.get(TAGGED_KEY):
        return sites
    for site in sites:
        if site.replace_key is None:
            continue

        def tag(args, extra, s=site):
            return extra["original_block"](tagged_args(args, s))
        add_block_replace(model, site, tag)
    to[TAGGED_KEY] = True
    return sites


def block_order(sites: list[BlockSite]) -> dict:
    """{(kind, index): position in forward order} (Flux: double blocks, then single blocks)."""
    return {(s.kind, s.index): i for i, s in enumerate(sites)}


# ------------------------------------------------------------------------------------------------
# attention kernel calls (what the override sees)
# ------------------------------------------------------------------------------------------------
@dataclass
class AttnCall:
    """One kernel call ``func(q, k, v, heads, mask=None, attn_precision=None, skip_reshape=False, ...)``."""
    args: tuple
    kwargs: dict
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    heads: Any
    mask: Any
    skip_reshape: bool

    @property
    def tdim(self) -> int:
        """The token dimension of q/k/v: 2 for ``[B, H, L, D]`` (``skip_reshape``), 1 for ``[B, L, H*D]``."""
        return 2 if self.skip_reshape else 1

    @property
    def n_q(self) -> int:
        return int(self.q.shape[self.tdim])

    @property
    def n_k(self) -> int:
        return int(self.k.shape[self.tdim])

    @property
    def transformer_options(self) -> dict:
        to = self.kwargs.get("transformer_options")
        return to if isinstance(to, dict) else {}

    def rebuilt(self, q=None, k=None, v=None, mask=None, replace_mask: bool = False) -> tuple[tuple, dict]:
        """(args, kwargs) with q/k/v (and the mask, when ``replace_mask``) replaced."""
        args = list(self.args)
        kwargs = dict(self.kwargs)
        for i, t in enumerate((q, k, v)):
            if t is not None:
                args[i] = t
        if replace_mask:
            if len(args) > 4:
                args[4] = mask
            else:
                kwargs["mask"] = mask
        return tuple(args), kwargs


def parse_attention(args: tuple, kwargs: dict) -> Optional[AttnCall]:
    if len(args) < 3 or not all(torch.is_tensor(t) for t in args[:3]):
        return None
    heads = args[3] if len(args) > 3 else kwargs.get("heads")
    mask = args[4] if len(args) > 4 else kwargs.get("mask")
    skip = args[6] if len(args) > 6 else kwargs.get("skip_reshape", False)
    q = args[0]
    if heads is None or q.ndim != (4 if skip else 3):
        return None
    return AttnCall(tuple(args), dict(kwargs), q, args[1], args[2], heads, mask, bool(skip))


def sequence_kind(call: AttnCall, layout: Optional[TokenLayout]) -> Optional[str]:
    """"joint" (text + image), "image" (image tokens only) for a self-attention over this call's tokens,
    None for anything else (cross-attention, another model's call, a sequence someone shortened)."""
    if layout is None or call.n_q != call.n_k:
        return None
    return layout.sequence(call.n_q)


def key_sequence_kind(call: AttnCall, layout: Optional[TokenLayout]) -> Optional[str]:
    """Like :func:`sequence_kind` for the *keys* alone: a joint key sequence (text + image, text present) is
    recognised whatever the queries are (T-GATE on a joint DiT queries with a one-token text stand-in); an
    image-only key sequence only in a self-attention (Wan's cross-attention keys are text)."""
    if layout is None:
        return None
    if layout.txt and call.n_k == layout.joint and call.n_q <= call.n_k:
        return "joint"
    return sequence_kind(call, layout)


def select_mask_columns(mask, idx: torch.Tensor, n_k: int):
    """An attention mask with only the key columns ``idx`` (any mask whose last dim is the key length)."""
    if mask is None or not torch.is_tensor(mask) or mask.ndim == 0 or mask.shape[-1] != n_k:
        return mask
    return mask.index_select(mask.ndim - 1, idx.to(mask.device))


def pixels(layout: TokenLayout) -> tuple[int, int]:
    """Approximate image size in pixels of a layout's main grid (16 px per token: VAE 8 x patch 2)."""
    g = layout.main_grid
    return g.h * 16, g.w * 16


__all__ = ["LAYOUT_KEY", "BLOCK_KEY", "DIT_FAMILIES", "layout_for_call", "skipped_blocks", "apply_args", "with_transformer_options",
           "with_layout", "layout_of", "block_of", "tagged_args", "tag_blocks", "block_order", "AttnCall",
           "parse_attention", "sequence_kind", "key_sequence_kind", "select_mask_columns", "pixels"]
