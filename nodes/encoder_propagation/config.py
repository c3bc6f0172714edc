"""Settings and per-run state of FreeSpeed Encoder Propagation (the technique: ``unet.py``; its DiT subclass: ``dit.py``)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch

from ...core.propagation import (DIT_EVERY, DIT_WARMUP, PAPER_DIT_FRONT, PAPER_INJECTION, PAPER_INJECTION_START, SCHEDULES, FeatureCache,
    InjectionSteps, OutputCache)
from ...core.stats import EncoderPropagationStats
from ..hooks import Run


DIT_FAMILIES = ("flux", "sd3", "wan", "qwen", "pixart")


CONTROLNET_MODES = ("reuse", "skip")


@dataclass(frozen=True)
class EncoderPropagationConfig:
    schedule: str = "50ls"                 # "50ls" | "every_k" | "custom"
    every_k: int = 4
    key_percents: tuple = ()               # custom schedule, fractions 0..1
    max_parallel: int = 4                  # steps decoded in one batch (1 = sequential)
    noise_injection: float = PAPER_INJECTION
    injection_start: float = PAPER_INJECTION_START
    controlnet: str = "reuse"              # "reuse" | "skip"
    dit_front: float = PAPER_DIT_FRONT     # DiTs: the fraction of the blocks (forward order) that is the "encoder"
    noise_on_flow: bool = False            # inject prior noise on flow-matching models too (tuned on SD's DDIM: off)
    dit_warmup: float = DIT_WARMUP         # DiTs: every step before this percent is a key step (Delta-DiT: late only)
    dit_every: int = DIT_EVERY             # DiTs: from dit_warmup on, every n-th step is a key step too (0 = none)

    def __post_init__(self):
        name = "FreeSpeed Encoder Propagation"
        if self.schedule not in SCHEDULES:
            raise ValueError(f"{name}: unknown schedule {self.schedule!r}; expected one of {', '.join(SCHEDULES)}")
        if self.schedule == "every_k" and self.every_k < 1:
            raise ValueError(f"{name}: every k steps needs k >= 1")
        if self.schedule == "custom" and not self.key_percents:
            raise ValueError(f"{name}: the custom schedule needs at least one key percent")
        if self.max_parallel < 1:
            raise ValueError(f"{name}: max parallel steps must be >= 1")
        if self.noise_injection < 0:
            raise ValueError(f"{name}: noise injection must be >= 0 (0 = off)")
        if not 0.0 <= self.dit_warmup <= 1.0 or self.dit_every < 0:
            raise ValueError(f"{name}: the DiT warm-up must be in [0, 1] and the DiT key interval >= 0")
        if not 0.0 < self.dit_front < 1.0:
            raise ValueError(f"{name}: the DiT front fraction must be in (0, 1)")
        if self.controlnet not in CONTROLNET_MODES:
            raise ValueError(f"{name}: unknown ControlNet mode {self.controlnet!r}; expected one of "
                             f"{', '.join(CONTROLNET_MODES)}")

    @property
    def schedule_label(self) -> str:
        if self.schedule == "every_k":
            return f"every {self.every_k} steps"
        if self.schedule == "custom":
            return "custom " + ", ".join(f"{100 * p:g}" for p in self.key_percents) + "%"
        return "paper 50ls"


@dataclass
class EncPropRun(Run[EncoderPropagationStats]):
    keys: set = field(default_factory=set)
    neighbours_checked: bool = False
    propagate: bool = False
    features: FeatureCache = field(default_factory=FeatureCache)
    outputs: OutputCache = field(default_factory=OutputCache)
    captured: set = field(default_factory=set)          # (branch, step, evaluation): one capture per evaluation
    full_steps: set = field(default_factory=set)        # steps that ran the whole UNet
    decoder_steps: set = field(default_factory=set)     # steps served by a decoder-only pass
    parallel_steps: set = field(default_factory=set)    # steps decoded ahead in a batch with an earlier step
    largest_batch: int = 1
    parallel_peak_bytes: int = 0
    injection: InjectionSteps = field(default_factory=InjectionSteps)
    z: Optional[torch.Tensor] = None
    strength: float = 0.0                               # the prior-noise strength of this run (0: no injection)


def is_flow_matching(model_sampling) -> bool:
    """Whether a model samples by flow matching (ComfyUI's ``CONST`` sampling: Flux, SD3, Wan, Qwen-Image...)."""
    return model_sampling is not None and any(c.__name__ == "CONST" for c in type(model_sampling).__mro__)


def injection_strength(cfg: EncoderPropagationConfig, model_sampling, propagate: bool) -> float:
    """The prior-noise strength of a run: none when no step is propagated (the injection compensates propagated
    steps, Sec. 3.4; every step a key step = the unpatched model exactly), none on flow-matching models unless
    asked for (the paper's 0.003 was tuned for DDIM on SD's epsilon-prediction), else the configured one."""
    if not propagate or (is_flow_matching(model_sampling) and not cfg.noise_on_flow):
        return 0.0
    return float(cfg.noise_injection)
