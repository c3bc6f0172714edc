"""core.schedule: percent windows from sigma, step lookup, extra evaluations, percent lists."""
import math

import pytest
import torch

from comfyui_freespeed.core.schedule import RunSchedule, parse_percent_list, percents_to_steps


def steps_in(sch, start, end):
    """Step indices (schedule sigmas, last one excluded) inside a [start, end] percent window."""
    return [i for i in range(sch.total_steps) if sch.in_window(sch.sigmas[i], start, end)]


def discrete_p2s(sigmas_1000):
    """percent_to_sigma of a discrete (SD-like) model: sigma at timestep (1 - p) * 999."""
    def p2s(p):
        if p <= 0.0:
            return 999999999.9
        if p >= 1.0:
            return 0.0
        t = (1.0 - p) * 999.0
        lo = int(math.floor(t))
        hi = min(lo + 1, 999)
        w = t - lo
        return float((1 - w) * sigmas_1000[lo] + w * sigmas_1000[hi])
    return p2s


SIGMAS_1000 = torch.linspace(0.03, 14.6, 1000)  # monotone increasing in t, like SD's table
P2S = discrete_p2s(SIGMAS_1000)


def linear_run(steps):
    """A 'normal'-scheduler-like run: timesteps evenly spaced from 999 to 0, then sigma 0."""
    ts = torch.linspace(999, 0, steps)
    return [float(SIGMAS_1000[int(round(float(t)))]) for t in ts] + [0.0]


def test_window_includes_everything_from_0_to_100():
    sch = RunSchedule(linear_run(20), P2S)
    assert steps_in(sch, 0.0, 1.0) == list(range(20))


def test_window_follows_percent_not_step_count():
    # the same 0%..50% window selects the first half of the run at 10 and at 40 steps
    for steps in (10, 40):
        sch = RunSchedule(linear_run(steps), P2S)
        sel = steps_in(sch, 0.0, 0.5)
        assert sel == list(range(len(sel)))
        assert abs(len(sel) / steps - 0.5) <= 1.0 / steps + 1e-9, (steps, sel)


def test_empty_window_never_opens():
    sch = RunSchedule(linear_run(10), P2S)
    assert steps_in(sch, 0.6, 0.4) == []
    assert not any(sch.in_window(s, 1.0, 1.0) for s in sch.sigmas[:-1])


def test_denoise_below_one_sees_only_the_tail():
    # denoise 0.5: the run's schedule is the tail of a longer one; a 0..30% window never opens
    full = linear_run(20)
    tail = full[10:]
    sch = RunSchedule(tail, P2S)
    assert steps_in(sch, 0.0, 0.3) == []
    assert steps_in(sch, 0.0, 1.0) == list(range(len(tail) - 1))


def test_step_lookup_and_extra_evaluations():
    run = linear_run(8)
    sch = RunSchedule(run, P2S)
    for i, s in enumerate(run[:-1]):
        assert sch.step_of(s) == (i, False)
        assert sch.step_of(s * (1 + 1e-6)) == (i, False)  # float noise tolerated
    mid = math.sqrt(run[2] * run[3])  # heun/dpm_2 style midpoint
    assert sch.step_of(mid) == (2, True)
    info = sch.info(mid)
    assert info.extra and info.step == 2 and info.total_steps == 8
    assert sch.info(run[0]).percent == pytest.approx(0.0, abs=2e-3)


def test_percent_of_inverts_sigma_at():
    sch = RunSchedule(linear_run(10), P2S)
    for p in (0.1, 0.37, 0.5, 0.9):
        assert sch.percent_of(sch.sigma_at(p)) == pytest.approx(p, abs=1e-3)


def test_fallback_without_model_mapping_uses_the_runs_own_steps():
    run = [10.0, 5.0, 2.5, 1.25, 0.0]
    sch = RunSchedule(run, None)
    assert sch.sigma_at(0.0) == math.inf and sch.sigma_at(1.0) == 0.0
    assert sch.sigma_at(0.5) == pytest.approx(2.5)
    assert steps_in(sch, 0.0, 0.5) == [0, 1, 2]


def test_percents_to_steps_maps_to_first_step_at_or_past():
    sch = RunSchedule(linear_run(50), P2S)
    assert percents_to_steps([0.0], sch) == [0]
    steps = percents_to_steps([0.0, 0.1, 0.5, 0.5], sch)
    assert steps[0] == 0 and len(steps) == 3
    assert steps == sorted(steps)
    assert abs(steps[2] - 25) <= 1


def test_parse_percent_list():
    assert parse_percent_list("0, 10, 25.5%") == [0.0, 0.1, 0.255]
    assert parse_percent_list("50;10") == [0.1, 0.5]
    with pytest.raises(ValueError, match="outside 0..100"):
        parse_percent_list("120")
    with pytest.raises(ValueError, match="not a number"):
        parse_percent_list("ten")
