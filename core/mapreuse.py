"""Attention-map reuse (Hunter et al., arXiv 2401.01008): schedules, cache keys, the schedule search.

A reuse step multiplies a map kept at an earlier step with the current V (no Q/K projection, QKᵀ or
softmax).  Schedules are percents of denoising resolved per run into one action per step: ``REUSE``
(map · V), ``KEEP`` (explicit attention, map kept: only the step before a reuse step) or ``ORIGINAL``
(the layer's own forward), so a schedule that never reuses is exactly the unpatched model.  The late
schedule is the paper's HURRY (later reuse distorts less); :func:`search_schedule` is a greedy PHAST.
Notes: docs/mapreuse.md.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Hashable, Iterable, Optional, Sequence

import torch

from .schedule import RunSchedule, percents_to_steps

ORIGINAL, KEEP, REUSE = "original", "keep", "reuse"
MODES = ("late", "custom", "off")
SCHEDULE_LABELS = {"late (paper)": "late", "custom percents": "custom", "off": "off"}     # node combo -> mode


# ------------------------------------------------------------------------------------------------
# schedules
# ------------------------------------------------------------------------------------------------
def late_reuse_steps(schedule: RunSchedule, start: float, refresh_every: int = 0) -> list[int]:
    """Reuse steps of the late (HURRY-style) schedule.

    Steps at or past ``start`` (percent of denoising, 0..1) reuse, except that the maps are
    refreshed (recomputed and kept again) every ``refresh_every`` steps: counting the last step
    before the window as position 0, a window step at position p is a refresh step when
    ``refresh_every > 0 and p % refresh_every == 0``.  ``refresh_every`` = 0: never refreshed, all
    window steps reuse the maps of the step just before the window.  Step 0 never reuses (there
    is nothing to reuse yet).
    """
    if refresh_every < 0:
        raise ValueError("refresh_every must be >= 0 (0 = never refresh)")
    window = [i for i in range(schedule.total_steps) if schedule.in_window(schedule.sigmas[i], start, 1.0)]
    if not window:
        return []
    first = window[0]
    out = []
    for i in window:
        p = i - first + 1 if first > 0 else i - first
        if i == 0 or (refresh_every > 0 and p % refresh_every == 0):
            continue
        out.append(i)
    return out


def custom_reuse_steps(schedule: RunSchedule, percents: Sequence[float]) -> list[int]:
    """Reuse steps of a user list of percents (each maps to the first step at or past it)."""
    return [i for i in percents_to_steps(percents, schedule) if i > 0]


def actions_for(total_steps: int, reuse_steps: Iterable[int]) -> list[str]:
    """Per-step actions from a set of reuse steps (a step before a reuse step keeps its maps)."""
    reuse = {int(i) for i in reuse_steps if 0 < int(i) < total_steps}
    acts = []
    for i in range(total_steps):
        if i in reuse:
            acts.append(REUSE)
        elif i + 1 in reuse:
            acts.append(KEEP)
        else:
            acts.append(ORIGINAL)
    return acts


@dataclass
class ReusePlan:
    """One run's resolved schedule: an action per step."""
    actions: list = field(default_factory=list)

    @classmethod
    def from_steps(cls, total_steps: int, reuse_steps: Iterable[int]) -> "ReusePlan":
        return cls(actions_for(total_steps, reuse_steps))

    def action(self, step: int, extra: bool) -> str:
        """What layers do at this evaluation; extra evaluations (off the schedule) run the original."""
        if extra or not 0 <= step < len(self.actions):
            return ORIGINAL
        return self.actions[step]

    @property
    def reuse_steps(self) -> list[int]:
        return [i for i, a in enumerate(self.actions) if a == REUSE]

    @property
    def keep_steps(self) -> list[int]:
        return [i for i, a in enumerate(self.actions) if a == KEEP]

    @property
    def off(self) -> bool:
        return not self.reuse_steps


def resolve_plan(schedule: RunSchedule, mode: str, start: float = 0.5, refresh_every: int = 0,
                 percents: Sequence[float] = ()) -> ReusePlan:
    """The plan of one run for a schedule mode ("late", "custom" or "off")."""
    if mode == "late":
        steps = late_reuse_steps(schedule, start, refresh_every)
    elif mode == "custom":
        steps = custom_reuse_steps(schedule, percents)
    elif mode == "off":
        steps = []
    else:
        raise ValueError(f"unknown schedule {mode!r}; expected one of {', '.join(MODES)}")
    return ReusePlan.from_steps(schedule.total_steps, steps)


def steps_to_percents(steps: Iterable[int], schedule: RunSchedule) -> list[float]:
    """Percents (0..1) that map back to exactly these steps with :func:`percents_to_steps`.

    The percent of a step's own sigma is used, rounded to 0.1%; when rounding would move it past
    the step, the midpoint between the step and the one before it is used instead.
    """
    out = []
    for i in sorted(set(int(s) for s in steps)):
        if not 0 < i < schedule.total_steps:
            continue
        p = schedule.percent_of(schedule.sigmas[i])
        cand = math.floor(p * 1000) / 1000
        if percents_to_steps([cand], schedule) != [i]:
            prev = schedule.percent_of(schedule.sigmas[i - 1])
            cand = round((prev + p) / 2, 4)
        out.append(cand)
    return out


