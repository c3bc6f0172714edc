"""FreeSpeed ToDo (token downsampling, arXiv 2402.13573): an ``attn1_patch`` that downsamples the
self-attention keys/values on their 2-D token grid (``core/tokens.py``); queries keep full resolution.
DiTs (Flux/Chroma, SD3, Wan, Qwen-Image, PixArt): ``nodes/todo_dit.py``.  Design notes: docs/todo.md.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import comfy.patcher_extension as pe
from comfy_api.v0_0_2 import io

from ..core.stats import ToDoStats
from ..core.tokens import METHODS, band_factor, downsample_grid, factor_for_level
from .hooks import CATEGORY, FreeSpeedNode, Run, RunContext, Technique
from .sites import ModelInfo, detect_model, unsupported

DIT_FAMILIES = ("flux", "sd3", "wan", "qwen", "pixart")


@dataclass(frozen=True)
class ToDoConfig:
    factors: tuple = (2.0, 1.0)      # per attention level (1 = highest resolution with attention)
    method: str = "nearest"
    start_percent: float = 0.0
    end_percent: float = 1.0
    bands: bool = False              # the factor from the image size (paper: 2 at 1024², 3 at 1536², 4 at 2048²)

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"FreeSpeed ToDo: unknown method {self.method!r}; expected one of {', '.join(METHODS)}")
        if any(f < 1.0 for f in self.factors):
            raise ValueError("FreeSpeed ToDo: downsampling factors must be >= 1 (1 = off)")

    @property
    def off(self) -> bool:
        return (all(f <= 1.0 for f in self.factors) and not self.bands) or self.end_percent < self.start_percent


@dataclass
class ToDoRun(Run[ToDoStats]):
    kv_shapes: dict = field(default_factory=dict)     # attention level -> (tokens, kept K/V tokens)
    kv_before: int = 0
    kv_after: int = 0
    layout: object = None                             # DiTs: the current call's token layout (PixArt patches)
    factors_used: set = field(default_factory=set)
    replaced: frozenset = frozenset()                 # attn1 replace keys of the current model call (PAG, SAG)


class ToDo(Technique[ToDoRun]):
    name = "ToDo"
    key = "freespeed.todo"
    stats_type = ToDoStats

    def __init__(self, config: ToDoConfig, info: ModelInfo, node_id: Optional[str] = None):
        super().__init__(info, node_id)
        self.config = config

    def new_run(self, ctx: RunContext) -> ToDoRun:
        return ToDoRun(ctx, ToDoStats())

    def install(self, model) -> None:
        super().install(model)
        model.add_wrapper_with_key(pe.WrappersMP.APPLY_MODEL, self.key, self._apply_model)
        model.set_model_attn1_patch(self.attn1_patch)

    def _apply_model(self, executor, x, t, *args, **kwargs):
        """Note which blocks' self-attention another node replaces in this call (PAG's perturbed pass, SAG):
        their K/V stay full, since a replace patch may rely on K/V having the queries' length (PAG returns V)."""
        run = self.run
        to = kwargs.get("transformer_options") if "transformer_options" in kwargs else (args[3] if len(args) > 3 else None)
        if run is None or not isinstance(to, dict):
            return executor(x, t, *args, **kwargs)
        prev, run.replaced = run.replaced, frozenset(((to.get("patches_replace") or {}).get("attn1") or {}).keys())
        try:
            return executor(x, t, *args, **kwargs)
        finally:
            run.replaced = prev

    def attn1_patch(self, n, context, value, extra_options):
        """(n, context, value) -> (n, downsampled context, downsampled value); queries untouched."""
        run = self.run
        if run is None:                      # model evaluated outside a sampling run: do nothing
            return n, context, value
        cfg, st = self.config, run.stats
        block = extra_options.get("block")
        level = self.info.attention_level(block)
        if level is None:
            st.untouched_unknown_block += 1
            return n, context, value
        if run.replaced and (tuple(block[:2]) in run.replaced
                             or (block[0], block[1], extra_options.get("block_index", 0)) in run.replaced):
            st.untouched_attn1_replaced += 1       # another node's attn1 replace computes this self-attention
            return n, context, value
        factor = factor_for_level(level, cfg.factors)
        if cfg.bands and level == 1:
            shape = extra_options.get("original_shape")
            factor = band_factor(8 * int(shape[-2]), 8 * int(shape[-1])) if shape is not None else factor
        if factor <= 1.0:
            st.full_attention_calls += 1
            return n, context, value
        if not run.in_window(cfg.start_percent, cfg.end_percent):
            st.outside_window_calls += 1
            return n, context, value
        shape = extra_options.get("activations_shape")
        h, w = (int(shape[-2]), int(shape[-1])) if shape is not None and len(shape) >= 4 else (0, 0)
        if context.shape[1] != h * w:
            # another patch already changed K/V (a second ToDo, ToMe on K...), or not a grid
            st.untouched_non_grid += 1
            return n, context, value
        ds = downsample_grid(context, h, w, factor, cfg.method)
        if value is context:
            ds_v = ds
        elif value.shape[1] == h * w:
            ds_v = downsample_grid(value, h, w, factor, cfg.method)
        else:
            st.untouched_non_grid += 1
            return n, context, value
        st.downsampled_calls += 1
        st.calls_per_level[f"level{level}"] = st.calls_per_level.get(f"level{level}", 0) + 1
        run.kv_before += h * w
        run.kv_after += ds.shape[1]
        run.kv_shapes[level] = (h * w, ds.shape[1])
        return n, ds, ds_v

    def finish_stats(self, run: ToDoRun) -> None:
        s, cfg = run.stats, self.config
        s.kv_tokens_kept_pct = round(100.0 * run.kv_after / run.kv_before, 1) if run.kv_before else 100.0
        s.kv_tokens = {(k if isinstance(k, str) else f"level{k}"): f"{a}->{b}"
                       for k, (a, b) in sorted(run.kv_shapes.items(), key=lambda kv: str(kv[0]))}
        s.window_pct = [round(100 * cfg.start_percent, 1), round(100 * cfg.end_percent, 1)]
        s.factors = sorted(run.factors_used) if run.factors_used else list(cfg.factors)
        s.method = cfg.method
        s.bands = cfg.bands


