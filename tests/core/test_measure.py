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


def test_speed_ratio_is_median_over_median():
    assert measure.speed_ratio([2.0, 4.0, 3.0], [1.0, 1.5, 2.0]) == pytest.approx(2.0)
    with pytest.raises(ValueError):
        measure.speed_ratio([1.0], [0.0])


def test_rounds_engine_warms_up_rotates_and_keeps_the_first_timed_result():
    calls = []

    def run(label, warm):
        calls.append((label, warm))
        n = sum(1 for c in calls if c[0] == label and not c[1])
        return f"{label}{n}", 1.0 + n

    res = measure.timed_rounds(["a", "b", "c"], run, repeats=3)
    assert calls[:3] == [("a", True), ("b", True), ("c", True)]
    timed = [lb for lb, w in calls if not w]
    assert timed == ["a", "b", "c", "b", "c", "a", "c", "a", "b"]      # round r starts at label r
    assert res.rounds == 3 and res.first == {"a": "a1", "b": "b1", "c": "c1"}
    assert res.times["a"] == [2.0, 3.0, 4.0]


def test_rounds_engine_drops_a_failing_label_when_asked():
    def run(label, warm):
        if label == "bad" and not warm:
            raise RuntimeError("boom")
        return label, 1.0

    res = measure.timed_rounds(["ok", "bad"], run, repeats=2, catch=True)
    assert str(res.failed["bad"]) == "boom" and res.times == {"ok": [1.0, 1.0], "bad": []}
    with pytest.raises(RuntimeError):
        measure.timed_rounds(["ok", "bad"], run, repeats=1)


def test_rounds_engine_fits_a_budget():
    def run(label, warm):
        return None, 0.0

    assert measure.timed_rounds(["a"], run, max_rounds=4, budget_s=None, warmup=False).rounds == 4
    assert measure.timed_rounds(["a"], run, max_rounds=4, budget_s=-1.0, warmup=False).rounds == 1   # at least one
    seen = []
    measure.timed_rounds(["a"], run, max_rounds=3, budget_s=1e9, warmup=False,
                         reserve_s=lambda round_s, warm_s: seen.append((round_s >= 0, warm_s == 0.0)) or 0.0)
    assert seen and all(a and b for a, b in seen)


def test_one_fewer_steps_rule():
    rows = [{"name": "baseline", "kind": "baseline", "steps": 20, "median_s": 2.0, "psnr_db": math.inf},
            {"name": "s10", "kind": "fewer_steps", "steps": 10, "median_s": 1.0, "psnr_db": 30.0},
            {"name": "s15", "kind": "fewer_steps", "steps": 15, "median_s": 1.5, "psnr_db": 35.0},
            {"name": "fast", "kind": "freespeed", "steps": 20, "median_s": 1.2, "psnr_db": 32.0},
            {"name": "good", "kind": "freespeed", "steps": 20, "median_s": 1.6, "psnr_db": 34.0},
            {"name": "slow", "kind": "freespeed", "steps": 20, "median_s": 2.5, "psnr_db": 50.0},
            {"name": "fastest", "kind": "peer", "steps": 20, "median_s": 0.5, "psnr_db": 20.0}]
    measure.compare_with_fewer_steps(rows)
    by = {r["name"]: r for r in rows}
    assert by["fast"]["beats_fewer_steps"] is True and by["fast"]["fewer_steps_match"]["steps"] == 10
    assert by["good"]["beats_fewer_steps"] is False and by["good"]["fewer_steps_match"]["steps"] == 15
    # slower than the full run itself: compared with it, and loses
    assert by["slow"]["beats_fewer_steps"] is False and by["slow"]["fewer_steps_match"]["baseline"] is True
    assert by["fastest"]["beats_fewer_steps"] is None
    assert "beats_fewer_steps" not in by["s10"]
    # a lower-is-better metric with its own verdict key
    for r, fd in zip(rows, (0.0, 9.0, 4.0, 5.0, 3.0, 1.0, 8.0)):
        r["fd"] = fd
    measure.compare_with_fewer_steps(rows, metric="fd", verdict_key="beats_q", higher_is_better=False)
    assert by["fast"]["beats_q"] is True and by["good"]["beats_q"] is True
    assert by["fast"]["fewer_steps_match"]["fd"] == 9.0 and by["fast"]["fewer_steps_match"]["psnr_db"] == 30.0


