"""core.pruning (AT-EDM) against plain reference computations written out here."""
import math

import pytest
import torch

from comfyui_freespeed.core.attention import attention_with_mean_map
from comfyui_freespeed.core.pruning import (DSAP, LayerShape, gather_tokens, gwpr_scores,
                                            kept_count, layer_flops, ranking_flops, recover_tokens,
                                            recovery_source, select_kept, stage_edges)


def random_map(b, n, seed=0, sharp=3.0, heads=None):
    g = torch.Generator().manual_seed(seed)
    shape = (b, n, n) if heads is None else (b, heads, n, n)
    return (torch.randn(shape, generator=g) * sharp).softmax(-1)


def reference_gwpr(attn, iterations):
    """Plain power iteration, one sample and one token at a time: s_j <- sum_i A[i, j] s_i."""
    if attn.ndim == 4:
        attn = attn.mean(dim=1)
    out = []
    for a in attn.tolist():
        n = len(a)
        s = [1.0 / n] * n
        for _ in range(iterations):
            s = [sum(a[i][j] * s[i] for i in range(n)) for j in range(n)]
        out.append(s)
    return torch.tensor(out)


@pytest.mark.parametrize("iterations", [1, 3, 5])
def test_gwpr_matches_a_plain_power_iteration_and_stays_a_distribution(iterations):
    a = random_map(2, 12, seed=iterations, heads=3)
    got = gwpr_scores(a, iterations)
    ref = reference_gwpr(a, iterations)
    assert got.shape == (2, 12)
    assert torch.allclose(got, ref, atol=1e-6)
    assert torch.allclose(got.sum(-1), torch.ones(2), atol=1e-5)


def test_gwpr_ranks_the_token_everyone_attends_to_first_and_follows_indirect_attention():
    n = 6
    a = torch.full((1, n, n), 0.02)
    a[0, :, 2] = 0.9                       # everybody attends to token 2 ...
    a[0, 2, :] = 0.02
    a[0, 2, 4] = 0.9                       # ... and token 2 attends to token 4
    a = a / a.sum(-1, keepdim=True)
    s1 = gwpr_scores(a, 1)[0]
    assert int(s1.argmax()) == 2           # one step: the column sum
    s5 = gwpr_scores(a, 5)[0]
    assert s5[4] > s5[0] and s5[4] > s5[1]  # importance flows on to what token 2 attends to


def test_gwpr_refuses_non_square_maps():
    with pytest.raises(ValueError):
        gwpr_scores(torch.rand(1, 8, 4).softmax(-1))


def test_kept_set_is_the_top_of_the_reference_scores_in_token_order():
    a = random_map(3, 40, seed=7, heads=2)
    keep = kept_count(40, 0.6)
    assert keep == 16
    kept = select_kept(gwpr_scores(a, 5), keep)
    ref = reference_gwpr(a, 5)
    for bi in range(3):
        top = set(torch.topk(ref[bi], keep).indices.tolist())
        assert set(kept[bi].tolist()) == top
        assert kept[bi].tolist() == sorted(kept[bi].tolist())
    assert not torch.equal(kept[0], kept[1])      # per sample: different samples keep different tokens


def test_kept_count_edges():
    assert kept_count(100, 0.0) == 100
    assert kept_count(100, 0.5) == 50
    assert kept_count(3, 0.95) == 1
    assert kept_count(65 * 97, 0.6) == round(65 * 97 * 0.4)


