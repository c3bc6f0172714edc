"""FreeSpeed Attention Map Reuse -- Hunter et al., "Fast Sampling Through the Reuse of Attention Maps
in Diffusion Models" (arXiv 2401.01008; no official code).

On *keep* evaluations the chosen attention layers compute attention explicitly and keep their maps
softmax(Q Kᵀ / sqrt(d)) (per conditioning branch, layer and head, fp16 by default).  On *reuse*
evaluations those layers compute only V and return ``to_out(map · V)``: no Q/K projection, no
Q Kᵀ, no softmax.  Every other evaluation runs the layer's original forward (ComfyUI's kernel), so
a schedule that never reuses is exactly the unpatched model.  The schedule maths (percent of
denoising -> keep/reuse/original per step) lives in ``core/mapreuse.py``.

Hooks (native ComfyUI only):

* an **object patch of each chosen ``CrossAttention.forward``** (``attn1`` = self-attention,
  ``attn2`` = cross-attention of every ``BasicTransformerBlock``), with the original taken from
  ``get_model_object`` so patches chain.  A forward that another node already object-patched
  (T-GATE's attn2, T-GATE v2's attn1) is left to that node and counted: its owner may skip the
  layer altogether, which an explicit map computation here would undo;
* the shared layer's OUTER_SAMPLE (fresh per-run state and cache, one log line) and APPLY_MODEL
  (which step this evaluation is) wrappers.

Branches.  Maps are kept per chunk of the batched call, keyed by the chunk's ``cond_or_uncond``
entry *and* its conditioning uuid (``transformer_options["uuids"]``), plus the layer and the Q and
K/V token counts.  So a cond-only call (T-GATE after its gate, cfg 1, a low-memory split) reuses the
cond map, never the uncond one, whatever the order of the chunks; and a K/V length that changed
between keep and reuse (ToDo's ``attn1_patch`` shortens K/V *before* ``attn1.forward`` is called,
possibly only in a window) falls back to computing the layer.

Memory is the binding constraint: SD1.5 at 512² with CFG keeps 2 x 8 x 4096² fp16 = 0.5 GB per
level-1 self-attention layer.  The cache is a :class:`core.cache.CacheStore` with a byte budget
that refuses (never evicts): a layer whose maps would not fit is left alone (computed normally,
no explicit map) and counted; the bytes held are in the run's stats.  ``cache_on_cpu`` keeps the
maps in host memory (a copy per layer and step).

Multi-evaluation samplers (heun, dpm_2, ...): evaluations off the schedule run the original forward
and keep nothing.  Flux/SD3 are refused (joint text-image attention with RoPE; not this UNet path).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, replace
from typing import Any, Optional

import torch

from comfy_api.v0_0_2 import io

from ..core.attention import attention_from_map, attention_map
from ..core.cache import CacheStore
from ..core.mapreuse import (MODES, ORIGINAL, REUSE, ReusePlan, distortion, format_percents, hurry_steps,
                             map_bytes, map_key, parse_levels, pick_reuse_steps, resolve_plan, steps_to_percents)
from ..core.schedule import parse_percent_list
from .hooks import (CATEGORY, ModelInfo, RunState, Technique, check_sampler_and_scheduler, detect_model, logger,
                    prepare_sampling, require_unet)

MAP_DTYPES = {"fp16": torch.float16, "fp32": torch.float32}


@dataclass(frozen=True)
class MapReuseConfig:
    schedule: str = "late"             # "late" | "custom" | "off"
    start: float = 0.5                 # late: reuse from this percent of denoising on
    refresh_every: int = 0             # late: recompute + keep the maps every k steps of the window (0 = never)
    percents: tuple = ()               # custom: reuse steps as percents (0..1)
    self_attention: bool = True
    cross_attention: bool = True
    levels: Optional[frozenset] = None   # attention levels (1 = highest resolution with attention); None = all
    cache_limit_mb: float = 1024.0     # 0 = unlimited
    map_dtype: str = "fp16"
    cache_on_cpu: bool = False

    def __post_init__(self):
        if self.schedule not in MODES:
            raise ValueError(f"FreeSpeed Map Reuse: unknown schedule {self.schedule!r}; expected one of {', '.join(MODES)}")
        if not 0.0 <= self.start <= 1.0:
            raise ValueError("FreeSpeed Map Reuse: start must be in 0..1 (percent of denoising)")
        if self.refresh_every < 0:
            raise ValueError("FreeSpeed Map Reuse: refresh_every must be >= 0 (0 = never refresh)")
        if self.map_dtype not in MAP_DTYPES:
            raise ValueError(f"FreeSpeed Map Reuse: map dtype must be one of {', '.join(MAP_DTYPES)}")
        if self.cache_limit_mb < 0:
            raise ValueError("FreeSpeed Map Reuse: cache limit must be >= 0 (0 = unlimited)")


# ------------------------------------------------------------------------------------------------
# sites
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Site:
    kind: str          # "attn1" (self) | "attn2" (cross)
    path: str          # under diffusion_model
    block: tuple       # ("input", 4) / ("middle", 0) / ("output", 7)
    index: int         # depth index inside the SpatialTransformer
    level: Optional[int]


_UNET_BLOCK = re.compile(r"^(input_blocks|middle_block|output_blocks)\.(\d+)\..*transformer_blocks\.(\d+)$")


def attention_sites(model, info: ModelInfo) -> list[Site]:
    """Every self- and cross-attention of a UNet's BasicTransformerBlocks, in module order."""
    dm = model.model.diffusion_model
    out = []
    for name, mod in dm.named_modules():
        if not any(c.__name__ == "BasicTransformerBlock" for c in type(mod).__mro__):
            continue
        m = _UNET_BLOCK.match(name)
        if m is None:
            continue
        kind = {"input_blocks": "input", "middle_block": "middle", "output_blocks": "output"}[m.group(1)]
        block = (kind, 0 if kind == "middle" else int(m.group(2)))
        level = info.attention_level(block)
        if getattr(mod, "attn1", None) is not None:
            out.append(Site("attn1", f"{name}.attn1", block, int(m.group(3)), level))
        if getattr(mod, "attn2", None) is not None and not getattr(mod, "switch_temporal_ca_to_sa", False):
            out.append(Site("attn2", f"{name}.attn2", block, int(m.group(3)), level))
    return out


