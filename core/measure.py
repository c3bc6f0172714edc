"""Measuring a technique (pure torch; the benchmark CLIs and the Benchmark node share it):

* speed: rows run interleaved in one process after a warm-up (:func:`timed_rounds`, the pack's one
  rounds engine: the order rotates each round; a fixed count or as many rounds as fit a budget); the
  ratio is ``median(base) / median(row)``;
* closeness: PSNR (peak = the reference's range) and SSIM (Wang et al. 2004, σ 1.5, 11 taps) of the
  output against the full run from the same noise, on any (B, C, H, W) tensor;
* fewer steps at equal time (:func:`compare_with_fewer_steps`, the one rule): the curve is the
  fewer-steps runs and the full run itself; a row is compared with the largest step count not slower
  than it and beats it when its metric is better; a row slower than the full run loses to it.
"""
from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence, Union

import torch
import torch.nn.functional as F

BASE = "base"
PATCHED = "patched"


# ------------------------------------------------------------------------------------------------
# timing
# ------------------------------------------------------------------------------------------------
def want_another_round(done: int, max_rounds: int, elapsed_s: float, round_s: float, reserve_s: float,
                       budget_s: Optional[float]) -> bool:
    """Whether an automatic round count runs one more round: always one, never more than
    ``max_rounds``, otherwise while elapsed + one more round (the last one's duration) + the time
    reserved for later work fit ``budget_s`` (None: no budget)."""
    if done < 1:
        return True
    if done >= max_rounds:
        return False
    if budget_s is None:
        return True
    return elapsed_s + round_s + reserve_s <= budget_s


@dataclass
class Rounds:
    """What :func:`timed_rounds` measured."""
    times: dict = field(default_factory=dict)        # label -> seconds of each timed run
    first: dict = field(default_factory=dict)        # label -> result of its first timed run
    failed: dict = field(default_factory=dict)       # label -> the exception that stopped it
    rounds: int = 0
    warmup_s: float = 0.0


def timed_rounds(labels: Sequence, run: Callable[[Any, bool], tuple[Any, float]], *, repeats: int = 0,
                 max_rounds: int = 5, budget_s: Optional[float] = None, t_start: Optional[float] = None,
                 reserve_s: Union[float, Callable[[float, float], float]] = 0.0, warmup: bool = True,
                 catch: bool = False, on_round: Optional[Callable[[int, float], None]] = None) -> Rounds:
    """Warm-up, then interleaved timed rounds of ``run(label, is_warmup) -> (result, seconds)``.

    ``repeats`` > 0: exactly that many rounds; 0: as many as :func:`want_another_round` allows
    (``t_start`` is when the budget started; ``reserve_s`` is time kept for later work, or a function
    of the last round's and the warm-up's durations).  Round r runs the labels rotated by r.  ``catch``: a label whose
    run raises is recorded in ``failed`` and dropped; otherwise the exception propagates.
    """
    t_start = time.perf_counter() if t_start is None else t_start
    res = Rounds(times={lb: [] for lb in labels})
    live = list(labels)

    def attempt(label, warm: bool):
        try:
            return run(label, warm)
        except Exception as e:
            if not catch:
                raise
            res.failed[label] = e
            return None

    if warmup:
        t0 = time.perf_counter()
        for lb in list(live):
            attempt(lb, True)
        live = [lb for lb in live if lb not in res.failed]
        res.warmup_s = time.perf_counter() - t0
    round_s = 0.0
    while live:
        if repeats:
            if res.rounds >= repeats:
                break
        else:
            reserve = reserve_s(round_s, res.warmup_s) if callable(reserve_s) else reserve_s
            if not want_another_round(res.rounds, max_rounds, time.perf_counter() - t_start, round_s, reserve,
                                      budget_s):
                break
        t0 = time.perf_counter()
        k = res.rounds % len(live)
        for lb in live[k:] + live[:k]:
            got = attempt(lb, False)
            if got is None:
                continue
            out, secs = got
            res.times[lb].append(secs)
            res.first.setdefault(lb, out)
        live = [lb for lb in live if lb not in res.failed]
        round_s = time.perf_counter() - t0
        res.rounds += 1
        if on_round is not None:
            on_round(res.rounds, round_s)
    return res


def median(xs: Iterable[float]) -> float:
    xs = list(xs)
    if not xs:
        raise ValueError("median of no timings")
    return float(statistics.median(xs))


def speed_ratio(base_times: Sequence[float], patched_times: Sequence[float]) -> float:
    """``median(base) / median(patched)`` (> 1: the patched model is faster)."""
    p = median(patched_times)
    if p <= 0:
        raise ValueError("patched median time must be > 0")
    return median(base_times) / p


