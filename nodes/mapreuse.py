"""FreeSpeed Attention Map Reuse (Hunter et al., arXiv 2401.01008; no official code): keep-steps compute
attention explicitly and keep the maps, reuse steps apply a kept map to the current V.  Schedules and keys
are in ``core/mapreuse.py``, explicit attention in ``core/attention.py``; design notes: docs/mapreuse.md.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch

from comfy_api.v0_0_2 import io

from ..core.attention import explicit_attention, map_times_v
from ..core.batch import BatchLayout
from ..core.cache import CacheStore
from ..core.mapreuse import (MODES, ORIGINAL, REUSE, SCHEDULE_LABELS, ReusePlan, format_percents, map_bytes, map_key,
                             parse_levels, resolve_plan)
from ..core.schedule import parse_percent_list
from ..core.stats import MapReuseStats
from .hooks import CATEGORY, FreeSpeedNode, Run, RunContext, Technique, find, logger
from .sites import AttentionSite, ModelInfo, attention_sites, detect_model, patch_forward, unsupported

DIT_FAMILIES = ("flux", "sd3", "wan", "qwen", "pixart")

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

    def wants_dit(self, kind: str) -> bool:
        """DiTs: self-attention (joint or image-only) and cross-attention (Wan, PixArt); levels do not apply."""
        return self.self_attention if kind == "self" else self.cross_attention

    def wants(self, site: AttentionSite) -> bool:
        if not (self.self_attention if site.kind == "self" else self.cross_attention):
            return False
        return self.levels is None or site.level in self.levels


@dataclass
class MapReuseRun(Run[MapReuseStats]):
    plan: Optional[ReusePlan] = None
    store: Optional[CacheStore] = None
    kept_shape: dict = field(default_factory=dict)     # (site, branch, cond id) -> (Nq, Nk) of the map kept last
    left_alone: set = field(default_factory=set)       # sites whose maps did not fit the budget
    reused_sites: set = field(default_factory=set)
    options: Optional[dict] = None                     # PixArt: the current call's transformer_options


class MapReuse(Technique[MapReuseRun]):
    name = "Attention Map Reuse"
    key = "freespeed.mapreuse"
    stats_type = MapReuseStats

    def __init__(self, config: MapReuseConfig, info: ModelInfo, node_id: Optional[str] = None):
        super().__init__(info, node_id)
        self.config = config
        self.sites: list[AttentionSite] = []
        self.foreign: list[str] = []          # chosen sites whose forward another node patched
        self.last_schedule = None
        self.dtype = MAP_DTYPES[config.map_dtype]

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
                           plan=resolve_plan(ctx.schedule, cfg.schedule, cfg.start, cfg.refresh_every, cfg.percents),
                           store=CacheStore(budget_bytes=int(cfg.cache_limit_mb * 2 ** 20), offload=cfg.cache_on_cpu))

    # -- the patched forward ----------------------------------------------------------------------
    def _forward(self, site: AttentionSite, module, orig):
        tech = self
        names = ("context", "value", "mask", "transformer_options")

        def forward(x, *args, **kwargs):
            run = tech.run
            info = run.current if run is not None else None
            act = run.plan.action(info.step, info.extra) if info is not None else ORIGINAL
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
            s.start_pct, s.refresh_every = round(100 * cfg.start, 1), cfg.refresh_every
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


def apply_mapreuse(model, config: MapReuseConfig, node_id: Optional[str] = None):
    """Clone ``model`` and install attention-map reuse on the clone (the input MODEL is never modified)."""
    info = detect_model(model)
    if not info.is_unet and info.family not in DIT_FAMILIES:
        raise unsupported("Attention Map Reuse", info,
                          "Map reuse needs the attention layers of UNet transformer blocks or the blocks of a known DiT.",
                          "SD1.x/SD2.x, SDXL (maps); Flux/Chroma, SD3, Wan, Qwen-Image, PixArt (attention outputs)")
    if info.is_unet:
        return MapReuse(config, info, node_id).patched_clone(model)
    from .mapreuse_dit import MapReuseDiT
    return MapReuseDiT(config, info, node_id).patched_clone(model)


def find_mapreuse(model) -> Optional[MapReuse]:
    """The MapReuse technique installed on a patched MODEL (for its stats), or None."""
    return find(model, MapReuse.key)


def layer_inputs() -> list:
    """The layer and memory inputs shared by the Map Reuse and Map Reuse Search nodes."""
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


def layer_config(self_attention, cross_attention, levels, cache_limit_mb, fp16_maps, cache_on_cpu) -> dict:
    return dict(self_attention=bool(self_attention), cross_attention=bool(cross_attention), levels=parse_levels(levels),
                cache_limit_mb=float(cache_limit_mb), map_dtype="fp16" if fp16_maps else "fp32",
                cache_on_cpu=bool(cache_on_cpu))


class MapReuseNode(FreeSpeedNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="FreeSpeedAttentionMapReuse",
            display_name="FreeSpeed Attention Map Reuse",
            category=CATEGORY,
            description=("Attention-map reuse (arXiv 2401.01008): on reuse steps the chosen attention layers skip the "
                         "Q/K projections, QKᵀ and softmax and apply the map kept at an earlier step to the current V. "
                         "Reuse late in denoising distorts least. Memory-bound: maps are N² per head; a byte budget "
                         "decides which layers take part. SD1.x, SD2.x, SDXL. DiTs (Flux/Chroma, SD3, Wan, Qwen-Image, "
                         "PixArt): maps would not fit (Flux 1024²: ~1 GB per block), so each block's attention output "
                         "is kept and reused instead (same schedules and budget; levels do not apply)."),
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
                *layer_inputs(),
            ],
            outputs=[io.Model.Output()],
            hidden=[io.Hidden.unique_id],
        )

    @classmethod
    def execute(cls, model, schedule, start, refresh_every, custom_percents, self_attention=True, cross_attention=True,
                levels="all", cache_limit_mb=1024.0, fp16_maps=True, cache_on_cpu=False) -> io.NodeOutput:
        mode = SCHEDULE_LABELS.get(schedule, schedule)
        percents = tuple(parse_percent_list(custom_percents)) if mode == "custom" else ()
        config = MapReuseConfig(mode, float(start), int(refresh_every), percents,
                                **layer_config(self_attention, cross_attention, levels, cache_limit_mb, fp16_maps,
                                               cache_on_cpu))
        return io.NodeOutput(apply_mapreuse(model, config, node_id=cls.node_id()))
