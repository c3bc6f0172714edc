"""FreeSpeed ToDo (token downsampling, arXiv 2402.13573): ``config`` (settings, per-run state), ``unet`` (the technique: run and stats glue, UNet hooks), ``dit`` (the DiT path), ``node`` (``apply`` and the V3 node).  The package exports the public names; it imports its modules, none of them imports it."""
from .config import ToDoConfig, ToDoRun
from .unet import ToDo
from .dit import ToDoDiT
from .node import apply_todo, ToDoNode

__all__ = ["ToDoConfig", "ToDoRun", "ToDo", "ToDoDiT", "apply_todo", "ToDoNode"]
