"""core/gating.py: T-GATE gate plan, self-attention schedule, branch mean (no ComfyUI)."""
from __future__ import annotations

import math

import pytest
import torch

from comfyui_freespeed.core.gating import (CACHE, COMPUTE, REUSE, GatePlan, branch_mean, gate_actions,
                                           self_attention_action)
from comfyui_freespeed.core.schedule import RunSchedule


def linear_model_schedule(steps: int):
    """A schedule whose step i sits at i/(steps-1) of denoising (like ComfyUI's 'normal' scheduler),
    with percent_to_sigma the matching (log-linear) mapping; last sigma 0."""
    hi, lo = math.log(14.6), math.log(0.03)

    def p2s(p):
        if p >= 1.0:
            return 0.0
        return math.exp(hi + p * (lo - hi))
    sig = [p2s(i / (steps - 1)) if i < steps - 1 else math.exp(lo) for i in range(steps)] + [0.0]
    return RunSchedule(sig, p2s)


def test_paper_default_40pct_of_25_steps():
    s = linear_model_schedule(25)
    plan = GatePlan.from_schedule(s, 0.4)
    assert (plan.steps_before, plan.steps_after, plan.cache_step) == (10, 15, 9)
    assert not plan.after(s.sigmas[9]) and plan.after(s.sigmas[10])
    assert plan.is_cache_sigma(s.sigmas[9]) and not plan.is_cache_sigma(s.sigmas[8])


def test_step_exactly_on_the_gate_is_after():
    s = linear_model_schedule(25)
    plan = GatePlan.from_schedule(s, 0.5)               # step 12 sits exactly at 50%
    assert plan.after(s.sigmas[12]) and not plan.after(s.sigmas[11])
    assert plan.cache_step == 11


def test_gate_100_is_off_and_0_starts_after():
    s = linear_model_schedule(10)
    off = GatePlan.from_schedule(s, 1.0)
    assert off.off and off.steps_after == 0 and off.cache_step is None
    assert not any(off.after(x) for x in s.sigmas)
    zero = GatePlan.from_schedule(s, 0.0)
    assert zero.steps_before == 0 and zero.steps_after == 10 and zero.cache_step is None
    assert zero.after(s.sigmas[0])


def test_partial_schedule_denoise_tail_starts_past_gate():
    full = linear_model_schedule(20)
    tail = RunSchedule(full.sigmas[10:], full.percent_to_sigma)    # denoise 0.5: the last 10 steps
    plan = GatePlan.from_schedule(tail, 0.4)
    assert plan.steps_before == 0 and plan.cache_step is None and plan.steps_after == 10


def test_extra_sigma_between_steps_is_decided_by_sigma():
    s = linear_model_schedule(25)
    plan = GatePlan.from_schedule(s, 0.4)
    mid_before = math.sqrt(s.sigmas[8] * s.sigmas[9])
    mid_across = math.sqrt(s.sigmas[9] * s.sigmas[10])
    assert not plan.after(mid_before)
    assert not plan.is_cache_sigma(mid_before)
    assert plan.after(mid_across) == (mid_across <= plan.gate_sigma)


def test_bad_gate_rejected():
    with pytest.raises(ValueError):
        GatePlan.from_schedule(linear_model_schedule(5), 1.5)


def official_self_attention(cur_step, gate_step, sp_interval, warm_up):
    """The self-attention half of the official ``tgate_utils.tgate_scheduler`` before the gate step
    (T-GATE repository), as (cache, reuse) flags."""
    if cur_step < warm_up:
        return False, False
    if cur_step == warm_up:
        return True, False
    return (True, False) if cur_step % sp_interval == 0 else (False, True)


@pytest.mark.parametrize("warmup,interval", [(2, 5), (2, 3), (0, 4), (3, 1), (7, 5)])
def test_self_attention_schedule_matches_the_official_scheduler(warmup, interval):
    gate_step = 10
    for step in range(gate_step - 1):
        cache, reuse = official_self_attention(step, gate_step, interval, warmup)
        want = REUSE if reuse else CACHE if cache and interval > 1 else COMPUTE   # interval 1: nothing is reused
        assert self_attention_action(step, warmup, interval) == want, (step, warmup, interval)


def test_issue_example_warmup_2_interval_5_gate_at_step_10():
    """Cache at 2 and 5, reuse at 3, 4, 6, 7, 8 (absolute step index, not counted from the warm-up); the
    cache step (9) and every step after the gate compute self-attention; cross-attention caches at 9 and is
    reused from 10 on."""
    s = linear_model_schedule(25)
    plan = GatePlan.from_schedule(s, 0.4)
    attn1, attn2 = [], []
    for step in range(25):
        a2, a1 = gate_actions(plan, s.sigmas[step], step, extra=False, main=True, has_roles=True,
                              cached_earlier=step > plan.cache_step, self_attention=(2, 5))
        attn1.append(a1)
        attn2.append(a2)
    assert [i for i, a in enumerate(attn1) if a == CACHE] == [2, 5]
    assert [i for i, a in enumerate(attn1) if a == REUSE] == [3, 4, 6, 7, 8]
    assert attn2 == [COMPUTE] * 9 + [CACHE] + [REUSE] * 15


def test_gate_actions_never_cache_on_extra_passes_and_evaluations():
    s = linear_model_schedule(25)
    plan = GatePlan.from_schedule(s, 0.4)
    sig = s.sigmas[9]
    assert gate_actions(plan, sig, 9, False, True, True, False)[0] == CACHE
    assert gate_actions(plan, sig, 9, False, False, True, False)[0] == COMPUTE     # SAG/PAG pass
    assert gate_actions(plan, sig, 9, True, True, True, False)[0] == COMPUTE       # off-schedule evaluation
    assert gate_actions(plan, sig, 9, False, True, False, False)[0] == COMPUTE     # no cond/uncond chunk
    # a run starting past the gate caches at its first cacheable evaluation, reuses after it
    late = s.sigmas[15]
    assert gate_actions(plan, late, 15, False, True, True, False)[0] == CACHE
    assert gate_actions(plan, late, 15, False, True, True, True)[0] == REUSE
    off = GatePlan.from_schedule(s, 1.0)
    assert gate_actions(off, late, 15, False, True, True, True, (0, 2)) == (COMPUTE, COMPUTE)


def test_branch_mean():
    c, u = torch.randn(2, 5, 3), torch.randn(2, 5, 3)
    assert torch.allclose(branch_mean({"cond": (c, 1), "uncond": (u, 1)}), (c + u) / 2)
    # two cond chunks (two positive prompts) weigh as one branch
    c2 = torch.randn(2, 5, 3)
    assert torch.allclose(branch_mean({"cond": (c + c2, 2), "uncond": (u, 1)}), ((c + c2) / 2 + u) / 2, atol=1e-6)
    single = branch_mean({"cond": (c, 1)})
    assert torch.equal(single, c) and single.data_ptr() != c.data_ptr()
    h = branch_mean({"cond": (c.half(), 1), "uncond": (u.half(), 1)})
    assert h.dtype == torch.float16
    with pytest.raises(ValueError):
        branch_mean({})
