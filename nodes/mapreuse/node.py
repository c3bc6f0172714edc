"""The FreeSpeed Attention Map Reuse node: ``apply`` (dispatches to the UNet or DiT path) and the V3 schema."""
from __future__ import annotations

from typing import Optional

from comfy_api.v0_0_2 import io

from ...core.mapreuse import SCHEDULE_LABELS, parse_levels
from ...core.schedule import parse_percent_list
from ..hooks import FreeSpeedNode, find
from ..sites import detect_model, unsupported
from .config import DIT_FAMILIES, MapReuseConfig
from .dit import MapReuseDiT
from .unet import MapReuse


def apply_mapreuse(model, config: MapReuseConfig, node_id: Optional[str] = None):
    """Clone ``model`` and install attention-map reuse on the clone (the input MODEL is never modified)."""
    info = detect_model(model)
    if not info.is_unet and info.family not in DIT_FAMILIES:
        raise unsupported("Attention Map Reuse", info,
                          "Map reuse needs the attention layers of UNet transformer blocks or the blocks of a known DiT.",
                          "SD1.x/SD2.x, SDXL (maps); Flux/Chroma, SD3, Wan, Qwen-Image, PixArt (attention outputs)")
    if info.is_unet:
        return MapReuse(config, info, node_id).patched_clone(model)
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
        return cls.schema(
            "FreeSpeedAttentionMapReuse", "FreeSpeed Attention Map Reuse",
            description=("Attention-map reuse (arXiv 2401.01008): on reuse steps the chosen attention layers skip the "
                         "Q/K projections, QKᵀ and softmax and apply the map kept at an earlier step to the current V. "
                         "Reuse late in denoising distorts least. Memory-bound: maps are N² per head; a byte budget "
                         "decides which layers take part. SD1.x, SD2.x, SDXL. DiTs (Flux/Chroma, SD3, Wan, Qwen-Image, "
                         "PixArt): maps would not fit (Flux 1024²: ~1 GB per block), so each block's attention output "
                         "is kept and reused instead (same schedules and budget; levels do not apply)."),
            inputs=[
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
                io.Int.Input("dit_refresh_every", default=2, min=0, max=1000, optional=True,
                             tooltip="refresh_every on DiTs (attention outputs). 2 = each reuse step reuses the step "
                                     "just before it, as DiTFastAttn's attention sharing across timesteps; 0 = never. "
                                     "Sources: docs/dit-defaults.md."),
            ],
        )

    @classmethod
    def execute(cls, model, schedule, start, refresh_every, custom_percents, self_attention=True, cross_attention=True,
                levels="all", cache_limit_mb=1024.0, fp16_maps=True, cache_on_cpu=False,
                dit_refresh_every=2) -> io.NodeOutput:
        mode = SCHEDULE_LABELS.get(schedule, schedule)
        percents = tuple(parse_percent_list(custom_percents)) if mode == "custom" else ()
        config = MapReuseConfig(mode, float(start), int(refresh_every), percents, dit_refresh_every=int(dit_refresh_every),
                                **layer_config(self_attention, cross_attention, levels, cache_limit_mb, fp16_maps,
                                               cache_on_cpu))
        return io.NodeOutput(apply_mapreuse(model, config, node_id=cls.node_id()))