def test_recovery_copies_the_most_attended_kept_token_and_keeps_kept_ones():
    b, n, c = 2, 20, 5
    a = random_map(b, n, seed=3)
    kept = select_kept(gwpr_scores(a, 5), 8)
    src = recovery_source(a, kept)
    g = torch.Generator().manual_seed(0)
    x_kept = torch.randn(b, 8, c, generator=g)
    full = recover_tokens(x_kept, src)
    assert full.shape == (b, n, c)
    for bi in range(b):
        kl = kept[bi].tolist()
        for i in range(n):
            if i in kl:
                assert torch.equal(full[bi, i], x_kept[bi, kl.index(i)])
            else:
                best = max(kl, key=lambda j: a[bi, i, j].item())
                assert torch.equal(full[bi, i], x_kept[bi, kl.index(best)])
    x = torch.randn(b, n, c, generator=g)
    assert torch.equal(gather_tokens(x, kept)[1, 3], x[1, kept[1, 3]])


def test_attention_with_mean_map_matches_plain_attention_in_chunks():
    g = torch.Generator().manual_seed(1)
    b, n, heads, d = 2, 24, 4, 8
    q, k, v = (torch.randn(b, n, heads * d, generator=g) for _ in range(3))
    out, mean = attention_with_mean_map(q, k, v, heads, chunk_bytes=b * n * n * 4)   # one head per chunk
    qh, kh, vh = (t.view(b, n, heads, d).transpose(1, 2) for t in (q, k, v))
    attn = (qh @ kh.transpose(-1, -2) / math.sqrt(d)).softmax(-1)
    ref = (attn @ vh).transpose(1, 2).reshape(b, n, heads * d)
    assert torch.allclose(out, ref, atol=1e-5)
    assert torch.allclose(mean, attn.mean(1), atol=1e-6)
    out2, mean2 = attention_with_mean_map(q, k, v, heads)                            # all heads at once
    assert torch.allclose(out2, out, atol=1e-6) and torch.allclose(mean2, mean, atol=1e-7)


def test_dsap_prunes_less_early_and_spares_stage_edges():
    d = DSAP(0.6, early_end=0.3, early_scale=0.5)
    assert d.ratio_at(0.0, edge=True) == 0.0
    assert d.ratio_at(0.1, edge=False) == pytest.approx(0.3)
    assert d.ratio_at(0.3, edge=True) == 0.6 and d.ratio_at(0.9, edge=False) == 0.6
    assert DSAP(0.6, early_end=0.0).ratio_at(0.0, edge=True) == 0.6       # DSAP off
    assert DSAP(0.0).ratio_at(0.9, edge=False) == 0.0
    with pytest.raises(ValueError):
        DSAP(1.0)
    with pytest.raises(ValueError):
        DSAP(0.5, early_end=1.5)


def test_stage_edges_of_the_sdxl_layout():
    # SDXL: input 4,5 (level 2), 7,8 (level 3); middle (3); output 0,1,2 (3), 3,4,5 (2)
    levels = {("input", 4): 2, ("input", 5): 2, ("input", 7): 3, ("input", 8): 3, ("middle", 0): 3,
              ("output", 0): 3, ("output", 1): 3, ("output", 2): 3, ("output", 3): 2, ("output", 4): 2,
              ("output", 5): 2}
    assert stage_edges(levels) == {("input", 4), ("input", 7), ("output", 2), ("output", 5)}


def test_layer_flops_formula():
    s = LayerShape(dim=8, ctx_dim=4, ff_params=8 * 64 + 32 * 8, heads=2)
    f = layer_flops(s, n=10, n_ctx=3)
    assert f["attn1"] == 2 * 10 * 64 * 4 + 4 * 10 * 10 * 8
    assert f["attn2"] == 2 * 10 * 64 * 2 + 2 * 2 * 3 * 4 * 8 + 4 * 10 * 3 * 8
    assert f["ff"] == 2 * 10 * (8 * 64 + 32 * 8)
    half = layer_flops(s, n=5, n_ctx=3)
    assert half["ff"] * 2 == f["ff"] and half["attn1"] < f["attn1"] / 2     # attention is quadratic
    assert layer_flops(LayerShape(8, 0, 10), n=4)["attn2"] == 0
    assert ranking_flops(10, 2, 5, 4) == 2 * 100 + 5 * 2 * 100 + 40
