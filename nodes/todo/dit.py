"""ToDo on DiTs (issue 16): in the back blocks only (``dit_blocks_from``, default the back half, as PixArt-Σ's
trained K/V compression; docs/dit-defaults.md), only the *image* keys/values are downsampled, on their 2-D grid (per frame on
Wan; reference latents as their own grids); every query and every text token's key/value is kept, and an
attention mask keeps the matching key columns.  Hooks: the chained attention override (Flux/Chroma, SD3,
Wan, Qwen-Image) with the call's token layout from ``nodes/dit.py``; PixArt, whose attention gets no
``transformer_options``, through an object patch of each ``blocks.N.attn.forward`` that runs ComfyUI's own
``AttentionKVCompress.forward`` with its built-in strided K/V compression switched on for the call.
Design notes (RoPE, nearest vs avg-pool, AttentionKVCompress): docs/todo.md.
"""
from __future__ import annotations

import math
from typing import Optional

import comfy.patcher_extension as pe

from ...core.tokens import band_factor, downsample_tokens, kept_kv_tokens, kv_index
from ..dit import (block_of, block_order, key_sequence_kind, layout_of, parse_attention, pixels, pixels_per_token,
                   select_mask_columns, tag_blocks, with_layout)
from ..hooks import logger
from ..sites import add_attention_override, block_sites, forward_is_patched, patch_forward
from .config import ToDoRun
from .unet import ToDo


class _KVCompressProxy:
    """``self`` for ComfyUI's ``AttentionKVCompress.forward``: the module's attributes, with its K/V compression
    (``sr_ratio``, ``sampling="uniform"``: strided, i.e. nearest) set for this one call."""

    def __init__(self, module, ratio: int):
        object.__setattr__(self, "_module", module)
        object.__setattr__(self, "sr_ratio", int(ratio))
        object.__setattr__(self, "sampling", "uniform")

    def __getattr__(self, name):
        return getattr(object.__getattribute__(self, "_module"), name)


def pixart_compressible(module) -> bool:
    """Whether a PixArt attention module has ComfyUI's K/V compression path and no trained compression."""
    return (hasattr(module, "downsample_2d") and int(getattr(module, "sr_ratio", 0)) == 1
            and hasattr(module, "qkv") and hasattr(module, "num_heads"))


