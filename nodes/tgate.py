"""FreeSpeed T-GATE -- temporally gating the attention (arXiv 2404.02747; official code ``tgate``).

Cross-attention output converges after the first steps of denoising (the semantics-planning
phase); after that (the fidelity-improving phase) it can be replaced by a cached copy and the text
condition -- hence classifier-free guidance -- is no longer needed.  Most of the speed-up comes from
dropping CFG (one branch instead of two), the rest from skipping cross-attention.  The maths of the
gate (percent of denoising -> sigma, cache step, branch mean, v2 self-attention schedule) lives in
``core/gating.py``; this file installs it on a cloned MODEL with native hooks only:

* an **object patch of every cross-attention ``forward``** (``BasicTransformerBlock.attn2`` in
  SD1.x/SD2.x/SDXL UNets, ``blocks.N.cross_attn`` in PixArt, whose attention gets no
  ``transformer_options``).  Before the gate it calls the original forward; at the cache step (the
  last schedule step before the gate) it also stores the output (after ``to_out``) per branch;
  after the gate it returns the cached mean of the cond and uncond branches without running any
  projection or attention.  The original forward is looked up with ``get_model_object`` on the
  patch key, never on the live module (a previous clone's patch may still be installed there);
* a **CALC_COND_BATCH wrapper** that, after the gate and only for the standard ``[cond, uncond]``
  evaluation of a model evaluation, evaluates ``[cond, None]`` and returns the cond prediction for
  both: CFG becomes the identity, while pre-CFG and post-CFG functions (RescaleCFG, SAG, PAG...)
  still run.  Extra passes (SAG's ``[uncond]``, PAG's ``[cond]``, PerpNeg's extra cond) are never
  touched.  ``keep_cfg`` keeps both branches;
* a **PREDICT_NOISE wrapper** that marks the first ``calc_cond_batch`` of each model evaluation as
  the main one (SAG/PAG passes come later, from post-CFG functions) and finds which entries of its
  cond list are the guider's positive and negative conditioning (by identity, so a guider that
  orders its list differently is still read right);
* the shared layer's OUTER_SAMPLE (fresh per-run state, one log line) and an APPLY_MODEL wrapper
  that decides, once per batched model call, what every attention of that call does.

Branches and batches.  Which chunk of a batched call is cond or uncond comes from
``cond_or_uncond``.  Cond and uncond may arrive in one call or in separate ones (low memory, area
conds, different ControlNets); the cache holds per-branch sums for the latest main evaluation and
is reduced to the branch mean at first use, so both layouts give the same cache.  With cfg = 1
(ComfyUI drops the uncond) the cache is the cond output alone.

IP-Adapter-style ``attn2`` replace patches run inside ``BasicTransformerBlock`` *instead of*
``attn2.forward``.  At the cache step their result (their own attention plus the image-prompt
term, passed through ``attn2.to_out``) is what gets cached; after the gate the replace patch is
taken out of that call's options, so the block falls through to the patched forward and the cached
output -- image-prompt contribution included -- is reused with no work at all.  The image prompt's
influence is thus frozen at the gate, exactly like the text prompt's.

Self-attention caching (T-GATE v2) is optional and off by default (it hurt quality in the first
ComfyUI port): before the gate the first ``warmup`` steps compute, then self-attention is cached
every ``interval`` steps and reused in between, per branch and batch layout.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Optional

import torch

import comfy.patcher_extension as pe
from comfy_api.v0_0_2 import io

from ..core.cache import CacheStore
from ..core.gating import CACHE, COMPUTE, REUSE, GatePlan, branch_mean, self_attention_action
from .hooks import CATEGORY, ModelInfo, RunState, Technique, UnsupportedModelError, detect_model

COND, UNCOND = "cond", "uncond"


@dataclass(frozen=True)
class TGateConfig:
    gate: float = 0.4                  # percent of denoising where cross-attention is frozen
    keep_cfg: bool = False             # True: keep evaluating the uncond branch after the gate
    self_attention: bool = False       # T-GATE v2 self-attention caching before the gate
    sa_warmup: int = 2
    sa_interval: int = 5
    cache_on_cpu: bool = False
    cache_limit_mb: float = 0.0        # 0 = no limit (the cache holds one tensor per attention layer)

    def __post_init__(self):
        if not 0.0 <= self.gate <= 1.0:
            raise ValueError("FreeSpeed T-GATE: gate must be in 0..1 (percent of denoising)")
        if self.sa_warmup < 0 or self.sa_interval < 1:
            raise ValueError("FreeSpeed T-GATE: self-attention warm-up must be >= 0 and interval >= 1")

    @property
    def off(self) -> bool:
        return self.gate >= 1.0


# ------------------------------------------------------------------------------------------------
# attention sites
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Site:
    """One attention layer: its path under ``diffusion_model`` and its block key.

    ``key`` is ComfyUI's replace-patch key ``(block_name, number, block_index)`` for UNets
    (``("input", 4, 0)``) and ``("block", i)`` for PixArt.
    """
    kind: str                          # "attn2" (cross) | "attn1" (self)
    path: str
    key: tuple


_UNET_BLOCK = re.compile(r"^(input_blocks|middle_block|output_blocks)\.(\d+)\..*transformer_blocks\.(\d+)$")


def attention_sites(model) -> tuple[str, list[Site]]:
    """(model label, cross- and self-attention sites) of a ModelPatcher; label "" when none."""
    dm = model.model.diffusion_model
    dm_class = type(dm).__name__
    sites: list[Site] = []
    if dm_class == "UNetModel" and hasattr(dm, "input_blocks"):
        for name, mod in dm.named_modules():
            if type(mod).__name__ != "BasicTransformerBlock" and not any(
                    c.__name__ == "BasicTransformerBlock" for c in type(mod).__mro__):
                continue
            m = _UNET_BLOCK.match(name)
            if m is None:
                continue
            kind, num, idx = m.group(1), int(m.group(2)), int(m.group(3))
            block = {"input_blocks": "input", "middle_block": "middle", "output_blocks": "output"}[kind]
            if block == "middle":
                num = 0
            key = (block, num, idx)
            if getattr(mod, "attn2", None) is not None and not getattr(mod, "switch_temporal_ca_to_sa", False):
                sites.append(Site("attn2", f"{name}.attn2", key))
            if getattr(mod, "attn1", None) is not None:
                sites.append(Site("attn1", f"{name}.attn1", key))
        keys = [s.key for s in sites if s.kind == "attn2"]
        if len(keys) != len(set(keys)):           # several transformers in one block: key by path
            sites = [Site(s.kind, s.path, (s.path,)) for s in sites]
        return "UNet", sites
    if dm_class == "PixArtMS" and hasattr(dm, "blocks"):
        for i, blk in enumerate(dm.blocks):
            if hasattr(blk, "cross_attn"):
                sites.append(Site("attn2", f"blocks.{i}.cross_attn", ("block", i)))
            if hasattr(blk, "attn"):
                sites.append(Site("attn1", f"blocks.{i}.attn", ("block", i)))
        return "PixArt", sites
    return "", sites


# ------------------------------------------------------------------------------------------------
# per-call context
# ------------------------------------------------------------------------------------------------
@dataclass
class BatchCtx:
    """One calc_cond_batch call: is it the evaluation's main call, and which cond index is which."""
    main: bool
    main_id: Optional[int]
    roles: dict


