"""core.propagation: Faster Diffusion key-step schedules, parallel planning, noise injection, caches."""
import math

import pytest
import torch

from comfyui_freespeed.core.propagation import (PAPER_KEY_STEPS_50, FeatureCache, Features, OutputCache,
                                                 every_k_steps, injection_active, injection_delta, key_steps,
                                                 paper_key_percents, plan_parallel, repeat_batch)
from comfyui_freespeed.core.schedule import RunSchedule, parse_percent_list

# SD1.x's discrete schedule (scaled-linear betas), as ComfyUI's ModelSamplingDiscrete builds it
_BETAS = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2
_AC = torch.cumprod(1.0 - _BETAS, dim=0)
LOG_SIGMAS = (((1 - _AC) / _AC) ** 0.5).log()


def sigma_at_t(t: float) -> float:
    """ComfyUI's ModelSamplingDiscrete.sigma: log-linear interpolation of the table."""
    t = min(max(t, 0.0), 999.0)
    lo = int(math.floor(t))
    hi = min(lo + 1, 999)
    w = t - lo
    return float(((1 - w) * LOG_SIGMAS[lo] + w * LOG_SIGMAS[hi]).exp())


def p2s(p: float) -> float:
    """ComfyUI's percent_to_sigma."""
    if p <= 0.0:
        return 999999999.9
    if p >= 1.0:
        return 0.0
    return sigma_at_t((1.0 - p) * 999.0)


def normal_run(steps: int) -> RunSchedule:
    """ComfyUI's 'normal' scheduler: timesteps linspace(999, 0, steps), then sigma 0."""
    ts = torch.linspace(999, 0, steps).tolist()
    return RunSchedule([sigma_at_t(t) for t in ts] + [0.0], p2s)


def ddim_uniform_run(steps: int) -> RunSchedule:
    """ComfyUI's 'ddim_uniform': the discrete timesteps 1, 1+c, ... (c = 1000 // steps), reversed --
    the timesteps of the paper's diffusers DDIM (981, 961, ..., 1 at 50 steps)."""
    c = 1000 // steps
    ts = list(range(1, 1000, c))[::-1]
    return RunSchedule([sigma_at_t(t) for t in ts] + [0.0], p2s)


def expected_normal(percents, steps):
    """At the normal scheduler step i sits at i/(steps-1) of denoising: first step at or past each."""
    out = set()
    for p in percents:
        out.add(next(i for i in range(steps) if i / (steps - 1) >= p - 1e-9))
    return sorted(out | {0})


def test_paper_table_as_percents():
    assert PAPER_KEY_STEPS_50 == (0, 1, 2, 3, 5, 10, 15, 25, 35)
    assert paper_key_percents() == pytest.approx([0.0, 0.02, 0.04, 0.06, 0.10, 0.20, 0.30, 0.50, 0.70])


@pytest.mark.parametrize("run", [normal_run(50), ddim_uniform_run(50)], ids=["normal", "ddim_uniform"])
def test_50ls_maps_back_to_the_paper_steps_at_50(run):
    assert key_steps(run, "50ls") == list(PAPER_KEY_STEPS_50)


@pytest.mark.parametrize("steps, expected", [(25, [0, 1, 2, 3, 5, 8, 12, 17]), (20, [0, 1, 2, 4, 6, 10, 14])])
def test_50ls_at_other_step_counts_hits_the_same_points_of_denoising(steps, expected):
    run = normal_run(steps)
    keys = key_steps(run, "50ls")
    assert keys == expected == expected_normal(paper_key_percents(), steps)
    # every key step sits at or just past its percent: never before it
    for p in paper_key_percents():
        first = min(k for k in keys if k / (steps - 1) >= p - 1e-9)
        assert first / (steps - 1) - p < 1.0 / (steps - 1) + 1e-9


def test_50ls_without_model_time_follows_the_runs_own_steps():
    sig = normal_run(50).sigmas
    run = RunSchedule(sig, None)                  # no percent_to_sigma: percent along the run's steps
    assert key_steps(run, "50ls") == list(PAPER_KEY_STEPS_50)


