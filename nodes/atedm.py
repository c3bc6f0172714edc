"""FreeSpeed AT-EDM (attention-driven pruning, Wang et al., CVPR 2024, arXiv 2405.05252; no official code):
each chosen UNet transformer stack is object-patched; its pruning layer's self-attention map ranks tokens
(G-WPR), the following layers run on the kept tokens, pruned tokens are recovered before the convolutions.
The maths, DSAP and FLOPs are in ``core/pruning.py``; design notes (placement, stacking): docs/atedm.md.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch

import comfy.patcher_extension as pe
from comfy_api.v0_0_2 import io

from ..core.pruning import DSAP, FlopsTally, kept_count, other_flops, stack_flops
from ..core.stats import ATEDMStats
from .hooks import CATEGORY, FreeSpeedNode, Run, RunContext, Technique, installed, logger
from .atedm_stack import map_bytes, patched, pruned_forward
from .sites import ModelInfo, StackSite, detect_model, patch_forward, transformer_stacks, unet_inventory, unsupported

LEVEL_CHOICES = {"1+2": (1, 2), "1": (1,), "2": (2,), "1+2+3": (1, 2, 3)}
RECOVERY = ("similar", "previous")
DIT_FAMILIES = ("flux", "sd3", "wan", "qwen", "pixart")


@dataclass(frozen=True)
class ATEDMConfig:
    ratio: float = 0.7                 # target pruning ratio (fraction of tokens removed)
    dsap_end: float = 0.3              # percent of denoising where DSAP's early phase ends
    early_scale: float = 1.0           # early-phase ratio of non-edge stacks, as a fraction of `ratio`
    levels: tuple = (1, 2)             # attention levels whose stacks are pruned
    iterations: int = 5                # G-WPR power iterations
    map_budget_mb: float = 2048.0      # largest explicit-map memory per stack call (mean map + one head chunk)
    dit_start: float = 0.25            # DiTs: the pruned range of blocks, as fractions of the blocks (forward order)
    dit_end: float = 0.75
    recovery: str = "similar"          # DiTs: "similar" (most-attended kept token's residual) | "previous" (own, last step)

    def __post_init__(self):
        DSAP(self.ratio, self.dsap_end, self.early_scale)       # validates
        if self.iterations < 1:
            raise ValueError("FreeSpeed AT-EDM: G-WPR needs at least one iteration")
        if self.map_budget_mb <= 0:
            raise ValueError("FreeSpeed AT-EDM: the map budget must be positive")
        if not 0.0 <= self.dit_start < self.dit_end <= 1.0:
            raise ValueError("FreeSpeed AT-EDM: the DiT block range needs 0 <= start < end <= 1")
        if self.recovery not in RECOVERY:
            raise ValueError(f"FreeSpeed AT-EDM: recovery must be one of {', '.join(RECOVERY)}")

    @property
    def dsap(self) -> DSAP:
        return DSAP(self.ratio, self.dsap_end, self.early_scale)

    @property
    def off(self) -> bool:
        return self.ratio <= 0.0 or not self.levels


@dataclass
class ATEDMRun(Run[ATEDMStats]):
    flops: FlopsTally = field(default_factory=FlopsTally)
    slots: list = field(default_factory=lambda: [0, 0])     # token-layer slots after the pruning point: full, kept
    kept_shapes: dict = field(default_factory=dict)         # attention level -> (tokens, kept) of the latest call
    warned_budget: bool = False


class ATEDM(Technique[ATEDMRun]):
    name = "AT-EDM"
    key = "freespeed.atedm"
    stats_type = ATEDMStats

    def __init__(self, config: ATEDMConfig, info: ModelInfo, stacks: list[StackSite], node_id: Optional[str] = None):
        super().__init__(info, node_id)
        self.config = config
        self.stacks = stacks
        self.inventory = None

    def install(self, model) -> None:
        super().install(model)
        model.add_wrapper_with_key(pe.WrappersMP.APPLY_MODEL, self.key, self._apply_model)
        pruned = set() if self.config.off else {id(s.module) for s in self.stacks}
        self.inventory = unet_inventory(model, pruned)
        if self.config.off:
            return
        for stack in self.stacks:
            patch_forward(model, stack.path, lambda orig, s=stack: self._make_forward(s, orig))

    def new_run(self, ctx: RunContext) -> ATEDMRun:
        return ATEDMRun(ctx, ATEDMStats())

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
            logger.warning("FreeSpeed AT-EDM: %d block-range calls ran unpruned because a ControlNet adds its residual "
                           "to the first block of the pruned range (pruned tokens would miss it); move the range with "
                           "dit_range_start/end to blocks without ControlNet residuals", control)
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


def apply_atedm(model, config: ATEDMConfig, node_id: Optional[str] = None):
    """Clone ``model`` and install AT-EDM on the clone (the input MODEL is never modified)."""
    info = detect_model(model)
    if info.family in DIT_FAMILIES:
        from .atedm_dit import ATEDMDiT
        return ATEDMDiT(config, info, node_id).patched_clone(model)
    if not info.is_unet:
        raise unsupported("AT-EDM", info, "AT-EDM prunes the image tokens inside UNet transformer stacks or a known "
                                          "DiT's blocks and needs to know which tokens are image tokens.",
                          "SD1.x/SD2.x, SDXL, Flux/Chroma, SD3, Wan, Qwen-Image, PixArt")
    stacks = transformer_stacks(model, info, tuple(config.levels))
    return ATEDM(config, info, stacks, node_id).patched_clone(model)


class ATEDMNode(FreeSpeedNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="FreeSpeedATEDM",
            display_name="FreeSpeed AT-EDM (attention-driven pruning)",
            category=CATEGORY,
            description=("AT-EDM (arXiv 2405.05252): inside the UNet's transformer stacks, tokens are ranked by "
                         "Generalized Weighted PageRank over the self-attention map, the lowest are pruned for the "
                         "following layers and recovered by copying their most similar kept token before the "
                         "convolutions. DSAP prunes less in early steps. Paper: 38.8% fewer FLOPs on SDXL. DiTs (Flux/"
                         "Chroma, SD3, Wan, Qwen-Image, PixArt): image tokens are ranked at the first block of the "
                         "chosen range (G-WPR over sampled query rows), the rest of the range runs on the kept image "
                         "tokens and every text token, pruned tokens are restored at its end."),
            inputs=[
                io.Model.Input("model"),
                io.Float.Input("ratio", default=0.7, min=0.0, max=0.95, step=0.05,
                               tooltip="Target pruning ratio: the fraction of tokens removed after the pruning "
                                       "layer of each stack. 0 = off (the unpatched model exactly)."),
                io.Float.Input("dsap_end_percent", default=0.3, min=0.0, max=1.0, step=0.01,
                               tooltip="DSAP: until this percent of denoising the first/last attention block of "
                                       "each stage is not pruned and the others prune ratio × early_scale "
                                       "(attention maps vary most early). 0 = no DSAP."),
                io.Float.Input("early_scale", default=1.0, min=0.0, max=1.0, step=0.05,
                               tooltip="DSAP: the early-phase ratio of the other stacks, as a fraction of ratio (1 = "
                                       "the paper's DSAP: only the stage-edge blocks are spared early; lower = prune "
                                       "less early)."),
                io.Combo.Input("levels", options=list(LEVEL_CHOICES), default="1+2",
                               tooltip="Attention levels whose stacks are pruned (1 = highest resolution with "
                                       "attention: 64x64 tokens for SD1.5 at 512² and SDXL at 1024²)."),
                io.Int.Input("map_budget_mb", default=2048, min=64, max=262144, step=64,
                             tooltip="Largest memory for one explicit self-attention map (fp32, batch x tokens²). "
                                     "Stacks whose map would need more run unpruned (counted, one warning). SDXL with "
                                     "CFG needs ~1.1 GB at 1024², ~1.9 GB at 1536², ~6 GB at 2048²."),
                io.Float.Input("dit_range_start", default=0.25, min=0.0, max=0.95, step=0.05,
                               tooltip="DiTs: where the pruned range of blocks starts, as a fraction of the blocks in "
                                       "forward order (Flux: double, then single blocks). Its first block ranks."),
                io.Float.Input("dit_range_end", default=0.75, min=0.05, max=1.0, step=0.05,
                               tooltip="DiTs: where the pruned range ends (1 = the last block); every pruned token is "
                                       "restored there, and before any block that gets a ControlNet residual."),
                io.Combo.Input("recovery", options=list(RECOVERY), default="similar",
                               tooltip="DiTs: a pruned token gets its own input plus the residual the range added to "
                                       "the kept token it attends to most (similar, the paper's idea), or to itself "
                                       "at the previous step (previous; falls back to similar)."),
            ],
            outputs=[io.Model.Output()],
            hidden=[io.Hidden.unique_id],
        )

    @classmethod
    def execute(cls, model, ratio, dsap_end_percent, early_scale, levels, map_budget_mb=2048, dit_range_start=0.25,
                dit_range_end=0.75, recovery="similar") -> io.NodeOutput:
        config = ATEDMConfig(float(ratio), float(dsap_end_percent), float(early_scale), LEVEL_CHOICES[levels],
                             map_budget_mb=float(map_budget_mb), dit_start=float(dit_range_start),
                             dit_end=float(dit_range_end), recovery=recovery)
        return io.NodeOutput(apply_atedm(model, config, node_id=cls.node_id()))
