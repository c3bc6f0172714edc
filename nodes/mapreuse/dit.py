"""Attention reuse on DiTs (issue 15; Hunter et al.'s late-reuse idea, arXiv 2401.01008).  Maps are not
feasible on DiTs (Flux at 1024²: ~1 GB per block and sample, and no fused kernel returns them), so each block's
attention *output* is kept at a keep step and returned at the reuse steps of the same schedules as on UNets
(late / custom; ``core/mapreuse.py``), within a byte budget (``core.cache.CacheStore``).

Hooks: the chained attention override (Flux/Chroma, SD3, Wan, Qwen-Image), with the block identity injected by
a chained ``dit`` block replace (``nodes/dit.tag_blocks``): a reuse step skips the kernel (QKᵀ, softmax, ·V)
of the reused blocks; the projections around it still run (they are inline in the block's forward).  PixArt
(no ``transformer_options`` reach its attention): object patches of ``blocks.N.attn`` / ``blocks.N.cross_attn``
``forward``, which skip the projections too.  Keys: block and the call's role from its site (``nodes/dit.role_of``:
a block's self-, cross- and SD3.5 dual attention apart, whatever their token counts), the (query, key) token
counts, branch (``cond_or_uncond`` + uuid, ``core.batch.BatchLayout``).
"""
from __future__ import annotations

from typing import Optional

import torch

from ...core.batch import BatchLayout
from ...core.cache import tensor_bytes
from ...core.mapreuse import KEEP, ORIGINAL, REUSE
import comfy.patcher_extension as pe

from ..dit import apply_args, block_of, parse_attention, role_of, tag_blocks
from .unet import MapReuse
from .config import MapReuseRun
from ..sites import add_attention_override, attention_sites


def output_key(block, branch, uuid, n_q: int, n_k: int) -> tuple:
    return ("out", block, branch, uuid, int(n_q), int(n_k))


class MapReuseDiT(MapReuse):
    """Attention-output reuse on a DiT (same key, config, schedules and stats as Map Reuse)."""

    def install(self, model) -> None:
        super(MapReuse, self).install(model)             # the run wrappers only
        if self.info.family == "pixart":
            model.add_wrapper_with_key(pe.WrappersMP.APPLY_MODEL, self.key, self._apply_model)
            self.patch_sites(model, [s for s in attention_sites(model, self.info) if self.config.wants_dit(s.kind)],
                             self._module_forward)
            return
        self.sites = [s for s in tag_blocks(model, self.info) if s.replace_key is not None]
        add_attention_override(model, self._override)

    # -- the attention override -------------------------------------------------------------------------
    def _override(self, call_next, func, *args, **kwargs):
        run = self.run
        info = run.current if run is not None else None
        act = run.plan.action(info.step, info.extra) if info is not None else ORIGINAL
        call = parse_attention(args, kwargs) if act != ORIGINAL else None
        block = block_of(call.transformer_options) if call is not None else None
        role = role_of(call) if block is not None else None
        if role is None or not self.config.wants_dit("cross" if role == "cross" else "self"):
            return call_next(func, *args, **kwargs)
        if call.mask is not None:
            run.stats.original_calls_masked += 1
            return call_next(func, *args, **kwargs)
        layout = BatchLayout.from_options(call.transformer_options, call.q.shape[0])
        keys = [output_key((block, role), c.branch, c.uuid, call.n_q, call.n_k) for c in layout.chunks()]
        if act == REUSE:
            out = self._reuse(run, block, keys, layout, call.q)
            if out is not None:
                return out
        out = call_next(func, *args, **kwargs)
        if act == KEEP or self._never_kept_dit(run, block, act, keys):
            self._keep(run, block, keys, layout, out)
        return out

    # -- PixArt: object patches of the attention modules ----------------------------------------------------
    def _apply_model(self, executor, x, t, *args, **kwargs):
        """PixArt's attention gets no ``transformer_options``: keep the call's (for its batch layout)."""
        run = self.run
        if run is None:
            return executor(x, t, *args, **kwargs)
        prev, run.options = run.options, apply_args(args, kwargs).get("transformer_options")
        try:
            return executor(x, t, *args, **kwargs)
        finally:
            run.options = prev

    def _module_forward(self, site, orig):
        tech = self

        def forward(x, *args, **kwargs):
            run, act = tech.action()
            if act == ORIGINAL:
                return orig(x, *args, **kwargs)
            n_k = args[0].shape[1] if args and torch.is_tensor(args[0]) else x.shape[1]    # cross: the text
            layout = BatchLayout.from_options(getattr(run, "options", None), x.shape[0])
            keys = [output_key(site.path, c.branch, c.uuid, x.shape[1], n_k) for c in layout.chunks()]
            if act == REUSE:
                out = tech._reuse(run, site.path, keys, layout, x)
                if out is not None:
                    return out
            out = orig(x, *args, **kwargs)
            if act == KEEP or tech._never_kept_dit(run, site.path, act, keys):
                tech._keep(run, site.path, keys, layout, out)
            return out
        return forward

    # -- keep / reuse ---------------------------------------------------------------------------------
    @staticmethod
    def _never_kept_dit(run: MapReuseRun, block, act, keys) -> bool:
        """A reuse step with nothing kept for this block (EasyCache/LazyCache skipped the keep step): keep now."""
        return act == REUSE and block not in run.left_alone and not any(k in run.store for k in keys)

    def _keep(self, run: MapReuseRun, block, keys, layout: BatchLayout, out: torch.Tensor) -> None:
        store = run.store
        for k in keys:
            store.pop(k)
        if out.shape[0] != layout.size:
            run.stats.keep_calls_left_alone += 1
            return
        kept = out.detach().to(self.dtype) if out.is_floating_point() else out.detach()
        if not store.fits(tensor_bytes(kept)):
            run.left_alone.add(block)
            run.stats.keep_calls_left_alone += 1
            return
        for c, k in zip(layout.chunks(), keys):
            store.put(k, kept[c.rows].clone())
        run.stats.keep_calls += 1

    def finish_stats(self, run: MapReuseRun) -> None:
        super().finish_stats(run)
        run.stats.reuses = "outputs"

    def _reuse(self, run: MapReuseRun, block, keys, layout: BatchLayout, q: torch.Tensor) -> Optional[torch.Tensor]:
        parts = []
        for k in keys:
            t = run.store.get(k, device=q.device)
            if t is None or t.shape[0] != layout.per:
                st = run.stats
                if block in run.left_alone:
                    st.reuse_calls_left_alone += 1
                else:
                    st.reuse_fallback_no_map += 1
                return None
            parts.append(t)
        run.stats.reuse_calls += 1
        run.reused_sites.add(block)
        out = torch.cat(parts, dim=0) if len(parts) > 1 else parts[0].clone()
        return out.to(q.dtype)


__all__ = ["MapReuseDiT", "output_key"]