def test_every_k():
    assert every_k_steps(10, 3) == [0, 3, 6, 9]
    assert every_k_steps(10, 1) == list(range(10))
    assert every_k_steps(4, 10) == [0]
    with pytest.raises(ValueError):
        every_k_steps(10, 0)
    run = normal_run(12)
    assert key_steps(run, "every_k", every_k=4) == [0, 4, 8]
    assert key_steps(run, "every_k", every_k=1) == list(range(12))


def test_custom_percents_and_step_zero_always_key():
    run = normal_run(11)                          # step i at i/10
    assert key_steps(run, "custom", percents=parse_percent_list("0, 50")) == [0, 5]
    assert key_steps(run, "custom", percents=parse_percent_list("30, 61")) == [0, 3, 7]
    assert key_steps(run, "custom", percents=[1.0]) == [0]      # 100% is past the last evaluated step
    with pytest.raises(ValueError):
        key_steps(run, "sometimes")


def test_partial_run_maps_early_percents_to_its_first_step():
    full = normal_run(50)
    tail = RunSchedule(full.sigmas[20:], p2s)     # denoise < 1: the run starts at 20/49 ≈ 41%
    assert key_steps(tail, "50ls") == [0, 5, 15]  # 50% -> global step 25, 70% -> 35


def test_parallel_plan_stops_at_key_steps_and_max_parallel():
    keys = {0, 1, 2, 3, 5, 10}
    assert plan_parallel(4, keys, 12, 4) == [4]
    assert plan_parallel(6, keys, 12, 4) == [6, 7, 8, 9]
    assert plan_parallel(6, keys, 12, 2) == [6, 7]
    assert plan_parallel(6, keys, 12, 16) == [6, 7, 8, 9]
    assert plan_parallel(11, keys, 12, 4) == [11]
    assert plan_parallel(6, keys, 12, 4, skip={7}) == [6, 8, 9]
    assert plan_parallel(6, keys, 12, 1) == [6]
    # the paper's 50 steps with max 4: 28 steps decoded ahead of their turn
    paper = set(PAPER_KEY_STEPS_50)
    ahead, step = 0, 0
    while step < 50:
        if step in paper:
            step += 1
            continue
        plan = plan_parallel(step, paper, 50, 4)
        assert len(plan) <= 4 and not (set(plan) & paper)
        ahead += len(plan) - 1
        step = plan[-1] + 1
    assert ahead == 28


def test_injection_starts_at_half_of_denoising():
    run = normal_run(50)
    active = [i for i in range(50) if injection_active(run, run.sigmas[i], 0.5)]
    assert active == list(range(25, 50))          # paper: t/1000 < 0.5 -> 25 of 50 DDIM steps
    assert [i for i in range(50) if injection_active(run, run.sigmas[i], 1.0)] == []
    paper = ddim_uniform_run(50)                  # t = 981 - 20 i: t < 500 from i = 25
    assert [i for i in range(50) if injection_active(paper, paper.sigmas[i], 0.5)] == list(range(25, 50))


def test_injection_delta_is_the_papers_shift_in_sampler_space():
    z = torch.randn(1, 4, 8, 8)
    sigma = 3.0
    scale = 1.0 / math.sqrt(sigma ** 2 + 1.0)     # eps/v models: model input = x / sqrt(sigma^2 + 1)
    d = injection_delta(z, 0.003, scale)
    # model input shifts by exactly 0.003 * z_T (the paper's latents += 0.003 * init_latents)
    assert torch.allclose(d * scale, 0.003 * z, atol=1e-7)
    assert torch.equal(injection_delta(z, 0.0, scale), torch.zeros_like(z))


def test_repeat_batch_is_step_major():
    t = torch.arange(4.0).view(2, 2)
    r = repeat_batch(t, 3)
    assert r.shape == (6, 2) and torch.equal(r[2:4], t) and torch.equal(r[4:], t)
    assert repeat_batch(t, 1) is t and repeat_batch(None, 3) is None