def format_percents(percents: Iterable[float]) -> str:
    """[0.5, 0.553] -> "50, 55.3" (what the custom schedule input takes)."""
    return ", ".join(f"{100 * p:.4g}" for p in percents)


# ------------------------------------------------------------------------------------------------
# cache keys and sizes
# ------------------------------------------------------------------------------------------------
def map_key(site: Hashable, branch: Hashable, cond_id: Hashable, n_query: int, n_key: int) -> tuple:
    """Cache key of one branch's map at one layer.

    ``branch`` is the chunk's ``cond_or_uncond`` entry and ``cond_id`` its conditioning uuid (when
    known): a map kept for one branch is never served to another, whatever order or grouping the
    batch has.  The token counts are part of the key: ToDo (and anything else that shortens K/V
    before the attention's forward) may change the key count between the keep and the reuse step,
    and a map is only valid for the K/V length it was made with.
    """
    return ("map", site, branch, cond_id, int(n_query), int(n_key))


def map_bytes(batch: int, heads: int, n_query: int, n_key: int, dtype: torch.dtype) -> int:
    """Bytes of a [batch, heads, Nq, Nk] map."""
    return batch * heads * n_query * n_key * torch.empty((), dtype=dtype).element_size()


def parse_levels(text: str) -> Optional[frozenset]:
    """"all" / "" -> None (every level); "1, 2" -> frozenset({1, 2})."""
    t = (text or "").strip().lower()
    if t in ("", "all", "*"):
        return None
    out = set()
    for tok in t.replace(";", ",").split(","):
        tok = tok.strip()
        if not tok:
            continue
        try:
            v = int(tok)
        except ValueError:
            raise ValueError(f"{tok!r} is not an attention level (expected 'all' or numbers like '1, 2')") from None
        if v < 1:
            raise ValueError(f"attention levels start at 1, got {v}")
        out.add(v)
    return frozenset(out)


# ------------------------------------------------------------------------------------------------
# search scoring
# ------------------------------------------------------------------------------------------------
def distortion(out: torch.Tensor, ref: torch.Tensor) -> dict:
    """MSE and PSNR (peak = the reference's value range) of a run's output against the reference."""
    a, b = out.float(), ref.float()
    mse = float(((a - b) ** 2).mean())
    peak = float(b.max() - b.min()) or 1.0
    psnr = math.inf if mse == 0 else 10 * math.log10(peak * peak / mse)
    return {"mse": mse, "psnr": psnr}


def pick_reuse_steps(scores: dict, budget: int) -> list[int]:
    """Greedy choice: the ``budget`` candidate steps with the least distortion.

    ``scores`` maps a step to the distortion (MSE) of the calibration run that reused at that step
    only.  Ties go to the later step (the paper's ODE argument).  Steps are returned sorted.
    """
    if budget <= 0:
        return []
    ranked = sorted(scores.items(), key=lambda kv: (kv[1], -kv[0]))
    return sorted(k for k, _ in ranked[:budget])


def hurry_steps(total_steps: int, budget: int) -> list[int]:
    """The last ``budget`` steps (never step 0): the late schedule with no refresh."""
    budget = max(0, min(budget, total_steps - 1))
    return list(range(total_steps - budget, total_steps))


def search_schedule(schedule: RunSchedule, budget: int, distortion_of: Callable[[list[int]], dict]) -> dict:
    """Pick ``budget`` reuse steps of least distortion (greedy, in the spirit of the paper's PHAST).

    ``distortion_of(steps)`` samples with exactly those reuse steps (the step before each keeps its
    maps) and returns :func:`distortion` against the reference run.  One calibration run per
    candidate step (that step alone reuses), then the ``budget`` candidates of least MSE (greedy) and
    the late schedule with the same budget (the last ``budget`` steps) are run in full and the better
    one is returned -- never worse than the paper's late schedule on the calibration run.
    Cost: ``total_steps - 1`` + 2 runs.
    """
    total = schedule.total_steps
    budget = max(0, min(int(budget), total - 1))
    scores, per_step = {}, {}
    for i in range(1, total):
        d = distortion_of([i])
        scores[i] = d["mse"]
        per_step[i] = round(d["psnr"], 3)
    greedy = pick_reuse_steps(scores, budget)
    late = hurry_steps(total, budget)
    d_greedy = distortion_of(greedy)
    d_late = distortion_of(late) if late != greedy else d_greedy
    best, d_best = (greedy, d_greedy) if d_greedy["mse"] <= d_late["mse"] else (late, d_late)
    return {"steps": total, "budget": budget, "reuse_steps": best,
            "percents": format_percents(steps_to_percents(best, schedule)), "psnr": round(d_best["psnr"], 3),
            "greedy_steps": greedy, "greedy_psnr": round(d_greedy["psnr"], 3), "late_steps": late,
            "late_psnr": round(d_late["psnr"], 3), "single_step_psnr": per_step,
            "chosen": "greedy" if best is greedy else "late"}


__all__ = ["ORIGINAL", "KEEP", "REUSE", "MODES", "SCHEDULE_LABELS", "late_reuse_steps", "custom_reuse_steps", "actions_for",
           "ReusePlan", "resolve_plan", "steps_to_percents", "format_percents", "map_key", "map_bytes",
           "parse_levels", "distortion", "pick_reuse_steps", "hurry_steps", "search_schedule"]
