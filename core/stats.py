"""What one sampling run of a technique did: one dataclass per technique, the contract between the
hooks that count, the log line, the canvas readout (:mod:`core.readout`, the web extension) and the
benchmark.  The JSON a node publishes is :meth:`RunStats.as_dict`: the field names are the keys.

Counters are fields the hooks increment (``run.stats.downsampled_calls += 1``); summary fields are
filled when the run ends.  Pure Python: readable anywhere, tested without a host.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Optional


@dataclass
class RunStats:
    technique: str = ""
    model: str = ""
    evaluations: int = 0             # model evaluations (PREDICT_NOISE calls)
    extra_evaluations: int = 0       # of them, at sigmas off the schedule (multi-stage samplers)
    steps: int = 0
    wall_s: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Optional[dict]) -> "RunStats":
        """The stats of a published dict; unknown keys are ignored, missing or ill-typed ones default."""
        d = d if isinstance(d, dict) else {}
        kw = {}
        for f in dataclasses.fields(cls):
            if f.name not in d:
                continue
            v, default = d[f.name], _default(f)
            if isinstance(default, bool) or default is None:
                kw[f.name] = v
            elif isinstance(default, (int, float)) and not isinstance(v, bool):
                try:
                    kw[f.name] = type(default)(v) if isinstance(default, float) else int(round(float(v)))
                except (TypeError, ValueError):
                    pass
            elif isinstance(default, (list, dict, str)) and isinstance(v, type(default)):
                kw[f.name] = v
        return cls(**kw)

    def summary(self) -> str:
        return f"{self.evaluations} evaluations, {self.wall_s:.2f} s"


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:         # type: ignore[misc]
        return f.default_factory()                           # type: ignore[misc]
    return None


@dataclass
class ToDoStats(RunStats):
    technique: str = "ToDo"
    downsampled_calls: int = 0
    outside_window_calls: int = 0
    full_attention_calls: int = 0
    untouched_non_grid: int = 0
    untouched_unknown_block: int = 0
    untouched_attn1_replaced: int = 0                         # blocks whose attn1 another node replaces (PAG, SAG)
    calls_per_level: dict = field(default_factory=dict)       # "level1" -> downsampled calls
    kv_tokens_kept_pct: float = 100.0
    kv_tokens: dict = field(default_factory=dict)             # "level1" -> "4096->1024"
    window_pct: list = field(default_factory=lambda: [0.0, 100.0])
    factors: list = field(default_factory=list)
    method: str = ""
    bands: bool = False                                       # factor from the image size (paper's bands)
    text_kv_tokens: int = 0                                   # DiTs: text K/V tokens per joint call (all kept)

    def summary(self) -> str:
        toks = ", ".join(f"{k} {v}" for k, v in self.kv_tokens.items()) or "none"
        if "image" in self.kv_tokens:          # a DiT: image K/V only, text kept
            return (f"{self.evaluations} evaluations, {self.downsampled_calls} attention calls with image K/V "
                    f"downsampled ({self.outside_window_calls} outside the {self.window_pct[0]:g}-"
                    f"{self.window_pct[1]:g}% window, {self.untouched_non_grid} other calls untouched), image K/V "
                    f"tokens kept {self.kv_tokens_kept_pct:g}% ({self.kv_tokens['image']}), all "
                    f"{self.text_kv_tokens} text tokens kept, {self.wall_s:.2f} s")
        untouched = self.untouched_non_grid + self.untouched_unknown_block + self.untouched_attn1_replaced
        return (f"{self.evaluations} evaluations, {self.downsampled_calls} self-attention calls downsampled "
                f"({self.outside_window_calls} outside the {self.window_pct[0]:g}-{self.window_pct[1]:g}% window, "
                f"{self.full_attention_calls} at levels left full, {untouched} untouched), "
                f"K/V tokens kept {self.kv_tokens_kept_pct:g}% ({toks}), {self.wall_s:.2f} s")


@dataclass
class TGateStats(RunStats):
    technique: str = "T-GATE"
    gate_pct: float = 100.0
    gate_sigma: Optional[float] = None          # None: the gate is off (100%)
    steps_before_gate: int = 0
    steps_after_gate: int = 0
    cache_step: Optional[int] = None
    keep_cfg: bool = False
    self_attention: bool = False
    attn2_calls_skipped: int = 0
    attn2_calls_computed: int = 0
    attn2_calls_computed_no_cache: int = 0
    attn2_calls_computed_shape_mismatch: int = 0
    attn2_capture_skipped_layout: int = 0
    attn2_replace_calls_dropped_after_gate: int = 0
    attn2_replace_captured: int = 0
    attn1_calls_skipped: int = 0
    attn1_calls_computed: int = 0
    attn1_cache_misses: int = 0
    uncond_evaluations_skipped: int = 0
    uncond_evaluations: int = 0
    cache: dict = field(default_factory=dict)
    cache_peak_mb: float = 0.0
    mode: str = "cross-attention"               # what is frozen: "cross-attention" or (joint DiTs) "text stream"
    text_tokens_frozen: int = 0                 # joint DiTs: text tokens whose stream is frozen after the gate

    def summary(self) -> str:
        head = "gate 100% (off)" if self.gate_sigma is None else f"gate {self.gate_pct:g}% (sigma {self.gate_sigma:g})"
        sa = (f", self-attention {self.attn1_calls_skipped} skipped / {self.attn1_calls_computed} computed"
              if self.self_attention else "")
        what = ("cross-attention" if self.mode != "text stream" else
                f"text stream ({self.text_tokens_frozen} tokens) frozen in")
        unit = "calls skipped" if self.mode != "text stream" else "block calls"
        return (f"{head}: {self.steps_before_gate} steps before, {self.steps_after_gate} after; {what} "
                f"{self.attn2_calls_skipped} {unit} / {self.attn2_calls_computed} computed; "
                f"{self.uncond_evaluations_skipped} uncond evaluations skipped"
                f"{' (CFG kept)' if self.keep_cfg else ''}{sa}; cache peak {self.cache_peak_mb:g} MB; "
                f"{self.evaluations} model calls, {self.wall_s:.2f} s")


@dataclass
class EncoderPropagationStats(RunStats):
    technique: str = "Encoder Propagation"
    schedule: str = ""
    planned_key_steps: list = field(default_factory=list)
    key_steps: int = 0
    decoder_only_steps: int = 0
    parallel_steps: int = 0
    max_parallel: int = 1
    largest_parallel_batch: int = 1
    decoder_only_calls: int = 0
    served_parallel_calls: int = 0
    full_extra_evaluations: int = 0
    full_unkeyed_calls: int = 0
    full_uncaptured_calls: int = 0
    miss_full_calls: int = 0
    capture_incomplete: int = 0
    controlnet: str = "reuse"
    controlnet_skipped_evaluations: int = 0
    noise_injection: float = 0.0
    injected_steps: int = 0
    injection_into_predictor: int = 0
    injection_skipped_mask: int = 0
    injection_skipped_shape: int = 0
    feature_cache_peak_mb: float = 0.0
    parallel_batch_peak_mb: float = 0.0
    parallel_outputs_peak_mb: float = 0.0
    front_blocks: str = ""                  # DiTs: "front/total" blocks propagated ("" = a UNet's encoder)
    front_share: float = 0.0                # DiTs: front blocks / all blocks

    def summary(self) -> str:
        if self.front_blocks:
            inj = f", prior noise {self.noise_injection:g}·z_T at {self.injected_steps} steps" if self.noise_injection else ""
            return (f"{self.steps} steps ({self.schedule}): {self.key_steps} key steps (every block), "
                    f"{self.decoder_only_steps} with the front {self.front_blocks} blocks propagated, "
                    f"{self.full_extra_evaluations + self.miss_full_calls + self.full_unkeyed_calls} other full "
                    f"calls{inj}; residuals {self.feature_cache_peak_mb:g} MB, {self.wall_s:.2f} s")
        inj = (f"prior noise {self.noise_injection:g}·z_T at {self.injected_steps} steps"
               if self.noise_injection > 0 else "no noise injection")
        other = self.full_extra_evaluations + self.miss_full_calls + self.full_unkeyed_calls
        cn = self.controlnet_skipped_evaluations
        return (f"{self.steps} steps ({self.schedule}): {self.key_steps} key steps (full UNet), "
                f"{self.decoder_only_steps} decoder-only ({self.parallel_steps} decoded in parallel, batches up to "
                f"{self.largest_parallel_batch} steps), {other} other full evaluations, "
                f"{'ControlNet skipped at ' + str(cn) + ' evaluations, ' if cn else ''}{inj}; "
                f"features {self.feature_cache_peak_mb:g} MB, parallel batch {self.parallel_batch_peak_mb:g} MB, "
                f"{self.wall_s:.2f} s")


@dataclass
class MapReuseStats(RunStats):
    technique: str = "Attention Map Reuse"
    schedule: str = ""
    start_pct: Optional[float] = None        # late schedule
    refresh_every: Optional[int] = None      # late schedule
    percents: Optional[str] = None           # custom schedule
    reuse_steps: list = field(default_factory=list)
    keep_steps: list = field(default_factory=list)
    layers_patched: int = 0
    layers_left_to_other_node: int = 0
    layers_left_alone_budget: int = 0
    layers_reused: int = 0
    reuse_calls: int = 0
    keep_calls: int = 0
    keep_calls_left_alone: int = 0
    reuse_calls_left_alone: int = 0
    reuse_fallback_no_map: int = 0
    reuse_fallback_token_mismatch: int = 0
    original_calls_masked: int = 0
    original_calls_batch_mismatch: int = 0   # queries regrouped by another node (HyperTile's tiles): computed normally
    cache: dict = field(default_factory=dict)
    cache_peak_mb: float = 0.0
    reuses: str = "maps"                     # "maps" (UNets) or "outputs" (DiTs: each block's attention output)

    def summary(self) -> str:
        what = "a map" if self.reuses != "outputs" else "an attention output"
        return (f"{len(self.reuse_steps)} reuse steps {self.reuse_steps} ({self.reuses} kept at {self.keep_steps}); "
                f"{self.reuse_calls} layer calls reused {what}, {self.keep_calls} kept one; "
                f"{self.layers_reused}/{self.layers_patched} layers reused, {self.layers_left_alone_budget} left "
                f"alone (map budget), {self.layers_left_to_other_node} left to another node; "
                f"{self.reuse_fallback_token_mismatch} K/V length mismatches; cache peak {self.cache_peak_mb:g} MB; "
                f"{self.evaluations} model calls, {self.wall_s:.2f} s")


@dataclass
class ATEDMStats(RunStats):
    technique: str = "AT-EDM"
    stack_calls_pruned: int = 0
    stack_calls_full: int = 0
    stack_calls_left_kv_changed: int = 0
    stack_calls_left_foreign_attn1: int = 0
    stack_calls_left_no_map: int = 0
    stack_calls_left_map_budget: int = 0
    attn2_full_grid_calls: int = 0
    pruned_calls_per_level: dict = field(default_factory=dict)     # "level1" -> pruned stack calls
    gflops_per_eval_full: float = 0.0
    gflops_per_eval_run: float = 0.0
    flops_saved_pct: float = 0.0
    attn_ff_saved_pct: float = 0.0
    tokens_kept_pct: float = 100.0
    kept_tokens: dict = field(default_factory=dict)                # "level1" -> "4096->1229"
    ratio: float = 0.0
    dsap_end_pct: float = 0.0
    early_scale: float = 1.0
    levels: list = field(default_factory=list)
    stacks: int = 0
    stack_calls_left_control: int = 0          # DiTs: calls whose range starts at a block with a ControlNet residual
    dit_range: str = ""                        # DiTs: "blocks a-b of n" (the pruned range)
    recovery: str = ""                         # DiTs: "similar" | "previous"

    @property
    def left_alone(self) -> int:
        return (self.stack_calls_left_kv_changed + self.stack_calls_left_foreign_attn1 + self.stack_calls_left_no_map
                + self.stack_calls_left_map_budget + self.stack_calls_left_control)

    def summary(self) -> str:
        toks = ", ".join(f"{k} {v}" for k, v in self.kept_tokens.items()) or "none"
        if self.dit_range:
            return (f"{self.evaluations} evaluations, {self.stack_calls_pruned} calls pruned in {self.dit_range} "
                    f"({self.stack_calls_full} unpruned by DSAP or size, {self.left_alone} left alone), image tokens "
                    f"kept {self.tokens_kept_pct:g}% ({toks}), {self.recovery} recovery, FLOPs saved "
                    f"{self.flops_saved_pct:g}% ({self.gflops_per_eval_full:g} -> {self.gflops_per_eval_run:g} "
                    f"GFLOPs per evaluation, blocks only), {self.wall_s:.2f} s")
        return (f"{self.evaluations} evaluations, {self.stack_calls_pruned} stack calls pruned "
                f"({self.stack_calls_full} full by DSAP, {self.left_alone} left alone), tokens kept "
                f"{self.tokens_kept_pct:g}% ({toks}), FLOPs saved {self.flops_saved_pct:g}% "
                f"({self.gflops_per_eval_full:g} -> {self.gflops_per_eval_run:g} GFLOPs per evaluation), "
                f"{self.wall_s:.2f} s")


__all__ = ["RunStats", "ToDoStats", "TGateStats", "EncoderPropagationStats", "MapReuseStats", "ATEDMStats"]
