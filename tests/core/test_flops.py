"""core/flops.py: counted FLOPs equal the analytic count for every attention kernel torch can pick on
this machine (SDPA's CPU flash kernel included, which torch alone counts as 0), the matmul paths of
ComfyUI's non-SDPA attention (einsum -> bmm, baddbmm) and convolutions; uncounted attention ops are named.
Pure torch, no host (tests/host/test_flops_host.py counts ComfyUI's own attention functions)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from comfyui_freespeed.core.flops import count_flops, count_flops_detailed, counting

B, H, L, S, D, DV = 2, 3, 40, 77, 16, 24


def attention_flops(b, h, lq, lk, d, dv):
    """Q·Kᵀ (2·Lq·Lk·D multiply-adds) plus P·V (2·Lq·Lk·Dv) per head; softmax not counted."""
    return 2 * b * h * lq * lk * d + 2 * b * h * lq * lk * dv


def qkv(dtype=torch.float32, dv=DV):
    """Dv != D sends CPU SDPA to its math path (bmm); Dv == D to its flash kernel."""
    g = torch.Generator().manual_seed(0)
    return (torch.randn(B, H, L, D, generator=g).to(dtype), torch.randn(B, H, S, D, generator=g).to(dtype),
            torch.randn(B, H, S, dv, generator=g).to(dtype))


def test_torch_alone_misses_the_cpu_sdpa_kernel_that_we_register():
    # the reason this module exists: torch's table has no formula for the CPU flash kernel
    from torch.utils import flop_counter as fc
    q, k, v = qkv(dv=D)
    _, c = count_flops_detailed(F.scaled_dot_product_attention, q, k, v)
    assert c.by_op == {"aten._scaled_dot_product_flash_attention_for_cpu": attention_flops(B, H, L, S, D, D)}
    assert c.total == attention_flops(B, H, L, S, D, D)
    assert c.uncounted == []
    packet = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    ours = fc.flop_registry.pop(packet)
    try:
        with fc.FlopCounterMode(display=False) as bare:
            F.scaled_dot_product_attention(q, k, v)
        assert bare.get_total_flops() == 0
        _, c = count_flops_detailed(F.scaled_dot_product_attention, q, k, v)     # registers it again
        assert c.total == attention_flops(B, H, L, S, D, D)
    finally:
        fc.flop_registry[packet] = ours


@pytest.mark.parametrize("backend", [SDPBackend.FLASH_ATTENTION, SDPBackend.MATH])
@pytest.mark.parametrize("mask", [None, "float", "bool"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_every_cpu_sdpa_backend_matches_the_analytic_count(backend, mask, dtype):
    q, k, v = qkv(dtype, dv=D)
    m = None if mask is None else (torch.zeros(L, S, dtype=dtype) if mask == "float"
                                   else torch.rand(L, S, generator=torch.Generator().manual_seed(1)) > 0.3)
    with sdpa_kernel([backend]), torch.inference_mode():
        out, n = count_flops(F.scaled_dot_product_attention, q, k, v, attn_mask=m)
    assert out.shape == (B, H, L, D)
    assert n == attention_flops(B, H, L, S, D, D)


def test_matmul_attention_paths_match_the_analytic_count():
    """The ops ComfyUI's attention_basic / split (einsum) and sub_quad (baddbmm, bmm) reach."""
    q, k, v = (t.flatten(0, 1) for t in qkv())
    want = attention_flops(B, H, L, S, D, DV)

    def einsum_attention(q, k, v):
        sim = torch.einsum("b i d, b j d -> b i j", q, k) * D ** -0.5
        return torch.einsum("b i j, b j d -> b i d", sim.softmax(-1), v)

    def baddbmm_attention(q, k, v):
        bias = torch.zeros(q.shape[0], L, S)
        sim = torch.baddbmm(bias, q, k.transpose(1, 2), alpha=D ** -0.5, beta=0)
        return torch.bmm(sim.softmax(-1), v)

    def chunked_einsum_attention(q, k, v):          # attention_split: query slices
        out = torch.empty(q.shape[0], L, DV)
        for i in range(0, L, 16):
            sim = torch.einsum("b i d, b j d -> b i j", q[:, i:i + 16], k) * D ** -0.5
            out[:, i:i + 16] = torch.einsum("b i j, b j d -> b i d", sim.softmax(-1), v)
        return out

    ref = F.scaled_dot_product_attention(q, k, v)
    _, n = count_flops(F.scaled_dot_product_attention, q, k, v)      # Dv != D: SDPA's own math path
    assert n == want
    for fn in (einsum_attention, baddbmm_attention, chunked_einsum_attention):
        out, n = count_flops(fn, q, k, v)
        assert n == want, fn.__name__
        torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)


def test_convolutions_and_linear_match_the_analytic_count():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 8, 12, 10, generator=g)
    conv = torch.nn.Conv2d(8, 16, 3, padding=1)
    # 2 · B · Cout · Hout · Wout · Cin · kh · kw (bias not counted, as torch's formula)
    _, n = count_flops(conv, x)
    assert n == 2 * 2 * 16 * 12 * 10 * 8 * 3 * 3
    strided = torch.nn.Conv2d(8, 4, 3, stride=2, padding=1)
    _, n = count_flops(strided, x)
    assert n == 2 * 2 * 4 * 6 * 5 * 8 * 3 * 3
    lin = torch.nn.Linear(10, 6)
    _, n = count_flops(lin, x)
    assert n == 2 * (2 * 8 * 12) * 10 * 6


def test_counting_block_sums_a_whole_run_and_names_uncounted_attention():
    q, k, v = qkv()
    lib = torch.library.Library("freespeed_flops_test", "DEF")
    lib.define("my_attention(Tensor q, Tensor k, Tensor v) -> Tensor")
    lib.impl("my_attention", lambda q, k, v: F.scaled_dot_product_attention(q, k, v).clone(),
             "CompositeExplicitAutograd")
    with counting() as c:
        F.scaled_dot_product_attention(q, k, v)
        torch.ops.freespeed_flops_test.my_attention(q, k, v)
        torch.randn(4, 5) @ torch.randn(5, 6)
    # an opaque kernel without a formula counts 0 (its body runs below the counter): it is named instead
    assert c.total == attention_flops(B, H, L, S, D, DV) + 2 * 4 * 5 * 6
    assert c.uncounted == ["freespeed_flops_test.my_attention"]
