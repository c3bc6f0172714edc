"""FreeSpeed ToDo (token downsampling) -- Smith, Saxena, Saha, arXiv 2402.13573.

Self-attention cost at the highest-resolution levels is quadratic in the token count.  ToDo
(Sec. 3.2) keeps every query but downsamples the *keys and values* on their 2-D token grid, so
QKᵀ and the map·V product shrink by factor² while the output keeps its token count (no unmerge
step, unlike ToMe).  Here that is an ``attn1_patch``: it receives the normalised hidden states that
feed the K/V projections, downsamples them, and the block's own attention (whatever kernel the
user runs: SDPA, xformers, sage, sub-quadratic) works on the shorter sequence.

Levels are *attention levels*: level 1 is the highest-resolution level that has attention (64x64
tokens for SD1.5 at 512² and for SDXL at 1024²: SDXL has no attention at its full latent
resolution, so its level 1 is the second UNet level), level 2 the next one.  The reference code
and comfy-todo key levels by resolution, which makes the default a no-op on SDXL.

Flux and SD3 are refused with a clear message: their attention mixes text and image tokens with
rotary/positional terms already applied to K, so pooled keys are not the paper's method.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from comfy_api.v0_0_2 import io

from ..core.tokens import METHODS, downsample_grid, factor_for_level
from .hooks import CATEGORY, ModelInfo, RunState, Technique, detect_model, require_unet


@dataclass(frozen=True)
class ToDoConfig:
    factors: tuple = (2.0, 1.0)      # per attention level (1 = highest resolution with attention)
    method: str = "nearest"
    start_percent: float = 0.0
    end_percent: float = 1.0

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"FreeSpeed ToDo: unknown method {self.method!r}; expected one of {', '.join(METHODS)}")
        if any(f < 1.0 for f in self.factors):
            raise ValueError("FreeSpeed ToDo: downsampling factors must be >= 1 (1 = off)")

    @property
    def off(self) -> bool:
        return all(f <= 1.0 for f in self.factors) or self.end_percent < self.start_percent


class ToDo(Technique):
    name = "ToDo"
    key = "freespeed.todo"

    def __init__(self, config: ToDoConfig, info: ModelInfo, node_id: Optional[str] = None):
        super().__init__(info, node_id)
        self.config = config

    def install(self, model) -> None:
        super().install(model)
        model.set_model_attn1_patch(self.attn1_patch)

    def attn1_patch(self, n, context, value, extra_options):
        """(n, context, value) -> (n, downsampled context, downsampled value); queries untouched."""
        run = self.run
        if run is None:                      # model evaluated outside a sampling run: do nothing
            return n, context, value
        cfg = self.config
        level = self.info.attention_level(extra_options.get("block"))
        if level is None:
            run.count("untouched_unknown_block")
            return n, context, value
        factor = factor_for_level(level, cfg.factors)
        if factor <= 1.0:
            run.count("full_attention_calls")
            return n, context, value
        if not run.in_window(cfg.start_percent, cfg.end_percent):
            run.count("outside_window_calls")
            return n, context, value
        shape = extra_options.get("activations_shape")
        h, w = (int(shape[-2]), int(shape[-1])) if shape is not None and len(shape) >= 4 else (0, 0)
        if context.shape[1] != h * w:
            # another patch already changed K/V (a second ToDo, ToMe on K...), or not a grid
            run.count("untouched_non_grid")
            return n, context, value
        ds = downsample_grid(context, h, w, factor, cfg.method)
        if value is context:
            ds_v = ds
        elif value.shape[1] == h * w:
            ds_v = downsample_grid(value, h, w, factor, cfg.method)
        else:
            run.count("untouched_non_grid")
            return n, context, value
        run.count("downsampled_calls")
        run.count(f"level{level}_calls")
        run.count("kv_tokens_before", h * w)
        run.count("kv_tokens_after", ds.shape[1])
        run.kv_shapes[level] = (h * w, ds.shape[1])
        return n, ds, ds_v

    def new_run(self, schedule, noise) -> RunState:
        run = super().new_run(schedule, noise)
        run.kv_shapes = {}
        return run

    def stats(self, run: RunState) -> dict[str, Any]:
        s = super().stats(run)
        for k in ("downsampled_calls", "outside_window_calls", "full_attention_calls", "untouched_non_grid",
                  "untouched_unknown_block"):
            s.setdefault(k, 0)
        before, after = s.pop("kv_tokens_before", 0), s.pop("kv_tokens_after", 0)
        s["kv_tokens_kept_pct"] = round(100.0 * after / before, 1) if before else 100.0
        s["kv_tokens"] = {f"level{k}": f"{a}->{b}" for k, (a, b) in sorted(run.kv_shapes.items())}
        s["window_pct"] = [round(100 * self.config.start_percent, 1), round(100 * self.config.end_percent, 1)]
        s["factors"] = list(self.config.factors)
        s["method"] = self.config.method
        return s

    def summary(self, s: dict[str, Any]) -> str:
        toks = ", ".join(f"{k} {v}" for k, v in s["kv_tokens"].items()) or "none"
        untouched = s["untouched_non_grid"] + s["untouched_unknown_block"]
        return (f"{s['evaluations']} evaluations, {s['downsampled_calls']} self-attention calls downsampled "
                f"({s['outside_window_calls']} outside the {s['window_pct'][0]:g}-{s['window_pct'][1]:g}% window, "
                f"{s['full_attention_calls']} at levels left full, {untouched} untouched), "
                f"K/V tokens kept {s['kv_tokens_kept_pct']:g}% ({toks}), {s['wall_s']:.2f} s")


def apply_todo(model, config: ToDoConfig, node_id: Optional[str] = None):
    """Clone ``model`` and install ToDo on the clone (the input MODEL is never modified)."""
    info = detect_model(model)
    require_unet(info, "ToDo", "ToDo downsamples the 2-D token grid of UNet self-attention; Flux/SD3 attention "
                               "mixes text and image tokens with positional terms already applied to the keys.")
    m = model.clone()
    ToDo(config, info, node_id).install(m)
    return m


class ToDoNode(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="FreeSpeedToDo",
            display_name="FreeSpeed ToDo (token downsampling)",
            category=CATEGORY,
            description=("Token downsampling (ToDo, arXiv 2402.13573): self-attention keys/values are downsampled on "
                         "their 2-D token grid, queries keep full resolution. Biggest gains at high resolution "
                         "(1024² and up on SD1.5, 1536² and up on SDXL)."),
            inputs=[
                io.Model.Input("model"),
                io.Float.Input("factor_level_1", default=2.0, min=1.0, max=8.0, step=0.5,
                               tooltip="K/V downsampling factor at attention level 1, the highest-resolution level "
                                       "with attention (64x64 tokens: SD1.5 at 512², SDXL at 1024²). 1 = off. "
                                       "Paper: 2 at 1024², 3 at 1536², 4 at 2048²."),
                io.Float.Input("factor_level_2", default=1.0, min=1.0, max=8.0, step=0.5,
                               tooltip="K/V downsampling factor at attention level 2 (half the resolution of level 1). "
                                       "1 = off; >1 costs more quality."),
                io.Combo.Input("method", options=list(METHODS), default="nearest",
                               tooltip="How K/V tokens are downsampled: nearest (paper default), avg-pool, bilinear."),
                io.Float.Input("start_percent", default=0.0, min=0.0, max=1.0, step=0.01,
                               tooltip="Start of the active window, in percent of denoising (0 = first step)."),
                io.Float.Input("end_percent", default=1.0, min=0.0, max=1.0, step=0.01,
                               tooltip="End of the active window, in percent of denoising (1 = last step)."),
            ],
            outputs=[io.Model.Output()],
            hidden=[io.Hidden.unique_id],
        )

    @classmethod
    def validate_inputs(cls, method=None):
        # ComfyUI 0.3.64 compares V1 list combos with their options, never a V3 Combo: check it here
        # (only `method`: the inputs named here skip ComfyUI's own min/max checks)
        if method is not None and method not in METHODS:
            return f"method must be one of {', '.join(METHODS)}, got {method!r}"
        return True

    @classmethod
    def execute(cls, model, factor_level_1, factor_level_2, method, start_percent, end_percent) -> io.NodeOutput:
        config = ToDoConfig((float(factor_level_1), float(factor_level_2)), method, float(start_percent),
                            float(end_percent))
        return io.NodeOutput(apply_todo(model, config, node_id=cls.hidden.unique_id if cls.hidden else None))
