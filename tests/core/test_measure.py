"""core/measure.py: PSNR and SSIM against plain reference computations, fewer-steps matching,
curve interpolation.  Pure torch, no host."""
from __future__ import annotations

import math

import pytest
import torch

from comfyui_freespeed.core import measure


def test_psnr_matches_the_textbook_formula():
    g = torch.Generator().manual_seed(0)
    ref = torch.rand(2, 3, 16, 20, generator=g)
    x = ref + 0.05 * torch.randn(ref.shape, generator=g)
    peak = float(ref.max() - ref.min())
    want = 10 * math.log10(peak ** 2 / float(((x - ref) ** 2).mean()))
    assert measure.psnr(x, ref) == pytest.approx(want, rel=1e-6)
    assert measure.psnr(x, ref, peak=1.0) == pytest.approx(10 * math.log10(1 / float(((x - ref) ** 2).mean())),
                                                           rel=1e-6)
    assert measure.psnr(ref, ref) == math.inf
    # more noise, lower PSNR
    assert measure.psnr(ref + 0.2 * (x - ref), ref) > measure.psnr(x, ref)
    with pytest.raises(ValueError):
        measure.psnr(x[:, :2], ref)


def _ssim_loop(x, y, peak, size=7, sigma=1.5):
    """Plain per-window SSIM (Wang et al. 2004) for one channel: explicit weighted sums."""
    c = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-c * c / (2 * sigma * sigma))
    w = (g[:, None] * g[None, :])
    w = w / w.sum()
    c1, c2 = (0.01 * peak) ** 2, (0.03 * peak) ** 2
    vals = []
    x, y = x.double(), y.double()
    for i in range(x.shape[0] - size + 1):
        for j in range(x.shape[1] - size + 1):
            px, py = x[i:i + size, j:j + size], y[i:i + size, j:j + size]
            mx, my = (w * px).sum(), (w * py).sum()
            vx = (w * (px - mx) ** 2).sum()
            vy = (w * (py - my) ** 2).sum()
            cov = (w * (px - mx) * (py - my)).sum()
            vals.append(((2 * mx * my + c1) * (2 * cov + c2)) / ((mx ** 2 + my ** 2 + c1) * (vx + vy + c2)))
    return float(torch.stack(vals).mean())


def test_ssim_equals_a_plain_windowed_computation():
    g = torch.Generator().manual_seed(1)
    ref = torch.rand(1, 1, 12, 13, generator=g)
    x = ref + 0.1 * torch.randn(ref.shape, generator=g)
    peak = float(ref.max() - ref.min())
    got = measure.ssim(x, ref, window=7)
    assert got == pytest.approx(_ssim_loop(x[0, 0], ref[0, 0], peak), abs=1e-5)
    assert measure.ssim(ref, ref) == pytest.approx(1.0, abs=1e-6)
    assert measure.ssim(x, ref) < 0.99
    # small inputs: the window shrinks to the (odd) image size instead of failing
    assert -1.0 <= measure.ssim(x[..., :5, :6], ref[..., :5, :6]) <= 1.0


def test_ssim_averages_channels():
    g = torch.Generator().manual_seed(2)
    ref = torch.rand(1, 2, 16, 16, generator=g)
    x = ref.clone()
    x[:, 1] += 0.3 * torch.randn(16, 16, generator=g)
    peak = float(ref.max() - ref.min())
    per = [measure.ssim(x[:, i:i + 1], ref[:, i:i + 1], peak=peak) for i in range(2)]
    assert per[0] == pytest.approx(1.0)
    assert measure.ssim(x, ref) == pytest.approx(sum(per) / 2, abs=1e-6)


def test_match_fewer_steps_picks_the_largest_affordable_count():
    times = {4: 0.8, 6: 1.2, 8: 1.6, 10: 2.0, 20: 4.0}
    assert measure.match_fewer_steps(times, 1.7) == 8
    assert measure.match_fewer_steps(times, 1.6) == 8          # equal time counts as affordable
    assert measure.match_fewer_steps(times, 5.0) == 20
    assert measure.match_fewer_steps(times, 0.5) is None
    # noisy, non-monotone timings still give the largest count under the target
    assert measure.match_fewer_steps({4: 1.0, 6: 0.9, 8: 1.5}, 1.0) == 6


def test_interpolate_curve():
    pts = [(2.0, 20.0), (1.0, 40.0), (4.0, 10.0)]
    assert measure.interpolate_curve(pts, 1.5) == pytest.approx(30.0)
    assert measure.interpolate_curve(pts, 3.0) == pytest.approx(15.0)
    assert measure.interpolate_curve(pts, 4.0) == pytest.approx(10.0)
    assert measure.interpolate_curve(pts, 0.5) is None
    assert measure.interpolate_curve(pts, 5.0) is None
    assert measure.interpolate_curve([(1.0, math.inf), (2.0, 30.0)], 1.0) == math.inf


def test_timing_helpers_are_the_benchs():
    order = measure.interleaved_order(2, labels=("a", "b", "c"), warmup=1)
    assert [lb for lb, w in order if w] == ["a", "b", "c"]
    assert [lb for lb, w in order if not w] == ["a", "b", "c", "a", "b", "c"]
    assert measure.speed_ratio([2.0, 4.0, 3.0], [1.0, 1.5, 2.0]) == pytest.approx(2.0)
    with pytest.raises(ValueError):
        measure.speed_ratio([1.0], [0.0])


def test_fewer_steps_counts_spread_below_the_full_count():
    c = measure.fewer_steps_counts(20)
    assert len(c) == 6 and c[0] == 5 and c[-1] == 19 and all(a < b for a, b in zip(c, c[1:]))
    assert measure.fewer_steps_counts(20, n=3) == [5, 12, 19]
    assert all(c < 8 for c in measure.fewer_steps_counts(8))
    assert measure.fewer_steps_counts(2) == []
    assert measure.fewer_steps_counts(4) == [2, 3]
