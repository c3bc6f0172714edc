"""FreeSpeed T-GATE (arXiv 2404.02747; official code ``tgate``): after the gate, cross-attention returns
its cached output (the CFG mean at the cache step) and CFG is dropped.  Decisions and the branch mean are
in ``core/gating.py`` and ``core/cache.py``; design notes (hooks, branches, IP-Adapter): docs/tgate.md.
"""
from __future__ import annotations

from typing import Optional

import torch

import comfy.patcher_extension as pe

from ...core.batch import BatchLayout, guider_roles
from ...core.cache import BranchAccumulator, CacheStore
from ...core.gating import CACHE, COMPUTE, REUSE, GatePlan, branch_mean, gate_actions
from ...core.stats import TGateStats
from ..hooks import RunContext, Technique, logger
from ..sites import AttentionSite, ModelInfo, patch_forward
from .config import COND, Call, TGateConfig, TGateRun, UNCOND


class TGate(Technique[TGateRun]):
    name = "T-GATE"
    key = "freespeed.tgate"
    stats_type = TGateStats

    def __init__(self, config: TGateConfig, info: ModelInfo, sites: list[AttentionSite],
                 node_id: Optional[str] = None):
        super().__init__(config, info, node_id)
        self.gate = config.gate_for(info)
        self.sites = [s for s in sites if s.kind == "cross" or config.self_attention]
        self.modules: dict[str, torch.nn.Module] = {}

    def install(self, model) -> None:
        super().install(model)
        model.add_wrapper_with_key(pe.WrappersMP.CALC_COND_BATCH, self.key, self._calc_cond_batch)
        model.add_wrapper_with_key(pe.WrappersMP.APPLY_MODEL, self.key, self._apply_model)
        if self.gate >= 1.0:
            return              # gate 100%: no layer patched, so other nodes (Map Reuse) keep theirs
        dm = model.model.diffusion_model
        for site in self.sites:
            self.modules[site.path] = dm.get_submodule(site.path)
            make = self._cross_forward if site.kind == "cross" else self._self_forward
            patch_forward(model, site.path, lambda orig, s=site, mk=make: mk(s, orig))

    def new_run(self, ctx: RunContext) -> TGateRun:
        cfg = self.config
        store = CacheStore(budget_bytes=int(cfg.cache_limit_mb * 2 ** 20), offload=cfg.cache_on_cpu)
        return TGateRun(ctx, TGateStats(keep_cfg=cfg.keep_cfg, self_attention=cfg.self_attention),
                        plan=GatePlan.from_schedule(ctx.schedule, self.gate), store=store,
                        attn2=BranchAccumulator(store))

    # -- wrappers ---------------------------------------------------------------------------------
    def _calc_cond_batch(self, executor, model, conds, x_in, timestep, model_options):
        run = self.run
        ev = run.eval if run is not None else None
        if ev is None:
            return executor(model, conds, x_in, timestep, model_options)
        main = not ev.main_started           # the evaluation's own pass comes first; SAG/PAG passes later
        ev.main_started = True
        if main and run.left_alone is None and len(conds) > 2 and not run.plan.off:
            run.left_alone = type(ev.guider).__name__
            logger.warning("FreeSpeed T-GATE: the guider %s evaluates %d conditionings per step (PerpNeg: positive, "
                           "negative and empty prompt); T-GATE freezes cross-attention to one mean, which would make "
                           "them identical (PerpNeg's projection becomes 0/0), so it leaves this run unchanged",
                           run.left_alone, len(conds))
        if run.left_alone:
            return executor(model, conds, x_in, timestep, model_options)
        if run.keep_uncond is None:
            holder = (model_options.get("transformer_options") or {}).get("easycache")
            run.keep_uncond = type(holder).__name__ == "EasyCacheHolder"
            if run.keep_uncond and not self.config.keep_cfg and not run.plan.off:
                logger.warning("FreeSpeed T-GATE: EasyCache decides its skips on the first conditioning it sees (the "
                               "negative prompt), so after the gate T-GATE keeps evaluating the negative prompt (as "
                               "keep_cfg) instead of dropping it; cross-attention stays frozen")
        prev = run.batch
        by_key = getattr(ev.guider, "conds", None) or {}
        roles = guider_roles(conds, by_key.get("positive"), by_key.get("negative"), (COND, UNCOND)) if main else {}
        run.batch = (ev.index if main else None, roles)
        try:
            plan, st = run.plan, run.stats
            if (main and not self.config.keep_cfg and not run.keep_uncond and run.attn2.latest_round is not None
                    and len(conds) == 2
                    and conds[1] is not None and roles.get(0) == COND and roles.get(1) == UNCOND
                    and plan.after(ev.info.sigma)):
                out = executor(model, [conds[0], None], x_in, timestep, model_options)
                st.uncond_evaluations_skipped += 1
                return [out[0], out[0]]
            if main and len(conds) >= 2 and conds[1] is not None:
                st.uncond_evaluations += 1
            return executor(model, conds, x_in, timestep, model_options)
        finally:
            run.batch = prev

    def _apply_model(self, executor, x, t, *args, **kwargs):
        run = self.run
        ev = run.eval if run is not None else None
        if ev is None:
            return executor(x, t, *args, **kwargs)
        to_in_kwargs = "transformer_options" in kwargs
        to = kwargs.get("transformer_options") if to_in_kwargs else (args[3] if len(args) > 3 else None)
        to = to if isinstance(to, dict) else {}
        layout = BatchLayout.from_options(to, x.shape[0])
        round_id, roles_by_index = run.batch or (None, {})
        roles = layout.roles(roles_by_index) if round_id is not None else (None,) * len(layout.branches)
        info, cfg = ev.info, self.config
        latest = run.attn2.latest_round
        attn2, attn1 = gate_actions(run.plan, info.sigma, info.step, info.extra, round_id is not None,
                                    any(r is not None for r in roles), latest is not None and latest != round_id,
                                    (cfg.sa_warmup, cfg.sa_interval) if cfg.self_attention else None)
        ctx = self.adjust_call(run, Call(attn2, attn1, roles, layout, round_id), to, kwargs)
        replace = ((to.get("patches_replace") or {}).get("attn2") or {})
        if replace and attn2 in (CACHE, REUSE):
            new_to = dict(to)
            new_to["patches_replace"] = dict(new_to.get("patches_replace") or {})
            new_to["patches_replace"]["attn2"] = self._replace_for_call(run, replace, attn2)
            if to_in_kwargs:
                kwargs = dict(kwargs, transformer_options=new_to)
            else:
                args = args[:3] + (new_to,) + args[4:]
        prev, run.call = run.call, ctx
        try:
            return executor(x, t, *args, **kwargs)
        finally:
            run.call = prev

    def adjust_call(self, run: TGateRun, ctx: Call, to: dict, kwargs: dict) -> Call:
        """The call's decision as this model can carry it out (joint-attention DiTs: ``nodes/tgate/dit.py``)."""
        return ctx

    # -- attn2 replace patches (IP-Adapter and the like) --------------------------------------------
    def _replace_for_call(self, run: TGateRun, replace: dict, mode: str) -> dict:
        """This call's attn2 replace patches: wrapped to capture (cache step) or dropped (reuse)."""
        out = {}
        for key, fn in replace.items():
            if mode == REUSE:
                covered = [s for s in self.sites if s.kind == "cross" and s.key[:len(key)] == tuple(key)]
                if covered and all(run.attn2.has(s.key) for s in covered):
                    run.stats.attn2_replace_calls_dropped_after_gate += len(covered)
                    continue                     # the block falls through to the patched forward
                out[key] = fn
            else:
                out[key] = self._capturing_replace(fn)
        return out

    def _capturing_replace(self, fn):
        def replace(q, k, v, extra_options):
            res = fn(q, k, v, extra_options)
            run = self.run
            ctx = run.call if run is not None else None
            block = extra_options.get("block")
            if ctx is not None and ctx.attn2 == CACHE and block is not None:
                key = (block[0], block[1], extra_options.get("block_index", 0))
                site = next((s for s in self.sites if s.kind == "cross" and s.key == key), None)
                if site is not None:
                    with torch.no_grad():
                        self._capture(run, site, self.modules[site.path].to_out(res), ctx)
                    run.stats.attn2_replace_captured += 1
            return res
        return replace

    def _capture(self, run: TGateRun, site: AttentionSite, out: torch.Tensor, ctx: Call) -> None:
        """Add this call's cond/uncond chunks of ``out`` to the site's per-branch sums."""
        if out.shape[0] != ctx.layout.size:
            run.stats.attn2_capture_skipped_layout += 1
            return
        parts = [(role, out[c.rows]) for c, role in zip(ctx.layout.chunks(), ctx.roles) if role is not None]
        run.attn2.add(site.key, ctx.round_id, parts)

    # -- patched forwards -------------------------------------------------------------------------
    def _gated_call(self, attn: str) -> tuple:
        """(run, call) of a patched ``attn`` ("attn1"/"attn2") forward; call is None where the forward just
        computes (no run or call, or the call's action for ``attn`` is COMPUTE: counted as computed)."""
        run = self.run
        ctx = run.call if run is not None else None
        if ctx is None or getattr(ctx, attn) == COMPUTE:
            if run is not None:
                name = f"{attn}_calls_computed"
                setattr(run.stats, name, getattr(run.stats, name) + 1)
            return run, None
        return run, ctx

    def _cross_forward(self, site: AttentionSite, orig):
        tech = self

        def forward(x, *args, **kwargs):
            run, ctx = tech._gated_call("attn2")
            if ctx is None:
                return orig(x, *args, **kwargs)
            st = run.stats
            if ctx.attn2 == REUSE:
                cached = run.attn2.mean(site.key, x.device, reduce=branch_mean)
                per = ctx.layout.per
                if cached is not None and cached.shape[0] == per and cached.shape[1:] == x.shape[1:]:
                    st.attn2_calls_skipped += 1
                    # a fresh tensor every time (repeat copies): output patches or residual code may work
                    # in place, the cache must survive them
                    return cached.to(x.dtype).repeat(x.shape[0] // per, *([1] * (cached.ndim - 1)))
                if cached is None:
                    st.attn2_calls_computed_no_cache += 1
                else:
                    st.attn2_calls_computed_shape_mismatch += 1
                return orig(x, *args, **kwargs)
            out = orig(x, *args, **kwargs)
            st.attn2_calls_computed += 1
            tech._capture(run, site, out, ctx)
            return out
        return forward

    def _self_forward(self, site: AttentionSite, orig):
        tech = self

        def forward(x, *args, **kwargs):
            run, ctx = tech._gated_call("attn1")
            if ctx is None:
                return orig(x, *args, **kwargs)
            key = ("attn1", site.key, ctx.layout.branches, tuple(x.shape))
            if ctx.attn1 == REUSE:
                cached = run.store.get(key, device=x.device)
                if cached is not None:
                    run.stats.attn1_calls_skipped += 1
                    return cached.clone()
                run.stats.attn1_cache_misses += 1
            out = orig(x, *args, **kwargs)
            run.stats.attn1_calls_computed += 1
            run.store.put(key, out.detach())
            return out
        return forward

    # -- stats ------------------------------------------------------------------------------------
    def finish_stats(self, run: TGateRun) -> None:
        s, plan, store = run.stats, run.plan, run.store
        s.gate_pct = round(100 * self.gate, 1)
        s.gate_sigma = None if plan.off else round(plan.gate_sigma, 4)
        s.steps_before_gate, s.steps_after_gate, s.cache_step = plan.steps_before, plan.steps_after, plan.cache_step
        st = store.stats
        s.cache = {"entries": len(store), "bytes": st.bytes, "peak_bytes": st.peak_bytes, "rejected": st.rejected,
                   "on_cpu": self.config.cache_on_cpu}
        s.cache_peak_mb = round(st.peak_bytes / 2 ** 20, 2)
        store.clear()
