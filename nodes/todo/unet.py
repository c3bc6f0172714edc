"""FreeSpeed ToDo (token downsampling, arXiv 2402.13573): an ``attn1_patch`` that downsamples the
self-attention keys/values on their 2-D token grid (``core/tokens.py``); queries keep full resolution.
DiTs (Flux/Chroma, SD3, Wan, Qwen-Image, PixArt): ``nodes/todo/dit.py``.  Design notes: docs/todo.md.
"""
from __future__ import annotations


import comfy.patcher_extension as pe

from ...core.stats import ToDoStats
from ...core.tokens import band_factor, downsample_grid, factor_for_level
from ..hooks import Technique
from .config import ToDoConfig, ToDoRun


class ToDo(Technique[ToDoRun]):
    name = "ToDo"
    key = "freespeed.todo"
    stats_type = ToDoStats
    run_type = ToDoRun
    config: ToDoConfig

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
