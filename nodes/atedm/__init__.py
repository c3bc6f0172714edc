"""FreeSpeed AT-EDM (arXiv 2405.05252): ``config`` (settings, per-run state), ``unet`` (the technique: run and stats glue, UNet hooks), ``dit`` (the DiT path), ``node`` (``apply`` and the V3 node).  The package exports the public names; it imports its modules, none of them imports it."""
from .config import ATEDMConfig, ATEDMRun
from .unet import ATEDM
from .dit import ATEDMDiT
from .node import apply_atedm, ATEDMNode

__all__ = ["ATEDMConfig", "ATEDMRun", "ATEDM", "ATEDMDiT", "apply_atedm", "ATEDMNode"]
