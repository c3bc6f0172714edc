"""Attention-map reuse logic (core/mapreuse.py): schedules in percent, plans, keys, search scoring."""
from __future__ import annotations

import math

import pytest
import torch

from comfyui_freespeed.core.mapreuse import (KEEP, ORIGINAL, REUSE, ReusePlan, actions_for, custom_reuse_steps,
                                             distortion, format_percents, hurry_steps, late_reuse_steps, map_bytes,
                                             map_key, parse_levels, pick_reuse_steps, resolve_plan, search_schedule,
                                             steps_to_percents)
from comfyui_freespeed.core.schedule import RunSchedule, parse_percent_list, percents_to_steps


def linear_schedule(steps: int) -> RunSchedule:
    """A run whose percent is linear in the step (step i at i/steps), sigma from 10 down to 0."""
    sig = [10.0 * (1 - i / steps) for i in range(steps + 1)]
    return RunSchedule(sig, lambda p: 10.0 * (1 - p))


def test_late_schedule_no_refresh_reuses_the_window():
    s = linear_schedule(20)
    assert late_reuse_steps(s, 0.5) == list(range(10, 20))
    plan = resolve_plan(s, "late", start=0.5)
    assert plan.reuse_steps == list(range(10, 20))
    assert plan.keep_steps == [9]
    assert plan.action(0, False) == ORIGINAL and plan.action(9, False) == KEEP and plan.action(15, False) == REUSE


def test_late_schedule_refresh_every_k():
    s = linear_schedule(20)
    # pre-window step 9 is position 0; window 10..19 are positions 1..10; refresh at positions 2, 4, ...
    assert late_reuse_steps(s, 0.5, refresh_every=2) == [10, 12, 14, 16, 18]
    plan = resolve_plan(s, "late", start=0.5, refresh_every=2)
    assert plan.keep_steps == [9, 11, 13, 15, 17]
    assert late_reuse_steps(s, 0.5, refresh_every=3) == [10, 11, 13, 14, 16, 17, 19]
    assert late_reuse_steps(s, 0.5, refresh_every=1) == []          # every step refreshed = nothing reused


def test_late_schedule_is_in_percent_not_steps():
    for steps in (10, 20, 50):
        s = linear_schedule(steps)
        r = late_reuse_steps(s, 0.6)
        assert r[0] == math.ceil(0.6 * steps) and r[-1] == steps - 1


def test_late_schedule_edges():
    s = linear_schedule(10)
    assert late_reuse_steps(s, 1.0) == []                           # window holds no evaluated step
    assert resolve_plan(s, "late", start=1.0).off
    assert late_reuse_steps(s, 0.0) == list(range(1, 10))           # step 0 never reuses
    assert late_reuse_steps(s, 0.0, refresh_every=2) == [1, 3, 5, 7, 9]
    with pytest.raises(ValueError):
        late_reuse_steps(s, 0.5, refresh_every=-1)


def test_custom_schedule_and_actions():
    s = linear_schedule(10)
    assert custom_reuse_steps(s, parse_percent_list("0, 50, 55, 90")) == [5, 6, 9]   # 0% is step 0: dropped
    assert actions_for(10, [5, 6, 9]) == [ORIGINAL] * 4 + [KEEP, REUSE, REUSE, ORIGINAL, KEEP, REUSE]
    assert resolve_plan(s, "off").actions == [ORIGINAL] * 10
    assert resolve_plan(s, "custom", percents=()).off
    with pytest.raises(ValueError):
        resolve_plan(s, "fast")


def test_extra_and_out_of_range_evaluations_run_the_original():
    plan = ReusePlan.from_steps(10, [5])
    assert plan.action(5, True) == ORIGINAL
    assert plan.action(4, True) == ORIGINAL
    assert plan.action(10, False) == ORIGINAL and plan.action(-1, False) == ORIGINAL