@dataclass
class CallCtx:
    """One batched model call (one APPLY_MODEL): what each attention kind does and the layout."""
    attn2: str
    attn1: str
    roles: tuple                       # role (COND/UNCOND/None) of each chunk
    layout: tuple                      # cond_or_uncond
    per: int                           # samples per chunk
    main_id: Optional[int]


class TGate(Technique):
    name = "T-GATE"
    key = "freespeed.tgate"

    def __init__(self, config: TGateConfig, info: ModelInfo, label: str, sites: list[Site],
                 node_id: Optional[str] = None):
        super().__init__(info, node_id)
        self.config = config
        self.label = label
        self.sites = [s for s in sites if s.kind == "attn2" or config.self_attention]
        self.modules: dict[str, torch.nn.Module] = {}

    # -- installation -----------------------------------------------------------------------------
    def install(self, model) -> None:
        super().install(model)
        model.add_wrapper_with_key(pe.WrappersMP.PREDICT_NOISE, self.key, self._predict_noise)
        model.add_wrapper_with_key(pe.WrappersMP.CALC_COND_BATCH, self.key, self._calc_cond_batch)
        dm = model.model.diffusion_model
        for site in self.sites:
            self.modules[site.path] = dm.get_submodule(site.path)
            name = f"diffusion_model.{site.path}.forward"
            orig = model.get_model_object(name)    # pending patch of this clone, else the original
            make = self._attn2_forward if site.kind == "attn2" else self._attn1_forward
            model.add_object_patch(name, make(site, orig))

    # -- per-run state ----------------------------------------------------------------------------
    def new_run(self, schedule, noise) -> RunState:
        run = super().new_run(schedule, noise)
        cfg = self.config
        run.plan = GatePlan.from_schedule(schedule, cfg.gate)
        run.store = CacheStore(budget_bytes=int(cfg.cache_limit_mb * 2 ** 20), offload=cfg.cache_on_cpu)
        run.guider = None
        run.main_pending = False
        run.main_ids = 0
        run.batch = None
        run.call = None
        run.part_meta = {}            # (site key, role) -> (main id, chunk count)
        run.latest = {}               # site key -> main id of its latest capture
        run.cache_main_id = None      # main id of the latest capture (any site)
        return run

    # -- wrappers ---------------------------------------------------------------------------------
    def _predict_noise(self, executor, *args, **kwargs):
        run = self.run
        if run is None:
            return executor(*args, **kwargs)
        run.guider = executor.class_obj
        run.main_pending = True
        try:
            return executor(*args, **kwargs)
        finally:
            run.main_pending = False

    def _roles(self, run, conds) -> dict:
        conds_by_key = getattr(run.guider, "conds", None) or {}
        pos, neg = conds_by_key.get("positive"), conds_by_key.get("negative")
        roles = {}
        for i, c in enumerate(conds):
            if c is None:
                continue
            if pos is not None and c is pos:
                roles[i] = COND
            elif neg is not None and c is neg:
                roles[i] = UNCOND
        if not roles and len(conds) == 2:       # not a CFGGuider: sampling_function's [cond, uncond]
            roles = {i: r for i, r in enumerate((COND, UNCOND)) if conds[i] is not None}
        return roles

    def _calc_cond_batch(self, executor, model, conds, x_in, timestep, model_options):
        run = self.run
        if run is None:
            return executor(model, conds, x_in, timestep, model_options)
        main, run.main_pending = run.main_pending, False
        prev = run.batch
        if not main:
            run.batch = BatchCtx(False, None, {})
            try:
                return executor(model, conds, x_in, timestep, model_options)
            finally:
                run.batch = prev
        run.main_ids += 1
        roles = self._roles(run, conds)
        run.batch = BatchCtx(True, run.main_ids, roles)
        try:
            plan = run.plan
            if (not self.config.keep_cfg and not plan.off and run.cache_main_id is not None
                    and len(conds) == 2 and conds[1] is not None and roles.get(0) == COND and roles.get(1) == UNCOND
                    and plan.after(float(timestep.max()) if torch.is_tensor(timestep) else float(timestep))):
                out = executor(model, [conds[0], None], x_in, timestep, model_options)
                run.count("uncond_evaluations_skipped")
                return [out[0], out[0]]
            if len(conds) >= 2 and conds[1] is not None:
                run.count("uncond_evaluations")
            return executor(model, conds, x_in, timestep, model_options)
        finally:
            run.batch = prev

    def _apply_model(self, executor, x, t, *args, **kwargs):
        run = self.run
        if run is None:
            return executor(x, t, *args, **kwargs)
        info = run.begin_eval(float(t.max()) if torch.is_tensor(t) else float(t))
        to_in_kwargs = "transformer_options" in kwargs
        to = kwargs.get("transformer_options") if to_in_kwargs else (args[3] if len(args) > 3 else None)
        to = to if isinstance(to, dict) else {}
        layout = tuple(to.get("cond_or_uncond") or (0,))
        b = x.shape[0]
        if b % len(layout):
            layout = (0,)
        per = b // len(layout)
        batch = run.batch or BatchCtx(False, None, {})
        roles = tuple(batch.roles.get(i) for i in layout) if batch.main else (None,) * len(layout)
        plan = run.plan
        cacheable = batch.main and not info.extra and any(r is not None for r in roles)
        if plan.off:
            attn2 = COMPUTE
        elif not plan.after(info.sigma):
            attn2 = CACHE if cacheable and plan.is_cache_sigma(info.sigma) else COMPUTE
        elif run.cache_main_id is not None and run.cache_main_id != batch.main_id:
            attn2 = REUSE
        else:                                   # the run starts after the gate: the first evaluation caches
            attn2 = CACHE if cacheable else COMPUTE
        attn1 = COMPUTE
        if self.config.self_attention and not plan.off and batch.main and not info.extra and not plan.after(info.sigma):
            attn1 = self_attention_action(info.step, self.config.sa_warmup, self.config.sa_interval)
        ctx = CallCtx(attn2, attn1, roles, layout, per, batch.main_id)

        replace = ((to.get("patches_replace") or {}).get("attn2") or {})
        if replace and attn2 in (CACHE, REUSE):
            new_to = dict(to)
            pr = dict(new_to.get("patches_replace") or {})
            pr["attn2"] = self._replace_for_call(run, replace, attn2)
            new_to["patches_replace"] = pr
            if to_in_kwargs:
                kwargs = dict(kwargs, transformer_options=new_to)
            else:
                args = args[:3] + (new_to,) + args[4:]

        prev, run.call = run.call, ctx
        try:
            return executor(x, t, *args, **kwargs)
        finally:
            run.call = prev

    # -- attn2 replace patches (IP-Adapter and the like) --------------------------------------------
    def _replace_for_call(self, run, replace: dict, mode: str) -> dict:
        """This call's attn2 replace patches: wrapped to capture (cache step) or dropped (reuse)."""
        out = {}
        for key, fn in replace.items():
            if mode == REUSE:
                covered = [s for s in self.sites if s.kind == "attn2" and s.key[:len(key)] == tuple(key)]
                if covered and all(self._has_cache(run, s) for s in covered):
                    run.count("attn2_replace_calls_dropped_after_gate", len(covered))
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
                site = next((s for s in self.sites if s.kind == "attn2" and s.key == key), None)
                if site is not None:
                    with torch.no_grad():
                        self._capture(run, site, self.modules[site.path].to_out(res), ctx)
                    run.count("attn2_replace_captured")
            return res
        return replace

    # -- cache ------------------------------------------------------------------------------------
    def _capture(self, run, site: Site, out: torch.Tensor, ctx: CallCtx) -> None:
        """Add this call's cond/uncond chunks of ``out`` to the site's per-branch sums."""
        store = run.store
        if out.shape[0] != ctx.per * len(ctx.layout):
            run.count("attn2_capture_skipped_layout")
            return
        if run.latest.get(site.key) != ctx.main_id:      # a newer capture replaces the old one
            for role in (COND, UNCOND):
                store.pop(("attn2.part", site.key, role))
                run.part_meta.pop((site.key, role), None)
            store.pop(("attn2", site.key))
            run.latest[site.key] = ctx.main_id
        for i, role in enumerate(ctx.roles):
            if role is None:
                continue
            chunk = out[i * ctx.per:(i + 1) * ctx.per].detach()
            pkey = ("attn2.part", site.key, role)
            meta = run.part_meta.get((site.key, role))
            if meta is not None and meta[0] == ctx.main_id:
                prev = store.pop(pkey)
                if prev is None:
                    continue
                value, n = prev.to(chunk.device) + chunk, meta[1] + 1
            else:
                value, n = chunk.clone(), 1
            if store.put(pkey, value):
                run.part_meta[(site.key, role)] = (ctx.main_id, n)
                run.cache_main_id = ctx.main_id
            else:
                run.part_meta.pop((site.key, role), None)

    def _has_cache(self, run, site: Site) -> bool:
        return ("attn2", site.key) in run.store or any(
            (site.key, r) in run.part_meta for r in (COND, UNCOND))

    def _cached(self, run, site: Site, device) -> Optional[torch.Tensor]:
        store = run.store
        key = ("attn2", site.key)
        if key not in store:
            parts = {}
            for role in (COND, UNCOND):
                meta = run.part_meta.pop((site.key, role), None)
                t = store.pop(("attn2.part", site.key, role))
                if meta is not None and t is not None:
                    parts[role] = (t.to(device), meta[1])
            if not parts:
                return None
            if not store.put(key, branch_mean(parts)):
                return None
        return store.get(key, device=device)

    # -- patched forwards -------------------------------------------------------------------------
    def _attn2_forward(self, site: Site, orig):
        tech = self

        def forward(x, *args, **kwargs):
            run = tech.run
            ctx = run.call if run is not None else None
            if ctx is None or ctx.attn2 == COMPUTE:
                if run is not None:
                    run.count("attn2_calls_computed")
                return orig(x, *args, **kwargs)
            if ctx.attn2 == REUSE:
                cached = tech._cached(run, site, x.device)
                if cached is not None and cached.shape[0] == ctx.per and cached.shape[1:] == x.shape[1:]:
                    run.count("attn2_calls_skipped")
                    # a fresh tensor every time (repeat copies): output patches or residual code may work
                    # in place, the cache must survive them
                    return cached.to(x.dtype).repeat(x.shape[0] // ctx.per, *([1] * (cached.ndim - 1)))
                run.count("attn2_calls_computed_no_cache" if cached is None else "attn2_calls_computed_shape_mismatch")
                return orig(x, *args, **kwargs)
            out = orig(x, *args, **kwargs)
            run.count("attn2_calls_computed")
            tech._capture(run, site, out, ctx)
            return out
        return forward

    def _attn1_forward(self, site: Site, orig):
        tech = self

        def forward(x, *args, **kwargs):
            run = tech.run
            ctx = run.call if run is not None else None
            if ctx is None or ctx.attn1 == COMPUTE:
                if run is not None and tech.config.self_attention:
                    run.count("attn1_calls_computed")
                return orig(x, *args, **kwargs)
            key = ("attn1", site.key, ctx.layout, tuple(x.shape))
            if ctx.attn1 == REUSE:
                cached = run.store.get(key, device=x.device)
                if cached is not None:
                    run.count("attn1_calls_skipped")
                    return cached.clone()
                run.count("attn1_cache_misses")
            out = orig(x, *args, **kwargs)
            run.count("attn1_calls_computed")
            run.store.put(key, out.detach())
            return out
        return forward

    # -- stats ------------------------------------------------------------------------------------
    def stats(self, run: RunState) -> dict[str, Any]:
        s = super().stats(run)
        plan = run.plan
        s["model"] = self.label if self.label != "UNet" else self.info.label
        s["gate_pct"] = round(100 * self.config.gate, 1)
        s["gate_sigma"] = None if plan.off else round(plan.gate_sigma, 4)
        s["steps_before_gate"] = plan.steps_before
        s["steps_after_gate"] = plan.steps_after
        s["cache_step"] = plan.cache_step
        s["keep_cfg"] = self.config.keep_cfg
        for k in ("attn2_calls_skipped", "attn2_calls_computed", "uncond_evaluations_skipped", "uncond_evaluations"):
            s.setdefault(k, 0)
        st = run.store.stats
        s["cache"] = {"entries": len(run.store), "bytes": st.bytes, "peak_bytes": st.peak_bytes,
                      "rejected": st.rejected, "on_cpu": self.config.cache_on_cpu}
        s["cache_peak_mb"] = round(st.peak_bytes / 2 ** 20, 2)
        run.store.clear()
        return s

    def summary(self, s: dict[str, Any]) -> str:
        if s["gate_sigma"] is None:
            head = "gate 100% (off)"
        else:
            head = f"gate {s['gate_pct']:g}% (sigma {s['gate_sigma']:g})"
        sa = ""
        if self.config.self_attention:
            sa = f", self-attention {s.get('attn1_calls_skipped', 0)} skipped / {s.get('attn1_calls_computed', 0)} computed"
        return (f"{head}: {s['steps_before_gate']} steps before, {s['steps_after_gate']} after; cross-attention "
                f"{s['attn2_calls_skipped']} calls skipped / {s['attn2_calls_computed']} computed; "
                f"{s['uncond_evaluations_skipped']} uncond evaluations skipped"
                f"{' (CFG kept)' if s['keep_cfg'] else ''}{sa}; cache peak {s['cache_peak_mb']:g} MB; "
                f"{s['evaluations']} model calls, {s['wall_s']:.2f} s")


def apply_tgate(model, config: TGateConfig, node_id: Optional[str] = None):
    """Clone ``model`` and install T-GATE on the clone (the input MODEL is never modified)."""
    info = detect_model(model)
    label, sites = attention_sites(model)
    if info.family in ("flux", "sd3") or not any(s.kind == "attn2" for s in sites):
        why = ("Flux and SD3 have no separate cross-attention: text and image tokens share one joint attention, so "
               "there is no cross-attention output to cache." if info.family in ("flux", "sd3") else
               "No cross-attention layer was found in it.")
        raise UnsupportedModelError(
            f"FreeSpeed T-GATE: {info.model_class} ({info.label}, diffusion model {info.diffusion_class}) is not "
            f"supported. {why} Supported: SD1.x/SD2.x and SDXL UNets, PixArt.")
    m = model.clone()
    TGate(config, info, label, sites, node_id).install(m)
    return m


class TGateNode(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="FreeSpeedTGate",
            display_name="FreeSpeed T-GATE",
            category=CATEGORY,
            description=("T-GATE (arXiv 2404.02747): after the gate, cross-attention is replaced by its cached output "
                         "(mean of the cond and uncond branches at the gate) and classifier-free guidance is dropped, "
                         "so only the positive branch is evaluated. ~1.6x at 25 steps with the gate at 40%. "
                         "SD1.x/SD2.x, SDXL, PixArt. IP-Adapter's contribution is frozen at the gate with the text."),
            inputs=[
                io.Model.Input("model"),
                io.Float.Input("gate", default=0.4, min=0.0, max=1.0, step=0.01,
                               tooltip="Where cross-attention is frozen, in percent of denoising (0.4 = step 10 of 25 "
                                       "with the normal scheduler, the paper's default). 1.0 = off."),
                io.Boolean.Input("keep_cfg", default=False,
                                 tooltip="Keep evaluating the negative prompt after the gate. Off (default): CFG is "
                                         "dropped after the gate, which gives most of the speed-up."),
                io.Boolean.Input("self_attention", default=False,
                                 tooltip="T-GATE v2: also cache self-attention before the gate (computed for the "
                                         "warm-up steps, then every 'interval' steps, reused in between). Can cost "
                                         "quality."),
                io.Int.Input("self_attention_warmup", default=2, min=0, max=1000,
                             tooltip="Steps (of this run) before self-attention caching starts."),
                io.Int.Input("self_attention_interval", default=5, min=1, max=1000,
                             tooltip="Self-attention is recomputed and cached every this many steps before the gate "
                                     "(1 = always computed)."),
                io.Boolean.Input("cache_on_cpu", default=False,
                                 tooltip="Keep the cached attention outputs in CPU memory (saves VRAM, costs a copy "
                                         "per layer and step)."),
            ],
            outputs=[io.Model.Output()],
            hidden=[io.Hidden.unique_id],
        )

    @classmethod
    def execute(cls, model, gate, keep_cfg, self_attention=False, self_attention_warmup=2, self_attention_interval=5,
                cache_on_cpu=False) -> io.NodeOutput:
        config = TGateConfig(gate=float(gate), keep_cfg=bool(keep_cfg), self_attention=bool(self_attention),
                             sa_warmup=int(self_attention_warmup), sa_interval=int(self_attention_interval),
                             cache_on_cpu=bool(cache_on_cpu))
        return io.NodeOutput(apply_tgate(model, config, node_id=cls.hidden.unique_id if cls.hidden else None))
