"""core.cache, core.batch, core.tokens and core.attention against plain reference computations."""
import math

import pytest
import torch
import torch.nn.functional as F

from comfyui_freespeed.core import attention as A
from comfyui_freespeed.core.attention import (attention_from_map, attention_map, explicit_attention, map_times_v)
from comfyui_freespeed.core.batch import BatchLayout
from comfyui_freespeed.core.cache import BranchAccumulator, CacheStore
from comfyui_freespeed.core.gating import branch_mean
from comfyui_freespeed.core.tokens import downsample_grid, downsampled_size, factor_for_level, level_grids


# ---------------------------------------------------------------------------------------------- cache
def test_cache_budget_refuses_instead_of_evicting():
    store = CacheStore(budget_bytes=4 * 100)
    assert store.put("a", torch.zeros(60))          # 240 bytes
    assert not store.put("b", torch.zeros(60))      # would be 480 > 400
    assert store.stats.rejected == 1 and "a" in store and "b" not in store
    assert store.put("a", torch.zeros(100))         # replacing a key counts only the new size
    assert store.stats.bytes == 400 and store.stats.peak_bytes == 400


def test_cache_hits_misses_and_clear():
    store = CacheStore()
    t = torch.arange(6.0)
    store.put("k", t)
    assert torch.equal(store.get("k"), t)
    assert store.get("missing") is None
    assert store.stats.hits == 1 and store.stats.misses == 1
    assert torch.equal(store.pop("k"), t) and store.stats.bytes == 0
    store.put("x", t)
    store.clear()
    assert len(store) == 0 and store.stats.bytes == 0 and store.stats.peak_bytes == t.numel() * 4


def test_cache_offload_keeps_a_copy_not_a_view():
    store = CacheStore(offload=True)
    t = torch.ones(4)
    store.put("k", t)
    got = store.get("k", device=torch.device("cpu"))
    assert torch.equal(got, t) and got.device.type == "cpu"
    assert store.stats.as_dict()["puts"] == 1


def test_branch_accumulator_means_branches_of_the_latest_round():
    acc = BranchAccumulator(CacheStore())
    c1, c2, u = torch.full((1, 3), 1.0), torch.full((1, 3), 3.0), torch.full((1, 3), 10.0)
    acc.add("site", 1, [("uncond", u * 7)])             # an older round, replaced below
    acc.add("site", 2, [("cond", c1)])                  # cond and uncond of round 2 arrive in two calls,
    acc.add("site", 2, [("cond", c2), ("uncond", u)])   # the cond branch in two chunks
    assert acc.latest_round == 2 and acc.has("site") and not acc.has("other")
    got = acc.mean("site", reduce=branch_mean)
    assert torch.equal(got, torch.full((1, 3), ((1 + 3) / 2 + 10) / 2))
    assert torch.equal(acc.mean("site", reduce=branch_mean), got)          # reduced once, then served
    assert acc.mean("other", reduce=branch_mean) is None


def test_branch_accumulator_drops_a_branch_the_budget_refuses():
    acc = BranchAccumulator(CacheStore(budget_bytes=4 * 3))
    acc.add("a", 1, [("cond", torch.ones(1, 3)), ("uncond", torch.ones(1, 3))])
    assert acc.store.stats.rejected == 1
    assert torch.equal(acc.mean("a", reduce=branch_mean), torch.ones(1, 3))   # only the branch that fit


# -------------------------------------------------------------------------------------------- batch
def test_batch_layout_reads_chunks_in_comfyuis_order():
    lay = BatchLayout.from_options({"cond_or_uncond": [1, 0], "uuids": ["u", "c"]}, 6)
    assert lay.per == 3 and lay.size == 6 and lay.keyed
    chunks = lay.chunks()
    assert [(c.branch, c.uuid, c.rows) for c in chunks] == [(1, "u", slice(0, 3)), (0, "c", slice(3, 6))]
    assert lay.roles({0: "cond", 1: "uncond"}) == ("uncond", "cond")


def test_batch_layout_that_does_not_divide_is_one_unkeyed_chunk():
    lay = BatchLayout.from_options({"cond_or_uncond": [1, 0], "uuids": ["u", "c"]}, 5)
    assert lay.branches == (0,) and lay.per == 5 and not lay.keyed
    assert not BatchLayout.from_options({"cond_or_uncond": [0, 1], "uuids": ["a", "a"]}, 4).keyed
    assert BatchLayout.from_options(None, 2).chunks()[0].rows == slice(0, 2)


