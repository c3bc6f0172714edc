"""The FreeSpeed Encoder Propagation node: ``apply`` (dispatches to the UNet or DiT path) and the V3 schema."""
from __future__ import annotations

from typing import Optional

from comfy_api.v0_0_2 import io

from ...core.propagation import DIT_EVERY, DIT_WARMUP, PAPER_DIT_FRONT, PAPER_INJECTION, PAPER_INJECTION_START, SCHEDULE_LABELS
from ...core.schedule import parse_percent_list
from ..hooks import FreeSpeedNode
from ..sites import detect_model, unsupported
from .config import CONTROLNET_MODES, DIT_FAMILIES, EncoderPropagationConfig
from .dit import EncPropDiT
from .unet import EncoderPropagation


def apply_encoder_propagation(model, config: EncoderPropagationConfig, node_id: Optional[str] = None):
    """Clone ``model`` and install encoder propagation on the clone (the input MODEL is untouched)."""
    info = detect_model(model)
    if info.family in DIT_FAMILIES:
        return EncPropDiT(config, info, node_id).patched_clone(model)
    if not info.is_unet:
        raise unsupported("Encoder Propagation", info, "Encoder propagation reuses the encoder of a UNet (or the front "
                                                       "blocks of a known DiT) between steps; this model is neither.",
                          "SD1.x/SD2.x, SDXL; Flux/Chroma, SD3, Wan, Qwen-Image, PixArt (front blocks)")
    dm = model.model.diffusion_model
    if not all(hasattr(dm, a) for a in ("input_blocks", "output_blocks", "time_embed", "out")):
        raise ValueError(f"FreeSpeed Encoder Propagation: {info.model_class} has an unexpected UNet layout")
    return EncoderPropagation(config, info, node_id).patched_clone(model)


class EncoderPropagationNode(FreeSpeedNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return cls.schema(
            "FreeSpeedEncoderPropagation", "FreeSpeed Encoder Propagation",
            description=("Faster Diffusion (arXiv 2312.09608): the UNet encoder runs only at key steps; the other steps "
                         "run the decoder on the key step's encoder features, several of them in one batch. "
                         "SD1.x, SD2.x and SDXL. Paper: ~1.7x on SD1.5 (DDIM 50), ~2x with ControlNet. DiTs (Flux/"
                         "Chroma, SD3, Wan, Qwen-Image, PixArt): the first blocks are the encoder; between key steps "
                         "they are skipped and their key-step residual is added to the current input (no parallel "
                         "passes: each step needs its own input). Paper's DiT: 18 of 28 blocks, -34% time."),
            inputs=[
                io.Combo.Input("schedule", options=list(SCHEDULE_LABELS), default="paper 50ls",
                               tooltip="Which steps run the whole UNet (key steps). paper 50ls: the paper's DDIM-50 "
                                       "key steps 0,1,2,3,5,10,15,25,35 as percents of denoising (0,2,4,6,10,20,30,50,"
                                       "70%), so other step counts hit the same points. every k steps: steps 0, k, "
                                       "2k... custom percents: the list below. The first step is always a key step."),
                io.Int.Input("every_k", default=4, min=1, max=50,
                             tooltip="For 'every k steps': a key step every k steps (1 = off: every step a key step, no "
                                     "noise injection, the unpatched model exactly)."),
                io.String.Input("key_percents", default="0, 2, 4, 6, 10, 20, 30, 50, 70",
                                tooltip="For 'custom percents': key steps as percents of denoising; each maps to the "
                                        "first step of the run at or past it."),
                io.Int.Input("max_parallel_steps", default=4, min=1, max=16,
                             tooltip="How many decoder-only steps are decoded in one batch (1 = one at a time). "
                                     "More is faster on a GPU with spare capacity and costs memory: the decoder's "
                                     "activations grow with the batch (reported in the stats)."),
                io.Float.Input("noise_injection", default=PAPER_INJECTION, min=0.0, max=0.1, step=0.001,
                               tooltip="Prior noise injection: adds this multiple of the run's initial noise to the "
                                       "latent at each step from 'injection_start' on (paper: 0.003 in the second "
                                       "half), restoring texture. 0 = off."),
                io.Float.Input("injection_start", default=PAPER_INJECTION_START, min=0.0, max=1.0, step=0.01,
                               tooltip="Where noise injection starts, in percent of denoising (paper: 0.5)."),
                io.Combo.Input("controlnet", options=list(CONTROLNET_MODES), default="reuse",
                               tooltip="The ControlNet runs only at key steps. reuse: decoder-only steps keep the key "
                                       "step's ControlNet residuals (as the official code does). skip: decoder-only "
                                       "steps decode without ControlNet residuals."),
                io.Float.Input("dit_front_blocks", default=round(PAPER_DIT_FRONT, 3), min=0.05, max=0.95, step=0.01,
                               tooltip="DiTs only: the fraction of the blocks (in forward order; Flux: double then "
                                       "single blocks) that form the propagated front (the paper's DiT: 18 of 28 = "
                                       "0.643). More = faster and further from the full model."),
                io.Float.Input("dit_warmup_percent", default=DIT_WARMUP, min=0.0, max=1.0, step=0.01,
                               tooltip="DiTs only: every step before this percent of denoising runs every block (a key "
                                       "step); the front is propagated only later (Delta-DiT caches the front blocks "
                                       "only late in sampling). 0 = follow the schedule from the start."),
                io.Int.Input("dit_key_every", default=DIT_EVERY, min=0, max=50,
                             tooltip="DiTs only: from the warm-up on, every n-th step is a key step as well (Delta-DiT's "
                                     "interval N=2; FORA uses 3). 0 = only the schedule's key steps."),
                io.Boolean.Input("noise_injection_on_flow", default=False,
                                 tooltip="Also inject prior noise on flow-matching models (Flux, SD3, Wan, Qwen-Image,"
                                         " ...). Off by default: the paper tuned 0.003 for DDIM on SD."),
            ],
        )

    @classmethod
    def execute(cls, model, schedule, every_k, key_percents, max_parallel_steps, noise_injection, injection_start,
                controlnet, dit_front_blocks=PAPER_DIT_FRONT, dit_warmup_percent=DIT_WARMUP, dit_key_every=DIT_EVERY,
                noise_injection_on_flow=False) -> io.NodeOutput:
        mode = SCHEDULE_LABELS.get(schedule, schedule)
        percents = tuple(parse_percent_list(key_percents)) if mode == "custom" else ()
        config = EncoderPropagationConfig(mode, int(every_k), percents, int(max_parallel_steps), float(noise_injection),
                                          float(injection_start), controlnet, float(dit_front_blocks),
                                          bool(noise_injection_on_flow), float(dit_warmup_percent), int(dit_key_every))
        return io.NodeOutput(apply_encoder_propagation(model, config, node_id=cls.node_id()))
