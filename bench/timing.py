"""The ideal-ratio arithmetic of ToDo's kernel measurement (pure) and a device sync.  Rounds, medians and
speed ratios are :mod:`comfyui_freespeed.core.measure`'s.

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

from typing import Callable, Optional


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


def device_sync(device) -> Optional[Callable[[], None]]:
    """A function that waits for ``device`` to finish queued work (None on CPU)."""
    if getattr(device, "type", str(device)) == "cuda":
        import torch
        return lambda: torch.cuda.synchronize(device)
    return None