def test_fewer_steps_counts_spread_below_the_full_count():
    c = measure.fewer_steps_counts(20)
    assert len(c) == 6 and c[0] == 5 and c[-1] == 19 and all(a < b for a, b in zip(c, c[1:]))
    assert measure.fewer_steps_counts(20, n=3) == [5, 12, 19]
    assert all(c < 8 for c in measure.fewer_steps_counts(8))
    assert measure.fewer_steps_counts(2) == []
    assert measure.fewer_steps_counts(4) == [2, 3]


def _curve(base, fewer, extra=()):
    """Rows of a step-count curve: ``base`` = (steps, times), ``fewer`` = [(steps, times), ...]."""
    rows = [{"kind": "baseline", "steps": base[0], "times_s": list(base[1])}]
    rows += [{"kind": "fewer_steps", "steps": s, "times_s": list(t)} for s, t in fewer]
    return rows + [{"kind": "freespeed", "steps": base[0], "times_s": list(t)} for t in extra]


def _linear(steps, a=0.5, b=1.0, jitter=(0.0, 0.03, -0.02)):
    return [a + b * steps + j for j in jitter]


def test_timing_check_passes_a_consistent_curve():
    rows = _curve((20, _linear(20)), [(s, _linear(s)) for s in (5, 8, 10, 14, 19)], extra=[[3.0, 9.0, 1.0]])
    ok, why = measure.timing_check(rows)
    assert ok, why
    assert "3 rounds" in why


def test_timing_check_needs_three_rounds():
    rows = _curve((20, _linear(20)[:2]), [(s, _linear(s)[:2]) for s in (5, 10, 19)])
    ok, why = measure.timing_check(rows)
    assert not ok and "2 timing rounds" in why and "at least 3" in why
    ok, why = measure.timing_check(_curve((20, [20.5]), [(10, [10.5])]))
    assert not ok and "1 timing round;" in why


def test_timing_check_catches_a_slow_baseline():
    """The issue's run: 20 steps 55.7 s, 19 steps 49.3 s, 16 steps 39.5 s -- monotone, but the full run
    is ~6% slower than the fewer-steps runs predict (the first row measured was slow)."""
    tight = (0.0, 0.1, -0.1)
    rows = _curve((20, [55.7 + j for j in tight]), [(19, [49.3 + j for j in tight]), (16, [39.5 + j for j in tight])])
    ok, why = measure.timing_check(rows)
    assert not ok and "outlier" in why and "20 steps" in why
    # the same medians with a spread wide enough to cover the gap: consistent within the measured spread
    wide = (0.0, 4.0, -4.0)
    rows = _curve((20, [55.7 + j for j in wide]), [(19, [49.3 + j for j in wide]), (16, [39.5 + j for j in wide])])
    assert measure.timing_check(rows)[0]


def test_timing_check_catches_a_curve_that_does_not_grow_with_steps():
    fewer = [(s, _linear(s)) for s in (5, 10, 19)]
    fewer[1] = (10, [21.0, 21.1, 20.9])            # 10 steps slower than 19 steps (a busy round)
    ok, why = measure.timing_check(_curve((20, _linear(20)), fewer))
    assert not ok and "10 steps" in why and "does not grow" in why
    # one fewer-steps run: the full run is checked against the line through the origin
    assert measure.timing_check(_curve((20, _linear(20, a=0)), [(10, _linear(10, a=0))]))[0]
    assert not measure.timing_check(_curve((20, _linear(20, a=0)), [(10, _linear(5, a=0))]))[0]