class ToDoDiT(ToDo):
    """ToDo on a DiT (same key, config and stats as the UNet ToDo)."""

    def __init__(self, config, info, node_id: Optional[str] = None):
        super().__init__(config, info, node_id)
        self.dm = None
        self.pixart_blocks = 0
        self.per_token = (16, 16)                       # pixels per image token (VAE downscale x patch)
        self.order: dict = {}                           # (block kind, index) -> position in forward order
        self.first = 0                                  # the first block (position) ToDo downsamples in

    def install(self, model) -> None:
        super(ToDo, self).install(model)              # the run wrappers only: no UNet attn1 patch
        self.dm = model.model.diffusion_model
        self.per_token = pixels_per_token(model, self.info)
        if self.config.off:
            return
        model.add_wrapper_with_key(pe.WrappersMP.APPLY_MODEL, self.key, self._apply_model)
        sites = block_sites(model, self.info)
        self.order = block_order(sites)
        self.first = math.ceil(self.config.dit_blocks_from * len(sites))
        if self.info.family != "pixart":
            tag_blocks(model, self.info)
            add_attention_override(model, self._override)
            return
        for site in sites[self.first:]:
            path = f"{site.path}.attn"
            module = self.dm.get_submodule(path)
            if not pixart_compressible(module):
                continue
            if patch_forward(model, path, lambda orig, m=module: self._pixart_forward(m, orig), leave_patched=True):
                self.pixart_blocks += 1
        if not self.pixart_blocks:
            logger.warning("FreeSpeed ToDo: no PixArt attention module could be patched (another node patched them, "
                           "or ComfyUI's AttentionKVCompress changed)")

    # -- the call's layout ------------------------------------------------------------------------
    def _apply_model(self, executor, x, t, *args, **kwargs):
        run = self.run
        if run is None:
            return executor(x, t, *args, **kwargs)
        args, kwargs, layout = with_layout(self.info, self.dm, x, args, kwargs)
        prev, run.layout = run.layout, layout
        try:
            return executor(x, t, *args, **kwargs)
        finally:
            run.layout = prev

    def _factor(self, layout) -> float:
        return band_factor(*pixels(layout, self.per_token)) if self.config.bands else float(self.config.factors[0])

    def _decide(self, run: ToDoRun, layout) -> float:
        """The factor for a call over this layout's tokens, 1 when it stays full (counted)."""
        st = run.stats
        factor = self._factor(layout)
        if factor <= 1.0:
            st.full_attention_calls += 1
            return 1.0
        if not run.in_window(self.config.start_percent, self.config.end_percent):
            st.outside_window_calls += 1
            return 1.0
        return factor

    def _count(self, run: ToDoRun, layout, factor: float, joint: bool) -> None:
        st = run.stats
        segs = layout.segments(False)
        before, after = layout.img, kept_kv_tokens(segs, factor)
        st.downsampled_calls += 1
        st.calls_per_level["image"] = st.calls_per_level.get("image", 0) + 1
        run.kv_before += before
        run.kv_after += after
        run.kv_shapes["image"] = (before, after)
        run.factors_used.add(factor)
        if joint:
            st.text_kv_tokens = layout.txt

    # -- the attention override (Flux, SD3, Wan, Qwen-Image) --------------------------------------------
    def _override(self, call_next, func, *args, **kwargs):
        run = self.run
        call = parse_attention(args, kwargs) if run is not None else None
        if call is None:
            return call_next(func, *args, **kwargs)
        layout = layout_of(call.transformer_options)
        kind = key_sequence_kind(call, layout)
        if kind is None:
            if layout is not None:
                run.stats.untouched_non_grid += 1       # cross-attention (Wan), a K/V someone already shortened
            return call_next(func, *args, **kwargs)
        block = block_of(call.transformer_options)
        if block is None or self.order.get((block.kind, block.index), -1) < self.first:
            run.stats.full_attention_calls += 1         # a front block (dit_blocks_from), or a call of no known block
            return call_next(func, *args, **kwargs)
        factor = self._decide(run, layout)
        if factor <= 1.0:
            return call_next(func, *args, **kwargs)
        segs = layout.segments(kind == "joint")
        method = self.config.method
        k = downsample_tokens(call.k, call.tdim, segs, factor, method)
        v = k if call.v is call.k else downsample_tokens(call.v, call.tdim, segs, factor, method)
        mask = select_mask_columns(call.mask, kv_index(segs, factor), call.n_k)
        self._count(run, layout, factor, kind == "joint")
        args, kwargs = call.rebuilt(k=k, v=v, mask=mask, replace_mask=call.mask is not None)
        return call_next(func, *args, **kwargs)

    # -- PixArt: ComfyUI's own K/V compression path, switched on per call -----------------------------
    def _pixart_forward(self, module, orig):
        tech = self

        def forward(x, mask=None, HW=None, block_id=None, **kwargs):
            run = tech.run
            layout = getattr(run, "layout", None) if run is not None else None
            if layout is None or mask is not None or kwargs or x.shape[1] != layout.img or len(layout.groups) != 1:
                return orig(x, mask=mask, HW=HW, block_id=block_id, **kwargs)
            factor = tech._decide(run, layout)
            if factor <= 1.0:
                return orig(x, mask=mask, HW=HW, block_id=block_id)
            g = layout.main_grid
            f = int(factor)
            if (tech.config.method != "nearest" or f != factor or g.h % f or g.w % f
                    or forward_is_patched(orig, module)):
                run.stats.untouched_non_grid += 1      # strided compression needs an integer factor dividing the grid
                return orig(x, mask=mask, HW=HW, block_id=block_id)
            tech._count(run, layout, factor, False)
            return type(module).forward(_KVCompressProxy(module, f), x, mask=mask, HW=(g.h, g.w), block_id=block_id)
        return forward


__all__ = ["ToDoDiT", "pixart_compressible"]
