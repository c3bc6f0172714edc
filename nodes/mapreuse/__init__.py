"""FreeSpeed Attention Map Reuse (arXiv 2401.01008) and its schedule search: ``config`` (settings, per-run state), ``unet`` (the technique: run and stats glue, UNet hooks), ``dit`` (the DiT path), ``node`` (``apply`` and the V3 node).  The package exports the public names; it imports its modules, none of them imports it."""
from .config import MapReuseConfig, MapReuseRun
from .unet import MapReuse
from .dit import MapReuseDiT
from .node import apply_mapreuse, find_mapreuse, MapReuseNode
from .search import MapReuseSearchNode

__all__ = ["MapReuseConfig", "MapReuseRun", "MapReuse", "MapReuseDiT", "apply_mapreuse", "find_mapreuse", "MapReuseNode", "MapReuseSearchNode"]
