"""FreeSpeed T-GATE (arXiv 2404.02747): ``config`` (settings, per-run state), ``unet`` (the technique: run and stats glue, UNet hooks), ``dit`` (the DiT path), ``node`` (``apply`` and the V3 node).  The package exports the public names; it imports its modules, none of them imports it."""
from .config import TGateConfig, TGateRun
from .unet import TGate
from .dit import TGateJoint
from .node import apply_tgate, TGateNode

__all__ = ["TGateConfig", "TGateRun", "TGate", "TGateJoint", "apply_tgate", "TGateNode"]
