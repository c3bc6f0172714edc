"""FreeSpeed Attention Map Reuse (Hunter et al., arXiv 2401.01008; no official code): keep-steps compute
attention explicitly and keep the maps, reuse steps apply a kept map to the current V.  Schedules and keys
are in ``core/mapreuse.py``, explicit attention in ``core/attention.py``; design notes: docs/mapreuse.md.
"""
from __future__ import annotations

from typing import Optional

import torch

from ...core.attention import explicit_attention, map_times_v
from ...core.batch import BatchLayout
from ...core.cache import CacheStore
from ...core.mapreuse import ORIGINAL, REUSE, format_percents, map_bytes, map_key, resolve_plan
from ...core.stats import MapReuseStats
from ..hooks import RunContext, Technique, logger
from ..sites import AttentionSite, ModelInfo, attention_sites, patch_forward
from .config import MAP_DTYPES, MapReuseConfig, MapReuseRun


class MapReuse(Technique[MapReuseRun]):
    name = "Attention Map Reuse"
    key = "freespeed.mapreuse"
    stats_type = MapReuseStats

    def __init__(self, config: MapReuseConfig, info: ModelInfo, node_id: Optional[str] = None):
        super().__init__(config, info, node_id)
        self.sites: list[AttentionSite] = []
        self.foreign: list[str] = []          # chosen sites whose forward another node patched
        self.last_schedule = None
        self.dtype = MAP_DTYPES[config.map_dtype]
        self.refresh_every = config.refresh_every if info.is_unet else config.dit_refresh_every

    def install(self, model) -> None:
        super().install(model)
        dm = model.model.diffusion_model
        self.patch_sites(model, [s for s in attention_sites(model, self.info) if self.config.wants(s)],
                         lambda s, orig: self._forward(s, dm.get_submodule(s.path), orig))

    def patch_sites(self, model, sites: list, make) -> None:
        """Object-patch each site's forward with ``make(site, orig)``; a forward another node patched
        (T-GATE) is left to it, since it may skip the layer altogether: counted, logged once."""
        for site in sites:
            if patch_forward(model, site.path, lambda orig, s=site: make(s, orig), leave_patched=True):
                self.sites.append(site)
            else:
                self.foreign.append(site.path)
        if self.foreign:
            logger.info("FreeSpeed %s: %d attention layers are already patched by another node (e.g. T-GATE) and are "
                        "left to it", self.name, len(self.foreign))

    def new_run(self, ctx: RunContext) -> MapReuseRun:
        cfg = self.config
        self.last_schedule = ctx.schedule
        return MapReuseRun(ctx, MapReuseStats(schedule=cfg.schedule),
                           plan=resolve_plan(ctx.schedule, cfg.schedule, cfg.start, self.refresh_every, cfg.percents),
                           store=CacheStore(budget_bytes=int(cfg.cache_limit_mb * 2 ** 20), offload=cfg.cache_on_cpu))

    # -- the patched forward ----------------------------------------------------------------------
    def action(self) -> tuple:
        """(run, action) for a patched forward: the plan's action at the current step, ORIGINAL outside a
        sampling step (UNet and DiT paths)."""
        run = self.run
        info = run.current if run is not None else None
        return run, (run.plan.action(info.step, info.extra) if info is not None else ORIGINAL)

    def _forward(self, site: AttentionSite, module, orig):
        tech = self
        names = ("context", "value", "mask", "transformer_options")

        def forward(x, *args, **kwargs):
            run, act = tech.action()
            if act == ORIGINAL:
                return orig(x, *args, **kwargs)
            got = dict(zip(names, args))
            got.update({k: v for k, v in kwargs.items() if k in names})
            if got.get("mask") is not None:
                run.stats.original_calls_masked += 1
                return orig(x, *args, **kwargs)
            context = x if got.get("context") is None else got["context"]
            value = context if got.get("value") is None else got["value"]
            if context.shape[0] != x.shape[0] or value.shape[0] != x.shape[0]:
                # queries regrouped by another node's attn1 patch (HyperTile's tiles): not one map per sample
                run.stats.original_calls_batch_mismatch += 1
                return orig(x, *args, **kwargs)
            layout = BatchLayout.from_options(got.get("transformer_options"), x.shape[0])
            if act == REUSE:
                out = tech._reuse(run, site, module, x, context, value, layout)
                if out is None and tech._never_kept(run, site, layout):
                    # the keep step never reached this layer (LazyCache/EasyCache skipped it): keep maps now
                    out = tech._keep(run, site, module, x, context, value, layout)
            else:
                out = tech._keep(run, site, module, x, context, value, layout)
            return orig(x, *args, **kwargs) if out is None else out
        return forward

    def _keep(self, run: MapReuseRun, site, module, x, context, value, layout: BatchLayout) -> Optional[torch.Tensor]:
        heads, nq, nk = module.heads, x.shape[1], context.shape[1]
        store, chunks = run.store, layout.chunks()
        keys = [map_key(site.path, c.branch, c.uuid, nq, nk) for c in chunks]
        for k in keys:                      # a refresh replaces this layer's maps
            store.pop(k)
        if not store.fits(sum(map_bytes(layout.per, heads, nq, nk, self.dtype) for _ in chunks)):
            run.left_alone.add(site.path)
            run.stats.keep_calls_left_alone += 1
            return None
        q, k, v = module.to_q(x), module.to_k(context), module.to_v(value)
        outs = []
        for c, key in zip(chunks, keys):
            out, amap = explicit_attention(q[c.rows], k[c.rows], v[c.rows], heads, self.dtype)   # a branch at a time
            outs.append(out)
            if store.put(key, amap):
                run.kept_shape[(site.path, c.branch, c.uuid)] = (nq, nk)
            else:                                              # cannot happen after fits(); be safe
                run.left_alone.add(site.path)
            del amap
        run.stats.keep_calls += 1
        return module.to_out(torch.cat(outs, dim=0) if len(outs) > 1 else outs[0])

    @staticmethod
    def _never_kept(run: MapReuseRun, site, layout: BatchLayout) -> bool:
        return site.path not in run.left_alone and not any(
            (site.path, c.branch, c.uuid) in run.kept_shape for c in layout.chunks())

    def _reuse(self, run: MapReuseRun, site, module, x, context, value, layout: BatchLayout) -> Optional[torch.Tensor]:
        nq, nk = x.shape[1], context.shape[1]
        st, maps = run.stats, []
        for c in layout.chunks():
            m = run.store.get(map_key(site.path, c.branch, c.uuid, nq, nk), device=x.device)
            if m is None or m.shape[0] != layout.per:
                shape = run.kept_shape.get((site.path, c.branch, c.uuid))
                if site.path in run.left_alone:
                    st.reuse_calls_left_alone += 1
                elif shape is not None and shape != (nq, nk):
                    st.reuse_fallback_token_mismatch += 1
                else:
                    st.reuse_fallback_no_map += 1
                return None
            maps.append(m)
        v = module.to_v(value)
        outs = [map_times_v(m, v[c.rows], module.heads) for m, c in zip(maps, layout.chunks())]
        st.reuse_calls += 1
        run.reused_sites.add(site.path)
        return module.to_out(torch.cat(outs, dim=0) if len(outs) > 1 else outs[0])

    def finish_stats(self, run: MapReuseRun) -> None:
        s, cfg, plan, store = run.stats, self.config, run.plan, run.store
        if cfg.schedule == "late":
            s.start_pct, s.refresh_every = round(100 * cfg.start, 1), self.refresh_every
        elif cfg.schedule == "custom":
            s.percents = format_percents(cfg.percents)
        s.reuse_steps, s.keep_steps = plan.reuse_steps, plan.keep_steps
        s.layers_patched, s.layers_left_to_other_node = len(self.sites), len(self.foreign)
        s.layers_left_alone_budget, s.layers_reused = len(run.left_alone), len(run.reused_sites)
        st = store.stats
        s.cache = {"entries": len(store), "bytes": st.bytes, "peak_bytes": st.peak_bytes, "rejected": st.rejected,
                   "budget_bytes": store.budget_bytes, "on_cpu": cfg.cache_on_cpu, "dtype": cfg.map_dtype}
        s.cache_peak_mb = round(st.peak_bytes / 2 ** 20, 2)
        store.clear()
        run.kept_shape.clear()
