"""Measuring a technique: interleaved timing, speed ratios, fidelity (PSNR, SSIM) and the
fewer-steps comparison.  Pure torch; shared by the benchmark CLI (``bench/``) and the FreeSpeed
Benchmark node.

Speed ratio
-----------
The unpatched ("base") and patched models run in one process, interleaved ``base, patched, base,
patched, …`` after a warm-up, so slow drifts of the machine hit both alike; the ratio is
``median(base) / median(patched)`` (> 1: the patched model is faster).

Fidelity
--------
A training-free acceleration approximates the full computation, so its output is compared with
the unpatched output from the same noise: PSNR (dB, peak = the reference's value range) and SSIM
(Wang et al. 2004: Gaussian window σ = 1.5, 11 taps or the image size if smaller, K1 = 0.01,
K2 = 0.03, averaged over channels).  Both work on any (B, C, H, W) tensor: decoded images, or
latents (the benchmark's fixture has no VAE; its latent is its image).

Fewer steps at equal time
-------------------------
The honest baseline of any acceleration is the same sampler with fewer steps (Hunter et al.,
arXiv 2401.01008, Sec. 5: map reuse is judged against it).  :func:`match_fewer_steps` picks, from
measured ``{steps: seconds}``, the largest step count that is not slower than the accelerated row.
"""
from __future__ import annotations

import math
import statistics
from typing import Iterable, Mapping, Optional, Sequence

import torch
import torch.nn.functional as F

BASE = "base"
PATCHED = "patched"


# ------------------------------------------------------------------------------------------------
# timing
# ------------------------------------------------------------------------------------------------
def interleaved_order(repeats: int, labels: Sequence[str] = (BASE, PATCHED), warmup: int = 1) -> list[tuple[str, bool]]:
    """The run order: ``warmup`` rounds then ``repeats`` rounds, each round one run of every label.

    Returns ``(label, is_warmup)`` pairs, e.g. repeats=2, warmup=1 →
    base*, patched*, base, patched, base, patched (``*`` = warm-up, not measured).
    """
    if repeats < 1:
        raise ValueError("repeats must be >= 1")
    if warmup < 0:
        raise ValueError("warmup must be >= 0")
    out = [(lb, True) for _ in range(warmup) for lb in labels]
    out += [(lb, False) for _ in range(repeats) for lb in labels]
    return out


def median(xs: Iterable[float]) -> float:
    xs = list(xs)
    if not xs:
        raise ValueError("median of no timings")
    return float(statistics.median(xs))


def split_runs(runs: Iterable[tuple[str, float]]) -> dict[str, list[float]]:
    """Group ``(label, seconds)`` measurements by label, keeping their order."""
    out: dict[str, list[float]] = {}
    for label, secs in runs:
        out.setdefault(label, []).append(float(secs))
    return out


def speed_ratio(base_times: Sequence[float], patched_times: Sequence[float]) -> float:
    """``median(base) / median(patched)`` (> 1: the patched model is faster)."""
    p = median(patched_times)
    if p <= 0:
        raise ValueError("patched median time must be > 0")
    return median(base_times) / p


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
    """PSNR in dB of ``x`` against ``reference`` (same shape); ``inf`` when they are equal."""
    x, ref = _as_bchw(x), _as_bchw(reference)
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


def interpolate_curve(points: Sequence[tuple[float, float]], x: float) -> Optional[float]:
    """Linear interpolation of y at ``x`` on a curve given as (x, y) points (any order); ``None``
    outside the measured range."""
    pts = sorted(points)
    if not pts or x < pts[0][0] or x > pts[-1][0]:
        return None
    for (x0, y0), (x1, y1) in zip(pts, pts[1:]):
        if x0 <= x <= x1:
            if x1 == x0 or not (math.isfinite(y0) and math.isfinite(y1)):
                return y1 if x == x1 else y0
            return y0 + (y1 - y0) * (x - x0) / (x1 - x0)
    return pts[-1][1]


__all__ = ["BASE", "PATCHED", "interleaved_order", "median", "split_runs", "speed_ratio", "data_range", "psnr",
           "ssim", "fewer_steps_counts", "match_fewer_steps", "interpolate_curve"]