MIN_TIMED_ROUNDS = 3          # a time verdict needs at least this many interleaved rounds
CURVE_KINDS = ("fewer_steps", "baseline")


def timing_check(rows: Sequence[Mapping], min_rounds: int = MIN_TIMED_ROUNDS, times_key: str = "times_s",
                 curve_kinds: tuple = CURVE_KINDS, rel_tol: float = 0.02) -> tuple[bool, str]:
    """Whether a timing is consistent enough to give time verdicts: ``(ok, why)``.

    ``rows`` are dicts with ``kind``, ``steps`` and the per-round seconds ``times_key``; the step-count
    curve (``curve_kinds``: the fewer-steps runs and the full run) is the self-check, because its cost
    is known up to two constants (t(s) = a + b·s):

    1. at least ``min_rounds`` interleaved rounds for every curve row;
    2. the curve's medians grow with their step count: a smaller count is never slower than a larger
       one by more than the measured spread (half the two rows' round ranges, at least ``rel_tol``);
    3. the full run is not an outlier against the fewer-steps runs: its median is within the spread
       (its own half range + the curve's mean half range, at least ``rel_tol``) of the line a + b·s
       fitted through the fewer-steps medians (a line through the origin when there is only one).
    """
    curve = sorted((r for r in rows if r.get("kind") in curve_kinds and r.get(times_key)), key=lambda r: r["steps"])
    if not curve:
        return False, "no timed step-count curve (baseline and fewer-steps rows)"
    rounds = min(len(r[times_key]) for r in curve)
    if rounds < min_rounds:
        return False, f"{rounds} timing round{'s' if rounds != 1 else ''}; a time verdict needs at least {min_rounds}"
    if len(curve) < 2:
        return False, "a single step count: nothing to check the timing against"
    med = {r["steps"]: median(r[times_key]) for r in curve}
    half = {r["steps"]: (max(r[times_key]) - min(r[times_key])) / 2 for r in curve}
    for lo, hi in zip(curve, curve[1:]):
        a, b = lo["steps"], hi["steps"]
        slack = max(half[a] + half[b], rel_tol * med[b])
        if med[a] > med[b] + slack:
            return False, (f"{a} steps took {med[a]:.2f} s but {b} steps {med[b]:.2f} s "
                           f"(spread ±{slack:.2f} s): the timing does not grow with the step count")
    full = [r for r in curve if r.get("kind") == "baseline"]
    fewer = [r for r in curve if r.get("kind") != "baseline"]
    if full and fewer:
        s0 = full[0]["steps"]
        xs = [r["steps"] for r in fewer]
        ys = [med[s] for s in xs]
        if len(set(xs)) >= 2:
            mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
            b = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
            pred = my + b * (s0 - mx)
        else:
            pred = ys[0] * s0 / xs[0]
        slack = max(half[s0] + sum(half[s] for s in xs) / len(xs), rel_tol * pred)
        if abs(med[s0] - pred) > slack:
            return False, (f"the full run ({s0} steps) took {med[s0]:.2f} s where the fewer-steps runs predict "
                           f"{pred:.2f} s ± {slack:.2f} s: an outlier, every ratio against it would be off")
    return True, f"{rounds} rounds; the step-count curve is consistent"


# ------------------------------------------------------------------------------------------------
# fidelity
# ------------------------------------------------------------------------------------------------
def _as_bchw(x: torch.Tensor) -> torch.Tensor:
    x = x.detach().float()
    if x.ndim == 3:
        x = x[None]
    if x.ndim != 4:
        raise ValueError(f"expected a (B, C, H, W) or (C, H, W) tensor, got shape {tuple(x.shape)}")
    return x


def data_range(reference: torch.Tensor) -> float:
    """The peak used by PSNR/SSIM: the reference's value range (1 for a constant reference)."""
    r = float(reference.max() - reference.min())
    return r if r > 0 else 1.0


def psnr(x: torch.Tensor, reference: torch.Tensor, peak: Optional[float] = None) -> float:
    """PSNR in dB of ``x`` against ``reference`` (same shape, any rank); ``inf`` when they are equal."""
    x, ref = x.detach().float(), reference.detach().float()
    if x.shape != ref.shape:
        raise ValueError(f"PSNR needs equal shapes, got {tuple(x.shape)} and {tuple(ref.shape)}")
    peak = data_range(ref) if peak is None else float(peak)
    mse = float(((x - ref) ** 2).mean())
    if mse == 0.0:
        return math.inf
    return 10.0 * math.log10(peak * peak / mse)


