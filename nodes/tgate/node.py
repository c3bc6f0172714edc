"""The FreeSpeed T-GATE node: ``apply`` (dispatches to the UNet or DiT path) and the V3 schema."""
from __future__ import annotations

from typing import Optional

from comfy_api.v0_0_2 import io

from ..hooks import FreeSpeedNode
from ..sites import attention_sites, detect_model, family_reason, unsupported
from .config import JOINT_FAMILIES, TGateConfig
from .dit import TGateJoint
from .unet import TGate


SUPPORTED = "SD1.x/SD2.x and SDXL UNets, PixArt, Wan (cross-attention); Flux/Chroma, SD3, Qwen-Image (text stream)"


def apply_tgate(model, config: TGateConfig, node_id: Optional[str] = None):
    """Clone ``model`` and install T-GATE on the clone (the input MODEL is never modified).  Models with a
    separate cross-attention (UNets, PixArt, Wan) cache it; joint-attention DiTs (Flux/Chroma, SD3, Qwen-Image)
    freeze their text stream after the gate (``nodes/tgate/dit.py``)."""
    info = detect_model(model)
    if info.family in JOINT_FAMILIES:
        return TGateJoint(config, info, node_id).patched_clone(model)
    if info.family == "other":
        raise unsupported("T-GATE", info, f"{family_reason(model)}; FreeSpeed has no T-GATE path for this model "
                                          "family (whether it has cross-attention or not).", SUPPORTED)
    sites = attention_sites(model, info)
    if not any(s.kind == "cross" for s in sites):
        raise unsupported("T-GATE", info, "T-GATE caches cross-attention; this model's transformer blocks have no "
                                          "cross-attention layer (a model without text conditioning).", SUPPORTED)
    return TGate(config, info, sites, node_id).patched_clone(model)


class TGateNode(FreeSpeedNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return cls.schema(
            "FreeSpeedTGate", "FreeSpeed T-GATE",
            description=("T-GATE (arXiv 2404.02747): after the gate, cross-attention is replaced by its cached output "
                         "(mean of the cond and uncond branches at the gate) and classifier-free guidance is dropped, "
                         "so only the positive branch is evaluated. ~1.6x at 25 steps with the gate at 40%. "
                         "SD1.x/SD2.x, SDXL, PixArt. IP-Adapter's contribution is frozen at the gate with the text."),
            inputs=[
                io.Float.Input("gate", default=0.4, min=0.0, max=1.0, step=0.01,
                               tooltip="Where cross-attention is frozen, in percent of denoising (0.4 = step 10 of 25 "
                                       "with the normal scheduler, the paper's default). 1.0 = off. UNets; DiTs: "
                                       "dit_gate."),
                io.Boolean.Input("keep_cfg", default=False,
                                 tooltip="Keep evaluating the negative prompt after the gate. Off (default): CFG is "
                                         "dropped after the gate, which gives most of the speed-up."),
                io.Boolean.Input("self_attention", default=False,
                                 tooltip="T-GATE v2: also cache self-attention before the gate, as the official code: "
                                         "computed for the warm-up steps, cached at the warm-up step and at every step "
                                         "whose index is a multiple of 'interval', reused in between. Can cost "
                                         "quality."),
                io.Int.Input("self_attention_warmup", default=2, min=0, max=1000,
                             tooltip="Steps (of this run) before self-attention caching starts."),
                io.Int.Input("self_attention_interval", default=5, min=1, max=1000,
                             tooltip="Self-attention is recomputed and cached at steps whose index is a multiple of "
                                     "this (1 = always computed)."),
                io.Boolean.Input("cache_on_cpu", default=False,
                                 tooltip="Keep the cached attention outputs in CPU memory (saves VRAM, costs a copy "
                                         "per layer and step)."),
                io.Float.Input("dit_gate", default=0.6, min=0.0, max=1.0, step=0.01, optional=True,
                               tooltip="The gate on DiTs (PixArt, Wan, Flux/Chroma, SD3, Qwen-Image), in percent of "
                                       "denoising. 0.6 = T-GATE's official PixArt setting (gate_step 15 of 25 steps); "
                                       "1.0 = off. Sources: docs/dit-defaults.md."),
            ],
        )

    @classmethod
    def execute(cls, model, gate, keep_cfg, self_attention=False, self_attention_warmup=2, self_attention_interval=5,
                cache_on_cpu=False, dit_gate=0.6) -> io.NodeOutput:
        config = TGateConfig(gate=float(gate), dit_gate=float(dit_gate), keep_cfg=bool(keep_cfg),
                             self_attention=bool(self_attention),
                             sa_warmup=int(self_attention_warmup), sa_interval=int(self_attention_interval),
                             cache_on_cpu=bool(cache_on_cpu))
        return io.NodeOutput(apply_tgate(model, config, node_id=cls.node_id()))
