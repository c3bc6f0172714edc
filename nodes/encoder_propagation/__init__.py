"""FreeSpeed Encoder Propagation (Faster Diffusion, arXiv 2312.09608): ``config`` (settings, per-run state), ``unet`` (the technique: run and stats glue, UNet hooks), ``dit`` (the DiT path), ``node`` (``apply`` and the V3 node).  The package exports the public names; it imports its modules, none of them imports it."""
from .config import EncoderPropagationConfig, EncPropRun
from .unet import EncoderPropagation
from .dit import EncPropDiT
from .node import apply_encoder_propagation, EncoderPropagationNode

__all__ = ["EncoderPropagationConfig", "EncPropRun", "EncoderPropagation", "EncPropDiT", "apply_encoder_propagation", "EncoderPropagationNode"]
