"""Settings and per-run state of FreeSpeed ToDo (the technique: ``unet.py``; its DiT subclass: ``dit.py``)."""
from __future__ import annotations

from dataclasses import dataclass, field

from ...core.stats import ToDoStats
from ...core.tokens import METHODS
from ..hooks import Run


DIT_FAMILIES = ("flux", "sd3", "wan", "qwen", "pixart")


@dataclass(frozen=True)
class ToDoConfig:
    factors: tuple = (2.0, 1.0)      # per attention level (1 = highest resolution with attention)
    method: str = "nearest"
    start_percent: float = 0.0
    end_percent: float = 1.0
    bands: bool = False              # the factor from the image size (paper: 2 at 1024², 3 at 1536², 4 at 2048²)
    dit_blocks_from: float = 0.5     # DiTs: downsample in the blocks from this fraction of the depth on (PixArt-Σ's
                                     # trained 2x2 K/V compression: blocks 14-27 of 28); 0 = every block

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"FreeSpeed ToDo: unknown method {self.method!r}; expected one of {', '.join(METHODS)}")
        if any(f < 1.0 for f in self.factors):
            raise ValueError("FreeSpeed ToDo: downsampling factors must be >= 1 (1 = off)")
        if not 0.0 <= self.dit_blocks_from < 1.0:
            raise ValueError("FreeSpeed ToDo: dit_blocks_from must be in 0..1 (a fraction of the DiT's blocks)")

    @property
    def off(self) -> bool:
        return (all(f <= 1.0 for f in self.factors) and not self.bands) or self.end_percent < self.start_percent


@dataclass
class ToDoRun(Run[ToDoStats]):
    kv_shapes: dict = field(default_factory=dict)     # attention level -> (tokens, kept K/V tokens)
    kv_before: int = 0
    kv_after: int = 0
    layout: object = None                             # DiTs: the current call's token layout (PixArt patches)
    factors_used: set = field(default_factory=set)
    replaced: frozenset = frozenset()                 # attn1 replace keys of the current model call (PAG, SAG)