def _gaussian_window(size: int, sigma: float) -> torch.Tensor:
    c = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(c * c) / (2 * sigma * sigma))
    return (g / g.sum()).float()


def ssim(x: torch.Tensor, reference: torch.Tensor, peak: Optional[float] = None, window: int = 11,
         sigma: float = 1.5) -> float:
    """Mean SSIM (Wang et al. 2004) of ``x`` against ``reference`` over all channels and positions
    (valid convolution, no padding; the window shrinks to the image size for small inputs)."""
    x, ref = _as_bchw(x), _as_bchw(reference)
    if x.shape != ref.shape:
        raise ValueError(f"SSIM needs equal shapes, got {tuple(x.shape)} and {tuple(ref.shape)}")
    peak = data_range(ref) if peak is None else float(peak)
    b, c, h, w = x.shape
    size = min(window, h, w)
    if size % 2 == 0:
        size -= 1
    g = _gaussian_window(max(size, 1), sigma)
    k = (g[:, None] * g[None, :]).expand(c, 1, size, size).contiguous()

    def blur(t):
        return F.conv2d(t, k, groups=c)

    c1, c2 = (0.01 * peak) ** 2, (0.03 * peak) ** 2
    mu_x, mu_y = blur(x), blur(ref)
    sxx = blur(x * x) - mu_x ** 2
    syy = blur(ref * ref) - mu_y ** 2
    sxy = blur(x * ref) - mu_x * mu_y
    s = ((2 * mu_x * mu_y + c1) * (2 * sxy + c2)) / ((mu_x ** 2 + mu_y ** 2 + c1) * (sxx + syy + c2))
    return float(s.mean())


# ------------------------------------------------------------------------------------------------
# fewer steps at the same wall time
# ------------------------------------------------------------------------------------------------
def fewer_steps_counts(steps: int, n: int = 6) -> list[int]:
    """Step counts for a fewer-steps curve: up to ``n`` counts spread over [steps/4, steps − 1]."""
    if steps < 3 or n < 1:
        return []
    lo = max(2, round(steps / 4))
    hi = steps - 1
    if hi <= lo or n == 1:
        return [lo]
    return sorted({round(lo + (hi - lo) * i / (n - 1)) for i in range(n)})


def match_fewer_steps(step_times: Mapping[int, float], target_s: float) -> Optional[int]:
    """The largest step count whose measured time is at most ``target_s`` (the accelerated row's
    time): the fewer-steps run a user could afford instead.  ``None`` if even the cheapest is slower.
    """
    ok = [s for s, t in step_times.items() if t <= target_s]
    return max(ok) if ok else None


def compare_with_fewer_steps(rows: list[dict], metric: str = "psnr_db", verdict_key: str = "beats_fewer_steps",
                             higher_is_better: bool = True, curve_kinds: tuple = ("fewer_steps", "baseline")) -> None:
    """Add to every accelerated row (``kind`` not in ``curve_kinds``) the run of the curve it must
    beat -- the largest step count not slower than it (``fewer_steps_match``) -- and whether its
    ``metric`` is better (``verdict_key``: True/False; None when it is faster than every curve run;
    False when the match is the full run itself).  Rows are dicts with ``kind``, ``steps``,
    ``median_s`` and the metric; nothing is added without at least two curve runs."""
    curve = [r for r in rows if r.get("kind") in curve_kinds and "median_s" in r]
    if len(curve) < 2:
        return
    by_steps = {r["steps"]: r for r in curve}
    for r in rows:
        if r.get("kind") in curve_kinds or "median_s" not in r:
            continue
        s = match_fewer_steps({k: v["median_s"] for k, v in by_steps.items()}, r["median_s"])
        if s is None:
            r.setdefault("fewer_steps_match", None)
            r[verdict_key] = None
            continue
        m = by_steps[s]
        match = dict(r.get("fewer_steps_match") or {})
        match.update({"steps": s, "median_s": m["median_s"], metric: m.get(metric),
                      "baseline": m["kind"] == "baseline"})
        r["fewer_steps_match"] = match
        mine, theirs = r.get(metric), m.get(metric)
        if m["kind"] == "baseline" or mine is None or theirs is None:
            r[verdict_key] = False if m["kind"] == "baseline" else None
        else:
            r[verdict_key] = bool(mine > theirs) if higher_is_better else bool(mine < theirs)


__all__ = ["BASE", "PATCHED", "want_another_round", "Rounds", "timed_rounds", "median",
           "speed_ratio", "MIN_TIMED_ROUNDS", "timing_check", "data_range", "psnr", "ssim", "fewer_steps_counts", "match_fewer_steps",
           "compare_with_fewer_steps"]
