"""FreeSpeed AT-EDM (attention-driven pruning, Wang et al., CVPR 2024, arXiv 2405.05252; no official code):
each chosen UNet transformer stack is object-patched; its pruning layer's self-attention map ranks tokens
(G-WPR), the following layers run on the kept tokens, pruned tokens are recovered before the convolutions.
The maths, DSAP and FLOPs are in ``core/pruning.py``; design notes (placement, stacking): docs/atedm.md.
"""
from __future__ import annotations

from typing import Optional

import torch

import comfy.patcher_extension as pe

from ...core.pruning import kept_count, other_flops, stack_flops
from ...core.stats import ATEDMStats
from ..hooks import Technique, installed, logger
from ..sites import ModelInfo, StackSite, patch_forward, unet_inventory
from .config import ATEDMConfig, ATEDMRun
from .stack import map_bytes, patched, pruned_forward


class ATEDM(Technique[ATEDMRun]):
    name = "AT-EDM"
    key = "freespeed.atedm"
    stats_type = ATEDMStats
    run_type = ATEDMRun

    def __init__(self, config: ATEDMConfig, info: ModelInfo, stacks: list[StackSite], node_id: Optional[str] = None):
        super().__init__(config, info, node_id)
        self.stacks = stacks
        self.inventory = None

    def install(self, model) -> None:
        self.replace_earlier(model)
        super().install(model)
        model.add_wrapper_with_key(pe.WrappersMP.APPLY_MODEL, self.key, self._apply_model)
        pruned = set() if self.config.off else {id(s.module) for s in self.stacks}
        self.inventory = unet_inventory(model, pruned)
        if self.config.off:
            return
        for stack in self.stacks:
            patch_forward(model, stack.path, lambda orig, s=stack: self._make_forward(s, orig))


    # -- per model call: FLOPs of everything outside the patched stacks ----------------------------
    def _apply_model(self, executor, x, t, *args, **kwargs):
        run = self.run
        if run is not None:
            try:
                ctx = args[1] if len(args) > 1 else kwargs.get("c_crossattn")
                n_ctx = int(ctx.shape[1]) if torch.is_tensor(ctx) and ctx.ndim == 3 else 77
                if x.ndim == 4:
                    run.flops.other += x.shape[0] * other_flops(self.inventory, int(x.shape[-2]), int(x.shape[-1]),
                                                                n_ctx)
            except Exception:      # accounting must never break sampling
                pass
        return executor(x, t, *args, **kwargs)

    # -- the patched stack forward ------------------------------------------------------------------
    def _make_forward(self, stack: StackSite, orig):
        tech = self

        def forward(x, context=None, transformer_options={}):
            run = tech.run
            info = run.current if run is not None else None
            if info is None:
                return orig(x, context, transformer_options)
            st = run.stats
            ratio = tech.config.dsap.ratio_at(info.percent, stack.edge)
            left = None
            if ratio <= 0.0:
                st.stack_calls_full += 1
                left = True
            elif any(patched(b, "attn1") for b in list(stack.module.transformer_blocks)[1:]):
                st.stack_calls_left_foreign_attn1 += 1
                left = True
            else:
                n = int(x.shape[-2]) * int(x.shape[-1])
                need = map_bytes(int(x.shape[0]), n, stack.shapes[0].heads)
                if need > tech.config.map_budget_mb * 2 ** 20:
                    st.stack_calls_left_map_budget += 1
                    left = True
                    if not run.warned_budget:
                        run.warned_budget = True
                        logger.warning("FreeSpeed AT-EDM: the self-attention map of a %d-token stack (batch %d) needs "
                                       "%.0f MB, over map_budget_mb %g: such stacks run unpruned", n, int(x.shape[0]),
                                       need / 2 ** 20, tech.config.map_budget_mb)
            if left:
                tech._account(run, stack, x, context, None, None)
                return orig(x, context, transformer_options)
            return tech._pruned(run, stack, x, context, transformer_options, ratio)
        return forward

    def _pruned(self, run: ATEDMRun, stack: StackSite, x, context, transformer_options, ratio: float):
        n = int(x.shape[-2]) * int(x.shape[-1])
        keep = kept_count(n, ratio)
        out, call = pruned_forward(stack.module, x, context, transformer_options, keep, self.config.iterations)
        st, b, depth = run.stats, int(x.shape[0]), len(stack.shapes)
        if call.kept is not None:
            st.stack_calls_pruned += 1
            lv = f"level{stack.att_level}"
            st.pruned_calls_per_level[lv] = st.pruned_calls_per_level.get(lv, 0) + 1
            st.attn2_full_grid_calls += len(call.full_grid)
            run.kept_shapes[stack.att_level] = (n, keep)
            after = depth - 1 if depth > 1 else 1
            run.slots[0] += b * n * after
            run.slots[1] += b * keep * after
        elif call.refused == "kv":
            st.stack_calls_left_kv_changed += 1
        else:
            st.stack_calls_left_no_map += 1
        pruned = call.kept is not None
        self._account(run, stack, x, context, keep if pruned else None, call.full_grid if pruned else None)
        return out

    # -- FLOPs and stats --------------------------------------------------------------------------------
    def _account(self, run: ATEDMRun, stack: StackSite, x, context, keep: Optional[int], full_grid) -> None:
        try:
            n = int(x.shape[-2]) * int(x.shape[-1]) if x.ndim == 4 else int(x.shape[1])
            context = context[0] if isinstance(context, list) else context
            n_ctx = int(context.shape[1]) if torch.is_tensor(context) else 0
            run.flops.add_stack(int(x.shape[0]), stack_flops(stack.shapes, n, n_ctx, keep, tuple(full_grid or ()),
                                                             self.config.iterations))
        except Exception:      # accounting must never break sampling
            pass

    def finish_stats(self, run: ATEDMRun) -> None:
        s, cfg = run.stats, self.config
        for k, v in run.flops.summary(s.evaluations).items():
            setattr(s, k, v)
        s.tokens_kept_pct = round(100.0 * run.slots[1] / run.slots[0], 1) if run.slots[0] else 100.0
        s.kept_tokens = {(k if isinstance(k, str) else f"level{k}"): f"{a}->{b}"
                         for k, (a, b) in sorted(run.kept_shapes.items(), key=lambda kv: str(kv[0]))}
        s.ratio, s.dsap_end_pct, s.early_scale = cfg.ratio, round(100 * cfg.dsap_end, 1), cfg.early_scale
        s.levels, s.stacks = list(cfg.levels), len(self.stacks)
        self._warn_left_to_others(run)

    def _warn_left_to_others(self, run: ATEDMRun) -> None:
        """One warning when another FreeSpeed node on the same MODEL kept AT-EDM from pruning stacks."""
        s = run.stats
        control = getattr(s, "stack_calls_left_control", 0)
        if control:
            logger.warning("FreeSpeed AT-EDM: %d block-range calls ran unpruned because a full-length residual (a "
                           "ControlNet, Wan VACE hints, Wan Animate's face adapter, a Qwen-Image block patch) is added "
                           "after the first block of the pruned range (pruned tokens would miss it); move the range "
                           "with dit_range_start/end to blocks without such residuals", control)
        if not (s.stack_calls_left_kv_changed or s.stack_calls_left_no_map):
            return
        try:
            others = {t.name for t in installed(run.eval.guider.model_patcher)}
        except AttributeError:          # no guider seen (no evaluation): nothing to name
            others = set()
        if s.stack_calls_left_kv_changed and "ToDo" in others:
            logger.warning("FreeSpeed AT-EDM: %d stack calls ran unpruned because ToDo shortened the keys/values of "
                           "their first layer, and AT-EDM ranks tokens by that layer's square self-attention map (set "
                           "ToDo's factor to 1 at the levels AT-EDM prunes)", s.stack_calls_left_kv_changed)
        if s.stack_calls_left_no_map and "Attention Map Reuse" in others:
            logger.warning("FreeSpeed AT-EDM: %d stack calls ran unpruned because Attention Map Reuse computes their "
                           "first layer's self-attention itself (its keep and reuse steps), so AT-EDM gets no attention "
                           "map to rank tokens there", s.stack_calls_left_no_map)
