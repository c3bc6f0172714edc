"""The FreeSpeed AT-EDM node: ``apply`` (dispatches to the UNet or DiT path) and the V3 schema."""
from __future__ import annotations

from typing import Optional

from comfy_api.v0_0_2 import io

from ..hooks import FreeSpeedNode
from ..sites import detect_model, transformer_stacks, unsupported
from .config import ATEDMConfig, DIT_FAMILIES, LEVEL_CHOICES, RECOVERY
from .dit import ATEDMDiT
from .unet import ATEDM


def apply_atedm(model, config: ATEDMConfig, node_id: Optional[str] = None):
    """Clone ``model`` and install AT-EDM on the clone (the input MODEL is never modified)."""
    info = detect_model(model)
    if info.family in DIT_FAMILIES:
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
        return cls.schema(
            "FreeSpeedATEDM", "FreeSpeed AT-EDM (attention-driven pruning)",
            description=("AT-EDM (arXiv 2405.05252): inside the UNet's transformer stacks, tokens are ranked by "
                         "Generalized Weighted PageRank over the self-attention map, the lowest are pruned for the "
                         "following layers and recovered by copying their most similar kept token before the "
                         "convolutions. DSAP prunes less in early steps. Paper: 38.8% fewer FLOPs on SDXL. DiTs (Flux/"
                         "Chroma, SD3, Wan, Qwen-Image, PixArt): image tokens are ranked at the first block of the "
                         "chosen range (G-WPR over sampled query rows), the rest of the range runs on the kept image "
                         "tokens and every text token, pruned tokens are restored at its end."),
            inputs=[
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
                io.Float.Input("dit_warmup_percent", default=0.3, min=0.0, max=1.0, step=0.01,
                               tooltip="DiTs: nothing is pruned before this percent of denoising (published DiT "
                                       "pruning keeps the first steps full: CAT 8 of 28, RAS from step 4)."),
            ],
        )

    @classmethod
    def execute(cls, model, ratio, dsap_end_percent, early_scale, levels, map_budget_mb=2048, dit_range_start=0.25,
                dit_range_end=0.75, recovery="similar", dit_warmup_percent=0.3) -> io.NodeOutput:
        config = ATEDMConfig(float(ratio), float(dsap_end_percent), float(early_scale), LEVEL_CHOICES[levels],
                             map_budget_mb=float(map_budget_mb), dit_start=float(dit_range_start),
                             dit_end=float(dit_range_end), recovery=recovery, dit_warmup=float(dit_warmup_percent))
        return io.NodeOutput(apply_atedm(model, config, node_id=cls.node_id()))