# --------------------------------------------------------------------------------------------- tokens
def test_level_grids_use_ceil_halving_like_the_unet():
    # 520x776 px -> 65x97 latent -> 33x49 -> 17x25 (stride-2 conv with padding 1 = ceil)
    assert level_grids(65, 97, 3) == [(65, 97), (33, 49), (17, 25)]
    x = torch.zeros(1, 4, 65, 97)
    conv = torch.nn.Conv2d(4, 4, 3, stride=2, padding=1)
    y = conv(conv(x))
    assert tuple(y.shape[-2:]) == (17, 25)


@pytest.mark.parametrize("method", ["nearest", "avg-pool", "bilinear"])
@pytest.mark.parametrize("h,w,f", [(16, 16, 2), (65, 97, 2), (33, 49, 3), (8, 12, 2.5)])
def test_downsample_shapes_and_odd_sizes(method, h, w, f):
    x = torch.randn(3, h * w, 5)
    y = downsample_grid(x, h, w, f, method)
    nh, nw = downsampled_size(h, w, f)
    assert (nh, nw) == (math.ceil(h / f), math.ceil(w / f))
    assert y.shape == (3, nh * nw, 5)
    assert torch.isfinite(y).all()


def test_downsample_matches_plain_reference():
    h, w = 6, 8
    x = torch.randn(2, h * w, 3)
    grid = x.transpose(1, 2).reshape(2, 3, h, w)
    ref_avg = F.avg_pool2d(grid, 2).reshape(2, 3, -1).transpose(1, 2)
    assert torch.allclose(downsample_grid(x, h, w, 2, "avg-pool"), ref_avg)
    # nearest with factor 2 picks the top-left token of every 2x2 cell
    ref_nearest = grid[:, :, ::2, ::2].reshape(2, 3, -1).transpose(1, 2)
    assert torch.equal(downsample_grid(x, h, w, 2, "nearest"), ref_nearest)
    # factor 1 returns the very same tensor
    assert downsample_grid(x, h, w, 1.0, "nearest") is x


def test_downsample_rejects_bad_input():
    with pytest.raises(ValueError, match="does not match grid"):
        downsample_grid(torch.zeros(1, 10, 2), 3, 3, 2)
    with pytest.raises(ValueError, match="unknown downsampling method"):
        downsample_grid(torch.zeros(1, 9, 2), 3, 3, 2, "lanczos")


def test_level_factors():
    assert factor_for_level(1, (2.0, 1.5)) == 2.0
    assert factor_for_level(2, (2.0, 1.5)) == 1.5
    assert factor_for_level(3, (2.0, 1.5)) == 1.0


# ------------------------------------------------------------------------------------------ attention
def _ref_attention(q, k, v, heads):
    b, n, hd = q.shape
    d = hd // heads
    qh, kh, vh = (t.reshape(b, -1, heads, d).permute(0, 2, 1, 3) for t in (q, k, v))
    return F.scaled_dot_product_attention(qh, kh, vh).permute(0, 2, 1, 3).reshape(b, n, hd)


def test_explicit_attention_equals_sdpa_and_map_is_stochastic():
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 10, 16), torch.randn(2, 7, 16), torch.randn(2, 7, 16)
    out, attn = explicit_attention(q, k, v, 4, torch.float32)
    assert torch.allclose(out, _ref_attention(q, k, v, 4), atol=1e-5)
    assert attn.shape == (2, 4, 10, 7)
    assert torch.allclose(attn.sum(-1), torch.ones(2, 4, 10), atol=1e-6)
    assert torch.allclose(attention_from_map(attention_map(q, k, 4), v, 4), out, atol=1e-6)


def test_explicit_attention_in_query_chunks_matches_whole(monkeypatch):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 64, 32, generator=g) * 3 for _ in range(3))
    out1, m1 = explicit_attention(q, k, v, 4, torch.float16)
    r1 = map_times_v(m1, v, 4)
    monkeypatch.setattr(A, "TEMP_ELEMENTS", 2 * 4 * 64 * 5)          # 5 query rows at a time
    assert A.query_chunk(2, 4, 64, 64) == 5
    out2, m2 = explicit_attention(q, k, v, 4, torch.float16)
    r2 = map_times_v(m2, v, 4)
    assert m2.dtype == torch.float16 and m2.shape == (2, 4, 64, 64)
    assert torch.allclose(out1, out2, atol=1e-5) and torch.allclose(m1.float(), m2.float(), atol=1e-3)
    assert torch.allclose(r1, r2, atol=1e-5) and torch.allclose(r1, out1, atol=1e-2)
