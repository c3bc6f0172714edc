"""Settings and per-run state of FreeSpeed T-GATE (the technique: unet.py, its DiT
subclass: dit.py)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from ...core.batch import BatchLayout
from ...core.cache import BranchAccumulator, CacheStore
from ...core.gating import GatePlan
from ...core.stats import TGateStats
from ..hooks import Run
from ..sites import ModelInfo


COND, UNCOND = "cond", "uncond"


JOINT_FAMILIES = ("flux", "sd3", "qwen")       # joint text-image attention: the text stream is frozen instead


@dataclass(frozen=True)
class TGateConfig:
    gate: float = 0.4                  # percent of denoising where cross-attention is frozen (UNets)
    dit_gate: float = 0.6              # the same on DiTs: T-GATE's official PixArt setting, gate_step 15 of 25
    keep_cfg: bool = False             # True: keep evaluating the uncond branch after the gate
    self_attention: bool = False       # T-GATE v2 self-attention caching before the gate
    sa_warmup: int = 2
    sa_interval: int = 5
    cache_on_cpu: bool = False
    cache_limit_mb: float = 0.0        # 0 = no limit (the cache holds one tensor per attention layer)

    def __post_init__(self):
        if not (0.0 <= self.gate <= 1.0 and 0.0 <= self.dit_gate <= 1.0):
            raise ValueError("FreeSpeed T-GATE: gate must be in 0..1 (percent of denoising)")
        if self.sa_warmup < 0 or self.sa_interval < 1:
            raise ValueError("FreeSpeed T-GATE: self-attention warm-up must be >= 0 and interval >= 1")

    def gate_for(self, info: ModelInfo) -> float:
        """The gate of this model's family: ``gate`` on UNets, ``dit_gate`` on DiTs (docs/dit-defaults.md)."""
        return self.gate if info.is_unet else self.dit_gate


@dataclass(frozen=True)
class Call:
    """The decision for one batched model call (one APPLY_MODEL)."""
    attn2: str
    attn1: str
    roles: tuple                       # COND/UNCOND/None per chunk
    layout: BatchLayout
    round_id: Optional[int]            # the evaluation index when this is its main pass


@dataclass
class TGateRun(Run[TGateStats]):
    plan: Optional[GatePlan] = None
    store: Optional[CacheStore] = None
    attn2: Optional[BranchAccumulator] = None
    batch: Optional[tuple] = None      # (round id or None, {cond index: role}) of the current calc_cond_batch
    call: Optional[Call] = None
    tokens: object = None              # joint-attention DiTs: the current call's token layout
    texts: dict = field(default_factory=dict)   # joint-attention DiTs: (role, uuid) -> text tokens of its frozen stream
    warned: bool = False               # joint-attention DiTs: the one "computed in full" warning of the run
    left_alone: Optional[str] = None   # a guider with more than [positive, negative] (PerpNeg): run left unchanged
    keep_uncond: Optional[bool] = None  # EasyCache present: the negative branch keeps being evaluated
