"""T-GATE gating logic (Zhang, Liu, Xie, Faccio, Shou, Schmidhuber; arXiv 2404.02747): pure torch.

T-GATE splits denoising in two phases at a *gate*.  In the semantics-planning phase (before the
gate) cross-attention is computed normally; its output converges to a fixed point, so at the gate
step it is cached -- averaged over the classifier-free-guidance halves, ``(uncond + cond) / 2``, as
the official ``tgate`` code does -- and in the fidelity-improving phase (after the gate) the cached
output replaces cross-attention entirely and CFG is switched off (only one branch is evaluated).
The official code counts the gate in steps (``gate_step=10`` of 25: step ``gate_step - 1`` caches,
steps ``>= gate_step`` reuse).  Here the gate is a *percent of denoising* resolved against sigma:

* ``gate_sigma = sigma_at(gate)``; an evaluation at sigma is *after* the gate when
  ``sigma <= gate_sigma`` (relative tolerance 1e-4, so a step that sits exactly on the gate -- the
  "normal" scheduler puts step i of N at (i / (N-1)) of denoising -- counts as after, like the
  official ``i >= gate_step``).  40% with 25 "normal" steps gives steps 0-9 before, 10-24 after:
  the paper's default.
* the *cache step* is the last schedule step before the gate (the official ``gate_step - 1``);
  the cross-attention output is cached there only.
* gate >= 100% means "never": the technique is off and the model runs unchanged.
* a run that starts after the gate (denoise < 1, a hires pass, KSamplerAdvanced starting past the
  gate, gate = 0%) has no cache step; its first evaluation at a schedule sigma computes and caches,
  and reuse starts with the next evaluation.

The optional self-attention caching of T-GATE v2 (before the gate: ``warmup`` steps computed,
then cached every ``interval`` steps and reused in between) is :func:`self_attention_action`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Optional

import torch

from .schedule import RunSchedule

COMPUTE = "compute"
CACHE = "cache"
REUSE = "reuse"


@dataclass(frozen=True)
class GatePlan:
    """Where the gate falls in one run's schedule."""
    gate: float                    # percent of denoising, 0..1
    gate_sigma: float              # evaluations at sigma <= this (within rtol) are after the gate
    off: bool                      # gate >= 100%: nothing is ever after the gate
    steps_before: int              # schedule steps (last sigma excluded) before the gate
    steps_after: int               # schedule steps at or after the gate
    cache_step: Optional[int]      # last schedule step before the gate (None: the run starts after it)
    cache_sigma: Optional[float]
    rtol: float = 1e-4

    @classmethod
    def from_schedule(cls, schedule: RunSchedule, gate: float, rtol: float = 1e-4) -> "GatePlan":
        gate = float(gate)
        if not 0.0 <= gate <= 1.0:
            raise ValueError(f"gate must be a percent of denoising in 0..1, got {gate}")
        off = gate >= 1.0
        gate_sigma = -1.0 if off else float(schedule.sigma_at(gate))
        before = [i for i in range(schedule.total_steps)
                  if off or not _after(schedule.sigmas[i], gate_sigma, rtol)]
        cache_step = before[-1] if before and not off else None
        return cls(gate=gate, gate_sigma=gate_sigma, off=off, steps_before=len(before),
                   steps_after=schedule.total_steps - len(before), cache_step=cache_step,
                   cache_sigma=None if cache_step is None else float(schedule.sigmas[cache_step]), rtol=rtol)

    def after(self, sigma: float) -> bool:
        """True when an evaluation at ``sigma`` is in the fidelity-improving phase (after the gate)."""
        return not self.off and _after(sigma, self.gate_sigma, self.rtol)

    def is_cache_sigma(self, sigma: float) -> bool:
        """True for an evaluation at the cache step's sigma (the last schedule sigma before the gate)."""
        return self.cache_sigma is not None and abs(sigma - self.cache_sigma) <= self.rtol * abs(self.cache_sigma)


def _after(sigma: float, gate_sigma: float, rtol: float) -> bool:
    return sigma <= gate_sigma * (1.0 + rtol)


def self_attention_action(step: int, warmup: int, interval: int) -> str:
    """T-GATE v2 self-attention schedule before the gate, by the run's step index.

    Steps ``< warmup`` compute; step ``warmup`` and every ``interval``-th step after it compute and
    cache; the steps in between reuse the last cache.  ``interval <= 1`` caches nothing (every step
    computes).
    """
    if interval <= 1 or step < warmup:
        return COMPUTE
    return CACHE if (step - warmup) % interval == 0 else REUSE


def branch_mean(parts: Mapping[object, tuple[torch.Tensor, int]]) -> torch.Tensor:
    """Mean over branches of each branch's mean: ``parts[branch] = (sum of chunks, chunk count)``.

    With one cond and one uncond chunk this is the official ``(uncond + cond) / 2``; several chunks
    of one branch (several positive prompts batched together) are first averaged within the branch
    so every branch weighs the same; a single branch (cfg = 1) is returned as is.
    """
    if not parts:
        raise ValueError("branch_mean needs at least one branch")
    means = [s / c if c != 1 else s for s, c in parts.values()]
    if len(means) == 1:
        return means[0].clone()
    out = means[0].float() if means[0].dtype in (torch.float16, torch.bfloat16) else means[0]
    for m in means[1:]:
        out = out + m
    return (out / len(means)).to(means[0].dtype)


__all__ = ["COMPUTE", "CACHE", "REUSE", "GatePlan", "self_attention_action", "branch_mean"]
