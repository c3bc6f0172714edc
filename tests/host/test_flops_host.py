"""core/flops.py on ComfyUI's own attention functions: one call of every kernel ComfyUI can pick on
this machine (pytorch SDPA, sub-quadratic, split, basic) counts the analytic attention FLOPs, masked
or not; the CUDA-only ones (xformers, sage, flash_attn) are not importable here (their formulas are
torch's own or core.flops' ``flash_attention::flash_attn`` entry)."""
from __future__ import annotations

import pytest
import torch

from comfyui_freespeed.core.flops import count_flops_detailed

B, HEADS, L, S, D = 2, 4, 64, 77, 16


def analytic(b, h, lq, lk, d):
    return 2 * 2 * b * h * lq * lk * d          # Q·Kᵀ and P·V, multiply-add = 2 FLOPs


@pytest.mark.parametrize("name", ["pytorch", "sub_quad", "split", "basic"])
@pytest.mark.parametrize("masked", [False, True])
def test_comfy_attention_kernels_count_the_analytic_flops(name, masked):
    from comfy.ldm.modules import attention as A
    fn = A.attention_basic if name == "basic" else A.get_attention_function(name)
    g = torch.Generator().manual_seed(0)
    q = torch.randn(B, L, HEADS * D, generator=g)
    k, v = torch.randn(B, S, HEADS * D, generator=g), torch.randn(B, S, HEADS * D, generator=g)
    mask = torch.zeros(B, L, S) if masked else None
    ref = A.attention_basic(q, k, v, HEADS, mask=mask)
    with torch.inference_mode():
        out, c = count_flops_detailed(fn, q, k, v, HEADS, mask=mask)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
    assert c.total == analytic(B, HEADS, L, S, D), c.by_op
    assert c.uncounted == []


def test_comfy_default_attention_on_cpu_is_counted():
    """Whatever ComfyUI chose as ``optimized_attention`` here is counted exactly."""
    from comfy.ldm.modules import attention as A
    q = torch.randn(1, L, HEADS * D)
    _, c = count_flops_detailed(A.optimized_attention, q, q, q, HEADS)
    assert c.total == analytic(1, HEADS, L, L, D)


def test_a_whole_sampling_run_is_counted_per_model_call_and_independent_of_the_seed():
    """``count_flops`` around ``comfy.sample.sample``: euler calls the model once per step (CFG: cond and
    uncond in one batch), so the count is linear in the steps with no constant, and does not depend on
    the noise -- the counted cost axis is deterministic."""
    import comfy.sample
    from comfyui_freespeed.core.flops import count_flops
    from tiny import tiny_sd15

    t = tiny_sd15()
    latent = t.latent(16, 16, batch=1)
    pos, neg = t.cond(1, 1), t.cond(2, 1)

    def run(steps, seed):
        noise = comfy.sample.prepare_noise(latent, seed)
        with torch.inference_mode():
            return count_flops(comfy.sample.sample, t.model, noise, steps, 5.0, "euler", "normal", pos, neg,
                               latent, seed=seed, disable_pbar=True)

    out1, f1 = run(1, 0)
    _, f1b = run(1, 7)
    _, f3 = run(3, 0)
    assert f1 > 0 and f3 == 3 * f1 and f1b == f1
    with torch.inference_mode():
        plain = comfy.sample.sample(t.model, comfy.sample.prepare_noise(latent, 0), 1, 5.0, "euler", "normal",
                                    pos, neg, latent, seed=0, disable_pbar=True)
    torch.testing.assert_close(out1, plain, rtol=0, atol=0)       # counting does not change the result
