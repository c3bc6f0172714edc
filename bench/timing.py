"""Timing logic of the bench: pure functions (no torch, no ComfyUI) plus a device-aware stopwatch.

How a speed ratio is measured
-----------------------------
The unpatched ("base") and patched models are run in one process, interleaved
``base, patched, base, patched, …`` after a warm-up, so slow drifts of the machine (other
processes, thermal state, allocator growth) hit both sides alike.  The ratio is
``median(base times) / median(patched times)``: > 1 means the patched model is faster.

What the ideal ratio assumes
----------------------------
A technique that shrinks the keys/values of a set of attention calls by ``f`` per side (``f²`` fewer
K/V tokens) can at best divide the cost of those calls by ``f²`` (attention cost ∝ Nq·Nk) while
everything else (convolutions, projections, feed-forward, the other attention calls) costs the
same.  With ``T`` the base model time and ``A_sel`` the time of the touched calls in it::

    ideal = T / (T − A_sel + A_sel / f²)

It is an upper bound for that model of cost: the downsampling itself, and any kernel overhead
that does not scale with Nk, only lower the measured ratio.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Iterable, Optional

# the pure timing functions live in the pack's core (shared with the FreeSpeed Benchmark node)
from .host import register_package

register_package()
from comfyui_freespeed.core.measure import (BASE, PATCHED, interleaved_order, median, speed_ratio,  # noqa: F401,E402
                                            split_runs)


def ratio_from_runs(runs: Iterable[tuple[str, float]], base: str = BASE, patched: str = PATCHED) -> float:
    """Speed ratio from interleaved ``(label, seconds)`` measurements (warm-ups already dropped)."""
    by = split_runs(runs)
    if base not in by or patched not in by:
        raise ValueError(f"need timings for both {base!r} and {patched!r}")
    return speed_ratio(by[base], by[patched])


def ideal_ratio(total: float, selected: float, factor: float) -> float:
    """Best ratio when the ``selected`` share of ``total`` time shrinks by ``factor²`` and nothing else
    changes: ``total / (total − selected + selected / factor²)``.  See the module docstring."""
    if total <= 0:
        raise ValueError("total time must be > 0")
    if not 0 <= selected <= total:
        raise ValueError("selected time must lie in [0, total]")
    if factor < 1:
        raise ValueError("factor must be >= 1")
    return total / (total - selected + selected / (factor * factor))


def ideal_ratio_from_share(share: float, factor: float) -> float:
    """:func:`ideal_ratio` with the touched calls given as a share of the total (0..1)."""
    return ideal_ratio(1.0, share, factor)


def fraction_of_ideal(measured: float, ideal: float) -> float:
    """How much of the ideal *speed-up* was obtained: ``measured / ideal`` (1 = all of it)."""
    if ideal <= 0:
        raise ValueError("ideal ratio must be > 0")
    return measured / ideal


def share(part: float, total: float) -> float:
    return part / total if total > 0 else 0.0


@dataclass
class Stopwatch:
    """``perf_counter`` stopwatch that waits for the device first (CUDA kernels are asynchronous)."""
    sync: Optional[Callable[[], None]] = None
    laps: list = field(default_factory=list)

    def now(self) -> float:
        if self.sync is not None:
            self.sync()
        return time.perf_counter()


def device_sync(device) -> Optional[Callable[[], None]]:
    """A function that waits for ``device`` to finish queued work (None on CPU)."""
    if getattr(device, "type", str(device)) == "cuda":
        import torch
        return lambda: torch.cuda.synchronize(device)
    return None


def want_another_round(done: int, max_rounds: int, elapsed_s: float, round_s: float, reserve_s: float,
                       budget_s: Optional[float]) -> bool:
    """Whether an automatic repeat count runs one more interleaved round.

    Always at least one round; never more than ``max_rounds``; otherwise only while the elapsed
    time, one more round (``round_s``, the last round's duration) and the time still reserved for
    later work (``reserve_s``) fit in ``budget_s``.  ``budget_s=None`` means no budget (max_rounds).
    """
    if done < 1:
        return True
    if done >= max_rounds:
        return False
    if budget_s is None:
        return True
    return elapsed_s + round_s + reserve_s <= budget_s