def feats(branches, per, step, h=4, seed=0, fill=None):
    g = torch.Generator().manual_seed(seed)
    b = per * len(branches)
    mid = torch.randn(b, 8, h // 2, h // 2, generator=g)
    skips = [torch.randn(b, 4, h, h, generator=g), torch.randn(b, 8, h // 2, h // 2, generator=g)]
    return Features(tuple(branches), per, mid, skips, step, meta={"x_shape": (b, 4, h, h), "tindex": 3})


def test_feature_cache_serves_any_batch_composition():
    fc = FeatureCache()
    f = feats(["u", "c"], 2, step=0)
    fc.put(f)
    mid, skips, meta = fc.lookup(["u", "c"], 2, (4, 4, 4, 4))
    assert mid is f.mid and skips[0] is f.skips[0] and meta["tindex"] == 3     # same layout: no copy
    mid, skips, _ = fc.lookup(["c", "u"], 2, (4, 4, 4, 4))                    # swapped order
    assert torch.equal(mid, torch.cat([f.mid[2:], f.mid[:2]])) and torch.equal(skips[1][:2], f.skips[1][2:])
    mid, skips, _ = fc.lookup(["c"], 2, (2, 4, 4, 4))                         # cond only (CFG dropped)
    assert torch.equal(mid, f.mid[2:]) and torch.equal(skips[0], f.skips[0][2:])
    assert fc.lookup(["x"], 2, (2, 4, 4, 4)) is None                          # unknown branch
    assert fc.lookup(["c"], 1, (1, 4, 4, 4)) is None                          # other batch size
    assert fc.lookup(["c"], 2, (2, 4, 8, 8)) is None                          # other latent size
    assert fc.lookup(["c"], 2, (2, 9, 4, 4)) is not None                      # channels are not compared
    assert fc.hits == 4 and fc.misses == 3


def test_feature_cache_frees_replaced_entries_and_reports_bytes():
    fc = FeatureCache()
    a = feats(["u"], 1, step=0, seed=1)
    b = feats(["c"], 1, step=0, seed=2)
    fc.put(a)
    fc.put(b)
    assert fc.bytes == a.nbytes + b.nbytes
    c = feats(["u", "c"], 1, step=5, seed=3)                # a key step with both branches batched
    fc.put(c)
    assert fc.bytes == c.nbytes                              # a and b are no longer referenced
    assert fc.peak_bytes == max(a.nbytes + b.nbytes, c.nbytes)
    assert fc.step_of("u") == 5 and "c" in fc and "z" not in fc


def test_output_cache_per_step_and_branch():
    oc = OutputCache()
    out = torch.arange(2 * 3 * 4.0).view(6, 4)               # 3 branches, 2 each
    oc.put(7, ["u", "c", "a"], 2, out)
    assert oc.has(7, ["c"]) and not oc.has(8, ["c"])
    assert torch.equal(oc.get(7, ["c"], 2), out[2:4])
    assert torch.equal(oc.get(7, ["a", "u"], 2), torch.cat([out[4:], out[:2]]))
    assert oc.get(7, ["c"], 2) is not None                    # kept after serving (heun visits twice)
    assert oc.get(7, ["c"], 1) is None
    assert oc.bytes == out.numel() * 4 and oc.peak_bytes == oc.bytes
    oc.put(9, ["u"], 2, out[:2])
    oc.invalidate(["u"])
    assert not oc.has(7, ["u"]) and oc.has(7, ["c"]) and oc.steps() == [7]
    oc.drop_before(8)
    assert oc.steps() == [] and oc.bytes == 0


def test_dit_warmup_keys_add_full_steps_before_the_warmup_and_every_nth_after():
    from comfyui_freespeed.core.propagation import warmup_keys
    s = RunSchedule([10.0 - i for i in range(11)], lambda p: 10.0 * (1 - p))     # 10 steps, step i at i / 10
    assert warmup_keys(s, 0.5, 2) == {0, 1, 2, 3, 4, 5, 7, 9}                    # full to 50%, then N = 2
    assert warmup_keys(s, 0.5, 3) == {0, 1, 2, 3, 4, 5, 8}                       # FORA's N = 3
    assert warmup_keys(s, 0.5, 0) == {0, 1, 2, 3, 4}
    assert warmup_keys(s, 0.0, 0) == set()                                      # nothing added: the schedule alone
    assert warmup_keys(s, 1.0, 2) == set(range(10))
