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
from .sites import (ROLE_KEY, BlockSite, ModelInfo, RoleSequence, add_block_replace, block_sites, mro_names,
                    patch_forward)

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


def block_roles(dm, info: ModelInfo, site: BlockSite) -> Optional[tuple]:
    """The roles of a block's kernel calls in call order, where the block replace is the site that knows them:
    Flux/Chroma and Qwen-Image blocks make one joint (text + image) call; SD3 joint blocks too, and SD3.5's dual
    blocks then an image-only self-attention.  None for Wan (its attention modules are tagged one by one)."""
    if info.family in ("flux", "qwen"):
        return ("joint",)
    if info.family == "sd3":
        dual = getattr(getattr(dm.get_submodule(site.path), "x_block", None), "x_block_self_attn", False)
        return ("joint", "self") if dual else ("joint",)
    return None


def wan_attention_role(module) -> Optional[str]:
    """"cross" for Wan's cross-attention modules (text, CLIP image, HuMo audio), "self" for its self-attention."""
    names = mro_names(module)
    if "WanSelfAttention" not in names:
        return None
    return "cross" if "CrossAttention" in type(module).__name__ else "self"


def _role_forward(orig, role: str):
    def forward(*args, **kwargs):
        to = kwargs.get("transformer_options")
        if isinstance(to, dict):
            kwargs["transformer_options"] = {**to, ROLE_KEY: role}
        return orig(*args, **kwargs)
    return forward


def tag_blocks(model, info: ModelInfo) -> list[BlockSite]:
    """Tag every DiT attention call with its site, once per clone: a block replace in front of every block with
    a replace hook names the block (:data:`BLOCK_KEY`) and, where the block knows them, its calls' roles
    (:data:`ROLE_KEY`, :func:`block_roles`); on Wan an object patch of each attention module's ``forward`` names
    its role.  Returns the block sites."""
    sites = block_sites(model, info)
    to = model.model_options.setdefault("transformer_options", {})
    if to.get(TAGGED_KEY):
        return sites
    dm = model.model.diffusion_model
    for site in sites:
        if site.replace_key is None:
            continue
        roles = block_roles(dm, info, site)

        def tag(args, extra, s=site, r=roles):
            role = {} if r is None else {ROLE_KEY: r[0] if len(r) == 1 else RoleSequence(r)}
            return extra["original_block"](tagged_args(args, s, **role))
        add_block_replace(model, site, tag)
    if info.family == "wan":
        for name, module in dm.named_modules():
            role = wan_attention_role(module)
            if role is not None:
                patch_forward(model, name, lambda orig, r=role: _role_forward(orig, r))
    to[TAGGED_KEY] = True
    return sites


def role_of(call: "AttnCall") -> Optional[str]:
    """"self", "cross" or "joint" from the site that made the kernel call; None when no FreeSpeed site tagged it
    (another model's call, a module FreeSpeed does not know)."""
    role = call.transformer_options.get(ROLE_KEY)
    return role if isinstance(role, str) else None


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


def key_sequence_kind(call: AttnCall, layout: Optional[TokenLayout]) -> Optional[str]:
    """"joint" (text + image) or "image" (image tokens only) for the *keys* of a self- or joint attention call
    (its role from the site, :func:`role_of`) whose keys are this call's whole sequence, whatever the queries are
    (T-GATE on a joint DiT queries with a one-token text stand-in); None for anything else (cross-attention, an
    untagged call, keys someone shortened)."""
    role = role_of(call)
    if layout is None or role not in ("self", "joint"):
        return None
    kind = layout.sequence(call.n_k)
    return kind if role == "joint" or kind == "image" else None


def sequence_kind(call: AttnCall, layout: Optional[TokenLayout]) -> Optional[str]:
    """:func:`key_sequence_kind` of a call whose queries are its whole sequence too (none stripped or pruned)."""
    return key_sequence_kind(call, layout) if call.n_q == call.n_k else None


def select_mask_columns(mask, idx: torch.Tensor, n_k: int):
    """An attention mask with only the key columns ``idx`` (any mask whose last dim is the key length)."""
    if mask is None or not torch.is_tensor(mask) or mask.ndim == 0 or mask.shape[-1] != n_k:
        return mask
    return mask.index_select(mask.ndim - 1, idx.to(mask.device))


# the VAE's spatial downscale by latent format (any class in the MRO; ComfyUI 0.3.64's latent formats do not
# carry it): Wan 2.2's VAE is 16x (48 channels), ChromaRadiance samples pixels; the others here are 8x
_VAE_DOWNSCALE = (("Wan22", 16), ("ChromaRadiance", 1))


def pixels_per_token(model, info: ModelInfo) -> tuple[int, int]:
    """(h, w) pixels one image token of a DiT covers: the VAE's downscale x the patch size (Flux/SD3/Qwen-Image/
    PixArt 8 x 2 = 16; Wan 2.1 8 x 2 = 16; Wan 2.2 5B 16 x 2 = 32)."""
    fmt = model.model.latent_format
    down = getattr(fmt, "spacial_downscale_ratio", None)
    if down is None:
        names = mro_names(fmt)
        down = next((d for cls, d in _VAE_DOWNSCALE if cls in names), 8)
    dm = model.model.diffusion_model
    if info.family == "wan":
        ph, pw = (int(v) for v in tuple(dm.patch_size)[1:])
    elif info.family == "sd3":
        ph, pw = (int(v) for v in dm.x_embedder.patch_size)
    else:
        ph = pw = int(getattr(dm, "patch_size", 2))
    return int(down) * ph, int(down) * pw


def pixels(layout: TokenLayout, per_token: tuple[int, int] = (16, 16)) -> tuple[int, int]:
    """Image size in pixels of a layout's main grid, ``per_token`` from :func:`pixels_per_token`."""
    g = layout.main_grid
    return g.h * per_token[0], g.w * per_token[1]


__all__ = ["LAYOUT_KEY", "BLOCK_KEY", "DIT_FAMILIES", "layout_for_call", "skipped_blocks", "apply_args", "with_transformer_options",
           "with_layout", "layout_of", "block_of", "tagged_args", "tag_blocks", "block_order", "AttnCall",
           "parse_attention", "role_of", "block_roles", "wan_attention_role", "sequence_kind", "key_sequence_kind",
           "select_mask_columns", "pixels_per_token", "pixels"]
