"""Run schedules: where in denoising a model evaluation sits, decided from sigma.

Schedules are written in *percent of denoising* (ComfyUI's convention: 0% pure noise, 100% clean, in
model time) and resolved against sigma with the model's own ``percent_to_sigma`` (without it, along the
run's own steps), so step counts, denoise < 1, KSamplerAdvanced ranges and hires passes all work.  A
window is inclusive at both ends.  The step index is the position of sigma in the run's schedule
(rtol 1e-4); a sigma off the schedule (dpm_2 / dpmpp_2s midpoints, dpmpp_sde substeps) gets its
interval's index and ``extra=True`` (compute, cache nothing); heun's corrector lands on the next
schedule sigma, so a step may be evaluated twice.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional, Sequence


@dataclass(frozen=True)
class StepInfo:
    """Where one model evaluation sits in its run."""
    sigma: float
    step: int          # index into the run's sigma schedule (interval index when extra)
    total_steps: int   # len(sample_sigmas) - 1
    percent: float     # percent of denoising of this sigma, 0.0 .. 1.0
    extra: bool        # True when sigma is not one of the schedule's sigmas


class RunSchedule:
    """A run's sigma schedule plus the percent <-> sigma mapping of its model.

    ``sigmas`` is the run's ``sample_sigmas`` (descending, usually ending with 0).
    ``percent_to_sigma`` is ``model_sampling.percent_to_sigma`` or None.
    """

    def __init__(self, sigmas: Sequence[float], percent_to_sigma: Optional[Callable[[float], float]] = None,
                 rtol: float = 1e-4):
        vals = [float(s) for s in (sigmas.tolist() if hasattr(sigmas, "tolist") else sigmas)]
        if len(vals) < 1:
            raise ValueError("a run schedule needs at least one sigma")
        self.sigmas = vals
        self.total_steps = max(len(vals) - 1, 0)
        self.rtol = rtol
        self.percent_to_sigma = percent_to_sigma
        self._p2s_cache: dict[float, float] = {}

    # -- percent <-> sigma ---------------------------------------------------------------------
    def sigma_at(self, percent: float) -> float:
        """Sigma at ``percent`` of denoising (model time when the model's mapping is known)."""
        percent = float(percent)
        if percent in self._p2s_cache:
            return self._p2s_cache[percent]
        if self.percent_to_sigma is not None:
            s = float(self.percent_to_sigma(percent))
        else:
            s = self._run_sigma_at(percent)
        self._p2s_cache[percent] = s
        return s

    def _run_sigma_at(self, percent: float) -> float:
        # fallback: percent measured along this run's own steps (log-linear between the sigmas)
        if percent <= 0.0:
            return math.inf
        if percent >= 1.0:
            return 0.0
        pos = percent * self.total_steps
        i = min(int(pos), self.total_steps - 1)
        frac = pos - i
        a, b = self.sigmas[i], self.sigmas[i + 1]
        if a > 0 and b > 0:
            return math.exp(math.log(a) + frac * (math.log(b) - math.log(a)))
        return a + frac * (b - a)

    def percent_of(self, sigma: float) -> float:
        """Inverse of :meth:`sigma_at` (bisection on the monotone mapping, 1e-4 precision)."""
        lo, hi = 0.0, 1.0
        for _ in range(20):
            mid = 0.5 * (lo + hi)
            if self.sigma_at(mid) > sigma:
                lo = mid
            else:
                hi = mid
        return 0.5 * (lo + hi)

    # -- windows --------------------------------------------------------------------------------
    def in_window(self, sigma: float, start: float, end: float) -> bool:
        """True when sigma lies in [start, end] percent of denoising."""
        if end < start:
            return False
        return self.sigma_at(start) >= sigma >= self.sigma_at(end)

    # -- steps ----------------------------------------------------------------------------------
    def step_of(self, sigma: float) -> tuple[int, bool]:
        """(index, extra): the index of sigma in the schedule, or of the interval containing it."""
        for i, s in enumerate(self.sigmas):
            if math.isclose(s, sigma, rel_tol=self.rtol, abs_tol=1e-12):
                return i, False
        # interval i is [sigmas[i], sigmas[i+1]) in descending order
        for i in range(self.total_steps):
            if self.sigmas[i] > sigma > self.sigmas[i + 1]:
                return i, True
        return (0 if sigma > self.sigmas[0] else self.total_steps), True

    def info(self, sigma: float) -> StepInfo:
        step, extra = self.step_of(sigma)
        return StepInfo(sigma=float(sigma), step=step, total_steps=self.total_steps,
                        percent=self.percent_of(sigma), extra=extra)


def percents_to_steps(percents: Sequence[float], schedule: RunSchedule) -> list[int]:
    """Map a list of percents (e.g. key steps) to the first step of the run at or past each one.

    A percent maps to the first schedule step whose sigma is <= sigma_at(percent); duplicates
    collapse.  Used by key-step and reuse-step lists so that "0%, 10%" means the same point of
    denoising at 20 or 50 steps.
    """
    out: list[int] = []
    for p in percents:
        target = schedule.sigma_at(p)
        for i in range(schedule.total_steps):
            if schedule.sigmas[i] <= target * (1 + schedule.rtol):
                if i not in out:
                    out.append(i)
                break
    return sorted(out)


def parse_percent_list(text: str) -> list[float]:
    """Parse a user's list of percents, "0, 10, 25.5%" -> [0.0, 0.1, 0.255] (sorted, unique)."""
    vals: list[float] = []
    for tok in text.replace(";", ",").replace("%", "").split(","):
        tok = tok.strip()
        if not tok:
            continue
        try:
            v = float(tok) / 100.0
        except ValueError:
            raise ValueError(f"{tok!r} is not a number (expected percents such as '0, 10, 25.5')") from None
        if not 0.0 <= v <= 1.0:
            raise ValueError(f"percent {tok!r} is outside 0..100")
        vals.append(v)
    return sorted(set(vals))


__all__ = ["StepInfo", "RunSchedule", "percents_to_steps", "parse_percent_list"]
