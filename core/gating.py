"""T-GATE gating logic (arXiv 2404.02747, official ``tgate_utils.tgate_scheduler``): pure torch.

Before the *gate* cross-attention is computed; at the cache step (the last schedule step before it,
the official ``gate_step - 1``) its output is cached as the CFG mean ``(uncond + cond) / 2``; after the
gate the cache replaces cross-attention and CFG is dropped.  The gate is a percent of denoising
resolved against sigma (a step exactly on the gate counts as after it, like ``i >= gate_step``; 40% of
25 "normal" steps: 0-9 before, 10-24 after); 100% = off; a run that starts past the gate caches at its
first evaluation.  :func:`gate_actions` decides each batched call; :func:`self_attention_action` is
T-GATE v2's self-attention schedule.  Notes: docs/tgate.md.
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
    """T-GATE v2 self-attention action before the gate, by the run's step index, as the official
    ``tgate_scheduler``: steps ``< warmup`` compute; step ``warmup`` and every step whose *absolute*
    index is a multiple of ``interval`` compute and cache; the others reuse the last cache (warm-up 2,
    interval 5: cache at 2, 5, 10..., reuse at 3, 4, 6, 7, 8...).  ``interval <= 1`` caches nothing
    (every step computes).  The cache step (the last before the gate) is not decided here: it always
    computes (:func:`gate_actions`).
    """
    if interval <= 1 or step < warmup:
        return COMPUTE
    return CACHE if step == warmup or step % interval == 0 else REUSE


def gate_actions(plan: GatePlan, sigma: float, step: int, extra: bool, main: bool, has_roles: bool,
                 cached_earlier: bool, self_attention: Optional[tuple[int, int]] = None) -> tuple[str, str]:
    """(cross-attention action, self-attention action) of one batched model call.

    ``main``: the call belongs to the evaluation's own ``[cond, uncond]`` pass (not a SAG/PAG extra
    pass); ``has_roles``: some chunk of it is the guider's positive or negative conditioning;
    ``cached_earlier``: a cross-attention capture exists from an *earlier* main evaluation;
    ``self_attention``: ``(warmup, interval)`` when T-GATE v2 self-attention caching is on.

    Cross-attention: before the gate it computes, and caches at the cache step (the last schedule
    step before the gate); after the gate it reuses the capture of an earlier evaluation; a run that
    starts past the gate caches at its first cacheable evaluation.  Extra evaluations (off-schedule
    sigmas of multi-stage samplers) and extra passes never cache.
    """
    cacheable = main and not extra and has_roles
    if plan.off:
        attn2 = COMPUTE
    elif not plan.after(sigma):
        attn2 = CACHE if cacheable and plan.is_cache_sigma(sigma) else COMPUTE
    elif cached_earlier:
        attn2 = REUSE
    else:
        attn2 = CACHE if cacheable else COMPUTE
    attn1 = COMPUTE
    if (self_attention is not None and not plan.off and main and not extra and not plan.after(sigma)
            and not plan.is_cache_sigma(sigma)):
        attn1 = self_attention_action(step, *self_attention)
    return attn2, attn1


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


__all__ = ["COMPUTE", "CACHE", "REUSE", "GatePlan", "self_attention_action", "gate_actions", "branch_mean"]
