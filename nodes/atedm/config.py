"""Settings and per-run state of FreeSpeed AT-EDM (the technique: ``unet.py``; its DiT subclass: ``dit.py``)."""
from __future__ import annotations

from dataclasses import dataclass, field

from ...core.pruning import DSAP, FlopsTally
from ...core.stats import ATEDMStats
from ..hooks import Run


LEVEL_CHOICES = {"1+2": (1, 2), "1": (1,), "2": (2,), "1+2+3": (1, 2, 3)}


RECOVERY = ("similar", "previous")


DIT_FAMILIES = ("flux", "sd3", "wan", "qwen", "pixart")


@dataclass(frozen=True)
class ATEDMConfig:
    ratio: float = 0.7                 # target pruning ratio (fraction of tokens removed)
    dsap_end: float = 0.3              # percent of denoising where DSAP's early phase ends
    early_scale: float = 1.0           # early-phase ratio of non-edge stacks, as a fraction of `ratio`
    levels: tuple = (1, 2)             # attention levels whose stacks are pruned
    iterations: int = 5                # G-WPR power iterations
    map_budget_mb: float = 2048.0      # largest explicit-map memory per stack call (mean map + one head chunk)
    dit_start: float = 0.25            # DiTs: the pruned range of blocks, as fractions of the blocks (forward order)
    dit_end: float = 0.75
    recovery: str = "similar"          # DiTs: "similar" (most-attended kept token's residual) | "previous" (own, last step)
    dit_warmup: float = 0.3            # DiTs: no pruning before this percent of denoising (CAT: 8 of 28 steps full)

    def __post_init__(self):
        DSAP(self.ratio, self.dsap_end, self.early_scale)       # validates
        if self.iterations < 1:
            raise ValueError("FreeSpeed AT-EDM: G-WPR needs at least one iteration")
        if self.map_budget_mb <= 0:
            raise ValueError("FreeSpeed AT-EDM: the map budget must be positive")
        if not 0.0 <= self.dit_start < self.dit_end <= 1.0:
            raise ValueError("FreeSpeed AT-EDM: the DiT block range needs 0 <= start < end <= 1")
        if not 0.0 <= self.dit_warmup <= 1.0:
            raise ValueError("FreeSpeed AT-EDM: the DiT warm-up must be in [0, 1]")
        if self.recovery not in RECOVERY:
            raise ValueError(f"FreeSpeed AT-EDM: recovery must be one of {', '.join(RECOVERY)}")

    @property
    def dsap(self) -> DSAP:
        return DSAP(self.ratio, self.dsap_end, self.early_scale)

    @property
    def off(self) -> bool:
        return self.ratio <= 0.0 or not self.levels


@dataclass
class ATEDMRun(Run[ATEDMStats]):
    flops: FlopsTally = field(default_factory=FlopsTally)
    slots: list = field(default_factory=lambda: [0, 0])     # token-layer slots after the pruning point: full, kept
    kept_shapes: dict = field(default_factory=dict)         # attention level -> (tokens, kept) of the latest call
    warned_budget: bool = False