@pytest.mark.parametrize("steps", [7, 20, 33])
def test_steps_to_percents_round_trip(steps):
    # a non-linear mapping (like a real model's) as well as the linear one
    sig = [14.6 * (1 - i / steps) ** 3 for i in range(steps + 1)]
    for s in (linear_schedule(steps), RunSchedule(sig, lambda p: 14.6 * (1 - p) ** 2.5)):
        chosen = [1, 2, steps // 2, steps - 1]
        pct = steps_to_percents(chosen, s)
        assert percents_to_steps(pct, s) == sorted(set(chosen))
        assert percents_to_steps(parse_percent_list(format_percents(pct)), s) == sorted(set(chosen))


def test_map_key_separates_branches_conds_and_token_counts():
    k = map_key("a.attn1", 0, "u1", 256, 256)
    assert k != map_key("a.attn1", 1, "u1", 256, 256)
    assert k != map_key("a.attn1", 0, "u2", 256, 256)
    assert k != map_key("a.attn1", 0, "u1", 256, 64)       # ToDo shortened K/V
    assert k == map_key("a.attn1", 0, "u1", 256, 256)


def test_map_bytes_paper_figure():
    # SD1.5 at 512², level 1, CFG: 2 x 8 heads x 4096² in fp16 = 0.5 GiB
    assert map_bytes(2, 8, 4096, 4096, torch.float16) == 2 ** 29
    assert map_bytes(1, 8, 4096, 77, torch.float32) == 8 * 4096 * 77 * 4


def test_parse_levels():
    assert parse_levels("all") is None and parse_levels("") is None
    assert parse_levels("1, 3") == frozenset({1, 3})
    with pytest.raises(ValueError):
        parse_levels("one")
    with pytest.raises(ValueError):
        parse_levels("0")


def test_search_scoring():
    a = torch.randn(1, 4, 8, 8)
    assert distortion(a, a)["mse"] == 0 and distortion(a, a)["psnr"] == math.inf
    d = distortion(a + 0.1, a)
    assert abs(d["mse"] - 0.01) < 1e-6
    scores = {1: 0.5, 2: 0.1, 3: 0.1, 4: 0.05, 5: 0.3}
    assert pick_reuse_steps(scores, 2) == [3, 4]            # tie 2/3 -> the later step
    assert pick_reuse_steps(scores, 0) == []
    assert pick_reuse_steps(scores, 10) == [1, 2, 3, 4, 5]
    assert hurry_steps(10, 3) == [7, 8, 9]
    assert hurry_steps(4, 10) == [1, 2, 3]


def test_search_picks_least_distortion_and_never_loses_to_the_late_schedule():
    s = RunSchedule([10.0 - i for i in range(11)], lambda p: 10.0 * (1 - p))
    # distortion of a set of reuse steps: step 5 hurts most, steps 2 and 3 least (not the late ones)
    cost = {i: 1.0 for i in range(1, 10)}
    cost.update({2: 0.1, 3: 0.2, 5: 9.0})
    seen = []

    def distortion_of(steps):
        seen.append(list(steps))
        mse = sum(cost[i] for i in steps) or 1e-9
        return {"mse": mse, "psnr": -mse}

    res = search_schedule(s, 2, distortion_of)
    assert res["greedy_steps"] == [2, 3] and res["late_steps"] == [8, 9] and res["chosen"] == "greedy"
    assert res["reuse_steps"] == [2, 3] and len(seen) == 9 + 2          # one run per candidate, then both full
    assert percents_to_steps(parse_percent_list(res["percents"]), s) == [2, 3]

    def interacting(steps):                       # reusing at 2 and 3 together compounds: the late schedule wins
        mse = 100.0 if list(steps) == [2, 3] else sum(cost[i] for i in steps)
        return {"mse": mse, "psnr": -mse}

    res = search_schedule(s, 2, interacting)
    assert res["chosen"] == "late" and res["reuse_steps"] == [8, 9] and res["psnr"] == -2.0
