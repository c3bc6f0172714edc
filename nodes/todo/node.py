"""The FreeSpeed ToDo node: ``apply`` (dispatches to the UNet or DiT path) and the V3 schema."""
from __future__ import annotations

from typing import Optional

from comfy_api.v0_0_2 import io

from ...core.tokens import METHODS
from ..hooks import FreeSpeedNode
from ..sites import detect_model, unsupported
from .config import DIT_FAMILIES, ToDoConfig
from .dit import ToDoDiT
from .unet import ToDo


def apply_todo(model, config: ToDoConfig, node_id: Optional[str] = None):
    """Clone ``model`` and install ToDo on the clone (the input MODEL is never modified)."""
    info = detect_model(model)
    if not info.is_unet and info.family not in DIT_FAMILIES:
        raise unsupported("ToDo", info, "ToDo needs to know which attention tokens form the image's 2-D grid; this "
                                        "model's token layout is not known to FreeSpeed.",
                          "SD1.x/SD2.x, SDXL, Flux/Chroma, SD3, Wan, Qwen-Image, PixArt")
    if info.is_unet:
        return ToDo(config, info, node_id).patched_clone(model)
    return ToDoDiT(config, info, node_id).patched_clone(model)


class ToDoNode(FreeSpeedNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return cls.schema(
            "FreeSpeedToDo", "FreeSpeed ToDo (token downsampling)",
            description=("Token downsampling (ToDo, arXiv 2402.13573): self-attention keys/values are downsampled on "
                         "their 2-D token grid, queries keep full resolution. Biggest gains at high resolution "
                         "(1024² and up on SD1.5, 1536² and up on SDXL). DiTs (Flux/Chroma, SD3, Wan, Qwen-Image, "
                         "PixArt): only the image keys/values are downsampled (per frame on Wan), every text token "
                         "is kept, factor_level_1 is the factor; on DiTs attention is a smaller share of the work, "
                         "so it pays off from ~2 MP on (PixArt: nearest with an integer factor dividing the grid)."),
            inputs=[
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
                io.Float.Input("dit_blocks_from", default=0.5, min=0.0, max=0.95, step=0.05, optional=True,
                               tooltip="DiTs only: downsample K/V in the blocks from this fraction of the depth on "
                                       "(0.5 = the back half, as PixArt-Sigma's trained 2x2 K/V compression, blocks "
                                       "14-27 of 28); 0 = every block. Sources: docs/dit-defaults.md."),
            ],
        )

    @classmethod
    def execute(cls, model, factor_level_1, factor_level_2, method, start_percent, end_percent,
                resolution_bands=False, dit_blocks_from=0.5) -> io.NodeOutput:
        config = ToDoConfig((float(factor_level_1), float(factor_level_2)), method, float(start_percent),
                            float(end_percent), bool(resolution_bands), float(dit_blocks_from))
        return io.NodeOutput(apply_todo(model, config, node_id=cls.node_id()))