def _is_plain_forward(fn, module) -> bool:
    return getattr(fn, "__self__", None) is module and getattr(fn, "__func__", None) is type(module).forward


# bound the float32 temporaries of explicit attention: at most this many elements of a map at once
TEMP_ELEMENTS = 2 ** 26       # 256 MB in float32


def _row_chunk(batch: int, heads: int, n_query: int, n_key: int) -> int:
    return max(1, min(n_query, TEMP_ELEMENTS // max(1, batch * heads * n_key)))


def _explicit_attention(q, k, v, heads: int, map_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(output in v's dtype, map [B, heads, Nq, Nk] in map_dtype); float32 softmax, queries in chunks so
    that the float32 temporary stays bounded (the map itself is written straight into map_dtype)."""
    b, nq, _ = q.shape
    nk = k.shape[1]
    step = _row_chunk(b, heads, nq, nk)
    if step >= nq:
        attn = attention_map(q, k, heads)
        return attention_from_map(attn, v.float(), heads).to(v.dtype), attn.to(map_dtype)
    amap = torch.empty((b, heads, nq, nk), dtype=map_dtype, device=q.device)
    outs = []
    vf = v.float()
    for s in range(0, nq, step):
        attn = attention_map(q[:, s:s + step], k, heads)
        outs.append(attention_from_map(attn, vf, heads).to(v.dtype))
        amap[:, :, s:s + step] = attn
        del attn
    return torch.cat(outs, dim=1), amap


def _map_times_v(amap: torch.Tensor, v: torch.Tensor, heads: int) -> torch.Tensor:
    """map · V in v's dtype; the map is cast in query chunks when its dtype differs (bounded temporaries)."""
    b, h, nq, nk = amap.shape
    step = _row_chunk(b, h, nq, nk)
    if amap.dtype == v.dtype or step >= nq:
        return attention_from_map(amap, v, heads)
    return torch.cat([attention_from_map(amap[:, :, s:s + step], v, heads) for s in range(0, nq, step)], dim=1)


# ------------------------------------------------------------------------------------------------
# the technique
# ------------------------------------------------------------------------------------------------
class MapReuse(Technique):
    name = "Attention Map Reuse"
    key = "freespeed.mapreuse"

    def __init__(self, config: MapReuseConfig, info: ModelInfo, node_id: Optional[str] = None):
        super().__init__(info, node_id)
        self.config = config
        self.sites: list[Site] = []
        self.modules: dict[str, torch.nn.Module] = {}
        self.foreign: list[str] = []          # chosen sites whose forward another node patched
        self.last_schedule = None
        self.dtype = MAP_DTYPES[config.map_dtype]

    def wanted(self, site: Site) -> bool:
        cfg = self.config
        if site.kind == "attn1" and not cfg.self_attention or site.kind == "attn2" and not cfg.cross_attention:
            return False
        return cfg.levels is None or site.level in cfg.levels

    # -- installation -----------------------------------------------------------------------------
    def install(self, model) -> None:
        super().install(model)
        dm = model.model.diffusion_model
        for site in attention_sites(model, self.info):
            if not self.wanted(site):
                continue
            module = dm.get_submodule(site.path)
            name = f"diffusion_model.{site.path}.forward"
            orig = model.get_model_object(name)     # this clone's pending patch, else the module's own
            if not _is_plain_forward(orig, module):
                self.foreign.append(site.path)
                continue
            self.sites.append(site)
            self.modules[site.path] = module
            model.add_object_patch(name, self._forward(site, module, orig))
        if self.foreign:
            logger.info("FreeSpeed %s: %d attention layers are already patched by another node (e.g. T-GATE) and are "
                        "left to it", self.name, len(self.foreign))

    # -- per-run state ----------------------------------------------------------------------------
    def new_run(self, schedule, noise) -> RunState:
        run = super().new_run(schedule, noise)
        cfg = self.config
        run.plan = resolve_plan(schedule, cfg.schedule, cfg.start, cfg.refresh_every, cfg.percents)
        run.store = CacheStore(budget_bytes=int(cfg.cache_limit_mb * 2 ** 20), offload=cfg.cache_on_cpu)
        run.kept_shape = {}          # (site, branch, cond id) -> (Nq, Nk) of the map kept last
        run.left_alone = set()       # sites whose maps did not fit the budget
        run.reused_sites = set()
        self.last_schedule = schedule
        return run

    def action(self, run: RunState) -> str:
        info = run.current
        if info is None:
            return ORIGINAL
        return run.plan.action(info.step, info.extra)

    # -- the patched forward ----------------------------------------------------------------------
    def _forward(self, site: Site, module, orig):
        tech = self

        def forward(x, *args, **kwargs):
            run = tech.run
            act = tech.action(run) if run is not None else ORIGINAL
            if act == ORIGINAL:
                return orig(x, *args, **kwargs)
            names = ("context", "value", "mask", "transformer_options")
            got = dict(zip(names, args))
            got.update({k: v for k, v in kwargs.items() if k in names})
            if got.get("mask") is not None:
                run.count("original_calls_masked")
                return orig(x, *args, **kwargs)
            to = got.get("transformer_options") or {}
            context = got.get("context")
            context = x if context is None else context
            value = got.get("value")
            value = context if value is None else value
            chunks = tech._chunks(to, x.shape[0])
            if act == REUSE:
                out = tech._reuse(run, site, module, x, context, value, chunks)
                if out is not None:
                    return out
                return orig(x, *args, **kwargs)
            out = tech._keep(run, site, module, x, context, value, chunks)
            return orig(x, *args, **kwargs) if out is None else out
        return forward

    @staticmethod
    def _chunks(to: dict, batch: int) -> list[tuple]:
        """[(branch, cond id, slice)] of a batched call, from cond_or_uncond and uuids."""
        cu = list(to.get("cond_or_uncond") or [0])
        uuids = list(to.get("uuids") or [])
        if batch % len(cu):
            cu, uuids = [0], []
        per = batch // len(cu)
        return [(b, uuids[i] if i < len(uuids) else None, slice(i * per, (i + 1) * per)) for i, b in enumerate(cu)]

    def _keep(self, run, site: Site, module, x, context, value, chunks) -> Optional[torch.Tensor]:
        heads = module.heads
        nq, nk = x.shape[1], context.shape[1]
        store = run.store
        keys = [map_key(site.path, b, u, nq, nk) for b, u, _ in chunks]
        for k in keys:                      # a refresh replaces this layer's maps
            store.pop(k)
        need = sum(map_bytes(sl.stop - sl.start, heads, nq, nk, self.dtype) for _, _, sl in chunks)
        if not store.fits(need):
            run.left_alone.add(site.path)
            run.count("keep_calls_left_alone")
            return None
        q = module.to_q(x)
        k = module.to_k(context)
        v = module.to_v(value)
        outs = []
        for (b, u, sl), key in zip(chunks, keys):
            out, amap = _explicit_attention(q[sl], k[sl], v[sl], heads, self.dtype)   # one branch at a time
            outs.append(out)
            if store.put(key, amap):
                run.kept_shape[(site.path, b, u)] = (nq, nk)
            else:                                              # cannot happen after fits(); be safe
                run.left_alone.add(site.path)
            del amap
        run.count("keep_calls")
        return module.to_out(torch.cat(outs, dim=0) if len(outs) > 1 else outs[0])

    def _reuse(self, run, site: Site, module, x, context, value, chunks) -> Optional[torch.Tensor]:
        nq, nk = x.shape[1], context.shape[1]
        maps = []
        for b, u, sl in chunks:
            m = run.store.get(map_key(site.path, b, u, nq, nk), device=x.device)
            if m is None or m.shape[0] != sl.stop - sl.start:
                shape = run.kept_shape.get((site.path, b, u))
                if site.path in run.left_alone:
                    run.count("reuse_calls_left_alone")
                elif shape is not None and shape != (nq, nk):
                    run.count("reuse_fallback_token_mismatch")
                else:
                    run.count("reuse_fallback_no_map")
                return None
            maps.append(m)
        v = module.to_v(value)
        heads = module.heads
        outs = [_map_times_v(m, v[sl], heads) for m, (_, _, sl) in zip(maps, chunks)]
        run.count("reuse_calls")
        run.reused_sites.add(site.path)
        return module.to_out(torch.cat(outs, dim=0) if len(outs) > 1 else outs[0])

    # -- stats ------------------------------------------------------------------------------------
    def stats(self, run: RunState) -> dict[str, Any]:
        s = super().stats(run)
        cfg = self.config
        plan: ReusePlan = run.plan
        s["schedule"] = cfg.schedule
        if cfg.schedule == "late":
            s["start_pct"] = round(100 * cfg.start, 1)
            s["refresh_every"] = cfg.refresh_every
        elif cfg.schedule == "custom":
            s["percents"] = format_percents(cfg.percents)
        s["reuse_steps"] = plan.reuse_steps
        s["keep_steps"] = plan.keep_steps
        s["layers_patched"] = len(self.sites)
        s["layers_left_to_other_node"] = len(self.foreign)
        s["layers_left_alone_budget"] = len(run.left_alone)
        s["layers_reused"] = len(run.reused_sites)
        for k in ("reuse_calls", "keep_calls", "keep_calls_left_alone", "reuse_fallback_no_map",
                  "reuse_fallback_token_mismatch"):
            s.setdefault(k, 0)
        st = run.store.stats
        s["cache"] = {"entries": len(run.store), "bytes": st.bytes, "peak_bytes": st.peak_bytes,
                      "rejected": st.rejected, "budget_bytes": run.store.budget_bytes, "on_cpu": cfg.cache_on_cpu,
                      "dtype": cfg.map_dtype}
        s["cache_peak_mb"] = round(st.peak_bytes / 2 ** 20, 2)
        run.store.clear()
        run.kept_shape.clear()
        return s

    def summary(self, s: dict[str, Any]) -> str:
        return (f"{len(s['reuse_steps'])} reuse steps {s['reuse_steps']} (maps kept at {s['keep_steps']}); "
                f"{s['reuse_calls']} layer calls reused a map, {s['keep_calls']} kept one; "
                f"{s['layers_reused']}/{s['layers_patched']} layers reused, {s['layers_left_alone_budget']} left alone "
                f"(map budget), {s['layers_left_to_other_node']} left to another node; "
                f"{s['reuse_fallback_token_mismatch']} K/V length mismatches; cache peak {s['cache_peak_mb']:g} MB; "
                f"{s['evaluations']} model calls, {s['wall_s']:.2f} s")


def apply_mapreuse(model, config: MapReuseConfig, node_id: Optional[str] = None):
    """Clone ``model`` and install attention-map reuse on the clone (the input MODEL is never modified)."""
    info = detect_model(model)
    require_unet(info, "Attention Map Reuse",
                 "Map reuse patches the self-/cross-attention layers of UNet transformer blocks; Flux/SD3 use joint "
                 "text-image attention with rotary terms, which this node does not handle.")
    m = model.clone()
    MapReuse(config, info, node_id).install(m)
    return m


def find_mapreuse(model) -> Optional[MapReuse]:
    """The MapReuse technique installed on a patched MODEL (for its stats), or None."""
    import comfy.patcher_extension as pe
    for fn in (model.wrappers.get(pe.WrappersMP.OUTER_SAMPLE, {}).get(MapReuse.key) or []):
        tech = getattr(fn, "__self__", None)
        if isinstance(tech, MapReuse):
            return tech
    return None


# ------------------------------------------------------------------------------------------------
# the schedule search (greedy, in the spirit of PHAST)
# ------------------------------------------------------------------------------------------------
def search_schedule(model, sample_fn, budget: int, base: MapReuseConfig) -> dict[str, Any]:
    """Pick ``budget`` reuse steps with the least distortion on calibration runs of ``model``.

    ``sample_fn(m)`` samples a (patched) clone of the model with the user's calibration settings
    and returns the output latent.  Runs: one reference (schedule off), one per candidate step
    (that step alone reuses: its maps come from the step before), then the greedy pick (the
    ``budget`` candidates of least output MSE) and the late schedule with the same budget (the last
    ``budget`` steps) are run in full, and the better of the two is returned -- so the search is
    never worse than the paper's late schedule on the calibration run.  Cost: steps + 2 runs.
    """
    off = apply_mapreuse(model, replace(base, schedule="off"))
    ref = sample_fn(off)
    tech = find_mapreuse(off)
    schedule = tech.last_schedule
    total = schedule.total_steps
    budget = max(0, min(int(budget), total - 1))

    def run_steps(steps) -> tuple[dict, dict]:
        pct = tuple(steps_to_percents(steps, schedule))
        m = apply_mapreuse(model, replace(base, schedule="custom", percents=pct))
        out = sample_fn(m)
        return distortion(out, ref), find_mapreuse(m).last_stats

    scores, per_step = {}, {}
    for i in range(1, total):
        d, _ = run_steps([i])
        scores[i] = d["mse"]
        per_step[i] = round(d["psnr"], 3)
    greedy = pick_reuse_steps(scores, budget)
    late = hurry_steps(total, budget)
    d_greedy, st = run_steps(greedy)
    d_late, _ = run_steps(late) if late != greedy else (d_greedy, st)
    best, d_best = (greedy, d_greedy) if d_greedy["mse"] <= d_late["mse"] else (late, d_late)
    pct = steps_to_percents(best, schedule)
    return {"steps": total, "budget": budget, "reuse_steps": best, "percents": format_percents(pct),
            "psnr": round(d_best["psnr"], 3), "greedy_steps": greedy, "greedy_psnr": round(d_greedy["psnr"], 3),
            "late_steps": late, "late_psnr": round(d_late["psnr"], 3), "single_step_psnr": per_step,
            "chosen": "greedy" if best is greedy else "late"}


# ------------------------------------------------------------------------------------------------
# nodes
# ------------------------------------------------------------------------------------------------
SCHEDULE_LABELS = {"late (paper)": "late", "custom percents": "custom", "off": "off"}


def _layer_inputs() -> list:
    return [
        io.Boolean.Input("self_attention", default=True,
                         tooltip="Reuse self-attention maps (attn1). The largest maps: 2 x heads x N² per layer "
                                 "with CFG (0.5 GB fp16 per level-1 layer of SD1.5 at 512²)."),
        io.Boolean.Input("cross_attention", default=True,
                         tooltip="Reuse cross-attention maps (attn2; N x 77 text tokens, small)."),
        io.String.Input("levels", default="all",
                        tooltip="Attention levels to patch: 'all' or a list like '2, 3' (1 = the highest-resolution "
                                "level with attention: 64x64 tokens for SD1.5 at 512² and SDXL at 1024²)."),
        io.Float.Input("cache_limit_mb", default=1024.0, min=0.0, max=1_000_000.0, step=64.0,
                       tooltip="Byte budget of the map cache, in MB (0 = unlimited). Layers whose maps would not fit "
                               "are computed normally and counted in the stats; nothing is evicted."),
        io.Boolean.Input("fp16_maps", default=True,
                         tooltip="Keep the maps in fp16 (half the memory of fp32). With an fp32 model (CPU) every "
                                 "reuse then converts the maps back to fp32, which costs about what reuse saves: "
                                 "turn this off there if memory allows."),
        io.Boolean.Input("cache_on_cpu", default=False,
                         tooltip="Keep the maps in CPU memory (saves VRAM, costs a copy per layer and reuse step)."),
    ]


def _layer_config(self_attention, cross_attention, levels, cache_limit_mb, fp16_maps, cache_on_cpu) -> dict:
    return dict(self_attention=bool(self_attention), cross_attention=bool(cross_attention), levels=parse_levels(levels),
                cache_limit_mb=float(cache_limit_mb), map_dtype="fp16" if fp16_maps else "fp32",
                cache_on_cpu=bool(cache_on_cpu))


class MapReuseNode(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="FreeSpeedAttentionMapReuse",
            display_name="FreeSpeed Attention Map Reuse",
            category=CATEGORY,
            description=("Attention-map reuse (arXiv 2401.01008): on reuse steps the chosen attention layers skip the "
                         "Q/K projections, QKᵀ and softmax and apply the map kept at an earlier step to the current V. "
                         "Reuse late in denoising distorts least. Memory-bound: maps are N² per head; a byte budget "
                         "decides which layers take part. SD1.x, SD2.x, SDXL."),
            inputs=[
                io.Model.Input("model"),
                io.Combo.Input("schedule", options=list(SCHEDULE_LABELS), default="late (paper)",
                               tooltip="late (paper): reuse from 'start' to the end of denoising (the paper's HURRY: "
                                       "the later a map is reused, the smaller the distortion). custom percents: the "
                                       "list below (e.g. from the Map Reuse Search node). off: never reuse."),
                io.Float.Input("start", default=0.5, min=0.0, max=1.0, step=0.01,
                               tooltip="late: reuse from this percent of denoising on (0.5 = the last half: 10 of 20 "
                                       "steps, the paper's 'DDIM 20 steps with 10 reuse steps')."),
                io.Int.Input("refresh_every", default=0, min=0, max=1000,
                             tooltip="late: recompute and keep the maps again every k steps of the reuse window "
                                     "(2 = every other step reuses). 0 = never: the maps of the step before the "
                                     "window are reused to the end."),
                io.String.Input("custom_percents", default="",
                                tooltip="custom: reuse steps as percents of denoising, e.g. '55, 65, 75, 85, 95'; each "
                                        "maps to the first step at or past it. The step before each reuse step keeps "
                                        "its maps."),
                *_layer_inputs(),
            ],
            outputs=[io.Model.Output()],
            hidden=[io.Hidden.unique_id],
        )

    @classmethod
    def validate_inputs(cls, schedule=None):
        # ComfyUI 0.3.64 compares V1 list combos with their options, never a V3 Combo: check it here
        if schedule is not None and schedule not in SCHEDULE_LABELS:
            return f"schedule must be one of {', '.join(SCHEDULE_LABELS)}, got {schedule!r}"
        return True

    @classmethod
    def execute(cls, model, schedule, start, refresh_every, custom_percents, self_attention=True, cross_attention=True,
                levels="all", cache_limit_mb=1024.0, fp16_maps=True, cache_on_cpu=False) -> io.NodeOutput:
        mode = SCHEDULE_LABELS.get(schedule, schedule)
        percents = tuple(parse_percent_list(custom_percents)) if mode == "custom" else ()
        config = MapReuseConfig(mode, float(start), int(refresh_every), percents,
                                **_layer_config(self_attention, cross_attention, levels, cache_limit_mb, fp16_maps,
                                                cache_on_cpu))
        return io.NodeOutput(apply_mapreuse(model, config, node_id=cls.hidden.unique_id if cls.hidden else None))


class MapReuseSearchNode(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        import comfy.samplers
        return io.Schema(
            node_id="FreeSpeedAttentionMapReuseSearch",
            display_name="FreeSpeed Attention Map Reuse Search",
            category=CATEGORY,
            description=("Finds a reuse schedule for your model (greedy, in the spirit of the paper's PHAST): one "
                         "reference run, one calibration run per step (that step alone reuses), then the 'budget' "
                         "steps of least distortion and the late schedule are compared in full; the better one is "
                         "returned as percents for the custom schedule, and applied to the output MODEL. "
                         "Costs steps + 2 sampling runs: calibrate small (few steps, low resolution)."),
            inputs=[
                io.Model.Input("model"),
                io.Conditioning.Input("positive"),
                io.Conditioning.Input("negative"),
                io.Latent.Input("latent_image"),
                io.Int.Input("seed", default=0, min=0, max=0xffffffffffffffff),
                io.Int.Input("steps", default=20, min=2, max=200),
                io.Float.Input("cfg", default=7.0, min=0.0, max=100.0, step=0.1),
                io.Combo.Input("sampler_name", options=list(comfy.samplers.KSampler.SAMPLERS), default="euler"),
                io.Combo.Input("scheduler", options=list(comfy.samplers.KSampler.SCHEDULERS), default="normal"),
                io.Int.Input("reuse_steps", default=10, min=1, max=199,
                             tooltip="Budget: how many steps reuse maps (the latency saving)."),
                *_layer_inputs(),
            ],
            outputs=[io.Model.Output(display_name="model"),
                     io.String.Output(display_name="custom_percents"),
                     io.String.Output(display_name="report")],
            hidden=[io.Hidden.unique_id],
        )

    @classmethod
    def validate_inputs(cls, sampler_name=None, scheduler=None):
        return check_sampler_and_scheduler(sampler_name, scheduler)

    @classmethod
    def execute(cls, model, positive, negative, latent_image, seed, steps, cfg, sampler_name, scheduler, reuse_steps,
                self_attention=True, cross_attention=True, levels="all", cache_limit_mb=1024.0, fp16_maps=True,
                cache_on_cpu=False) -> io.NodeOutput:
        import comfy.sample
        layer = _layer_config(self_attention, cross_attention, levels, cache_limit_mb, fp16_maps, cache_on_cpu)
        latent, noise, mask = prepare_sampling(model, latent_image, seed)

        def sample_fn(m):
            return comfy.sample.sample(m, noise, steps, cfg, sampler_name, scheduler, positive, negative, latent,
                                       denoise=1.0, noise_mask=mask, seed=seed, disable_pbar=True)

        res = search_schedule(model, sample_fn, reuse_steps, MapReuseConfig(schedule="off", **layer))
        logger.info("FreeSpeed Map Reuse Search: %s", res)
        config = MapReuseConfig("custom", percents=tuple(parse_percent_list(res["percents"])), **layer)
        report = (f"{res['chosen']} schedule, reuse steps {res['reuse_steps']} of {res['steps']} "
                  f"(PSNR {res['psnr']:g} dB vs full; greedy {res['greedy_steps']} {res['greedy_psnr']:g} dB, late "
                  f"{res['late_steps']} {res['late_psnr']:g} dB); percents: {res['percents']}")
        # the returned MODEL reports its runs on this node's canvas readout
        node_id = cls.hidden.unique_id if cls.hidden else None
        return io.NodeOutput(apply_mapreuse(model, config, node_id=node_id), res["percents"], report)
