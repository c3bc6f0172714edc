"""Settings and per-run state of FreeSpeed Attention Map Reuse (the technique: ``unet.py``; its DiT subclass: ``dit.py``)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch

from ...core.cache import CacheStore
from ...core.mapreuse import MODES, ReusePlan
from ...core.stats import MapReuseStats
from ..hooks import Run
from ..sites import AttentionSite


DIT_FAMILIES = ("flux", "sd3", "wan", "qwen", "pixart")


MAP_DTYPES = {"fp16": torch.float16, "fp32": torch.float32}


@dataclass(frozen=True)
class MapReuseConfig:
    schedule: str = "late"             # "late" | "custom" | "off"
    start: float = 0.5                 # late: reuse from this percent of denoising on
    refresh_every: int = 0             # late: recompute + keep the maps every k steps of the window (0 = never)
    percents: tuple = ()               # custom: reuse steps as percents (0..1)
    self_attention: bool = True
    cross_attention: bool = True
    levels: Optional[frozenset] = None   # attention levels (1 = highest resolution with attention); None = all
    cache_limit_mb: float = 1024.0     # 0 = unlimited
    map_dtype: str = "fp16"
    cache_on_cpu: bool = False
    dit_refresh_every: int = 2         # refresh_every on DiTs: 2 = each reuse step reuses the step just before it
                                       # (DiTFastAttn's attention sharing across timesteps, AST; docs/dit-defaults.md)

    def __post_init__(self):
        if self.schedule not in MODES:
            raise ValueError(f"FreeSpeed Map Reuse: unknown schedule {self.schedule!r}; expected one of {', '.join(MODES)}")
        if not 0.0 <= self.start <= 1.0:
            raise ValueError("FreeSpeed Map Reuse: start must be in 0..1 (percent of denoising)")
        if self.refresh_every < 0 or self.dit_refresh_every < 0:
            raise ValueError("FreeSpeed Map Reuse: refresh_every must be >= 0 (0 = never refresh)")
        if self.map_dtype not in MAP_DTYPES:
            raise ValueError(f"FreeSpeed Map Reuse: map dtype must be one of {', '.join(MAP_DTYPES)}")
        if self.cache_limit_mb < 0:
            raise ValueError("FreeSpeed Map Reuse: cache limit must be >= 0 (0 = unlimited)")

    def wants_dit(self, kind: str) -> bool:
        """DiTs: self-attention (joint or image-only) and cross-attention (Wan, PixArt); levels do not apply."""
        return self.self_attention if kind == "self" else self.cross_attention

    def wants(self, site: AttentionSite) -> bool:
        if not (self.self_attention if site.kind == "self" else self.cross_attention):
            return False
        return self.levels is None or site.level in self.levels


@dataclass
class MapReuseRun(Run[MapReuseStats]):
    plan: Optional[ReusePlan] = None
    store: Optional[CacheStore] = None
    kept_shape: dict = field(default_factory=dict)     # (site, branch, cond id) -> (Nq, Nk) of the map kept last
    left_alone: set = field(default_factory=set)       # sites whose maps did not fit the budget
    reused_sites: set = field(default_factory=set)
    options: Optional[dict] = None                     # PixArt: the current call's transformer_options