def apply_todo(model, config: ToDoConfig, node_id: Optional[str] = None):
    """Clone ``model`` and install ToDo on the clone (the input MODEL is never modified)."""
    info = detect_model(model)
    if not info.is_unet and info.family not in DIT_FAMILIES:
        raise unsupported("ToDo", info, "ToDo needs to know which attention tokens form the image's 2-D grid; this "
                                        "model's token layout is not known to FreeSpeed.",
                          "SD1.x/SD2.x, SDXL, Flux/Chroma, SD3, Wan, Qwen-Image, PixArt")
    if info.is_unet:
        return ToDo(config, info, node_id).patched_clone(model)
    from .todo_dit import ToDoDiT
    return ToDoDiT(config, info, node_id).patched_clone(model)


class ToDoNode(FreeSpeedNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="FreeSpeedToDo",
            display_name="FreeSpeed ToDo (token downsampling)",
            category=CATEGORY,
            description=("Token downsampling (ToDo, arXiv 2402.13573): self-attention keys/values are downsampled on "
                         "their 2-D token grid, queries keep full resolution. Biggest gains at high resolution "
                         "(1024² and up on SD1.5, 1536² and up on SDXL). DiTs (Flux/Chroma, SD3, Wan, Qwen-Image, "
                         "PixArt): only the image keys/values are downsampled (per frame on Wan), every text token "
                         "is kept, factor_level_1 is the factor; on DiTs attention is a smaller share of the work, "
                         "so it pays off from ~2 MP on (PixArt: nearest with an integer factor dividing the grid)."),
            inputs=[
                io.Model.Input("model"),
                io.Float.Input("factor_level_1", default=2.0, min=1.0, max=8.0, step=0.5,
                               tooltip="K/V downsampling factor at attention level 1, the highest-resolution level "
                                       "with attention (64x64 tokens: SD1.5 at 512², SDXL at 1024²); on DiTs the image K/V "
                                       "factor. 1 = off. Paper: 2 at 1024², 3 at 1536², 4 at 2048²."),
                io.Float.Input("factor_level_2", default=1.0, min=1.0, max=8.0, step=0.5,
                               tooltip="K/V downsampling factor at attention level 2 (half the resolution of level 1). "
                                       "1 = off; >1 costs more quality."),
                io.Combo.Input("method", options=list(METHODS), default="nearest",
                               tooltip="How K/V tokens are downsampled: nearest (paper default), avg-pool, bilinear."),
                io.Float.Input("start_percent", default=0.0, min=0.0, max=1.0, step=0.01,
                               tooltip="Start of the active window, in percent of denoising (0 = first step)."),
                io.Float.Input("end_percent", default=1.0, min=0.0, max=1.0, step=0.01,
                               tooltip="End of the active window, in percent of denoising (1 = last step)."),
                io.Boolean.Input("resolution_bands", default=False, optional=True,
                                 tooltip="Pick the level-1 factor (DiTs: the factor) from the image size as the paper "
                                         "does: 2 up to ~1280², 3 up to ~1792², 4 above, instead of factor_level_1."),
            ],
            outputs=[io.Model.Output()],
            hidden=[io.Hidden.unique_id],
        )

    @classmethod
    def execute(cls, model, factor_level_1, factor_level_2, method, start_percent, end_percent,
                resolution_bands=False) -> io.NodeOutput:
        config = ToDoConfig((float(factor_level_1), float(factor_level_2)), method, float(start_percent),
                            float(end_percent), bool(resolution_bands))
        return io.NodeOutput(apply_todo(model, config, node_id=cls.node_id()))
