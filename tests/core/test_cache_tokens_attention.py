"""core.cache, core.tokens and core.attention against plain reference computations."""
import math

import pytest
import torch
import torch.nn.functional as F

from comfyui_freespeed.core.attention import (attention_chunked, attention_from_map, attention_map,
                                              attention_with_map, map_entropy)
from comfyui_freespeed.core.cache import CacheStore, cache_key
from comfyui_freespeed.core.tokens import (downsample_grid, downsampled_size, factor_for_level, grid_for_tokens,
                                           grid_to_tokens, level_grids, tokens_to_grid)


# ---------------------------------------------------------------------------------------------- cache
def test_cache_key_separates_branches_blocks_and_layouts():
    a = cache_key("attn2", ("input", 1, 0), conds=[0], batch=(1, 0))
    assert a != cache_key("attn2", ("input", 1, 0), conds=[1], batch=(1, 0))
    assert a != cache_key("attn2", ("input", 2, 0), conds=[0], batch=(1, 0))
    assert a != cache_key("attn2", ("input", 1, 0), conds=[0], batch=(0, 1))
    assert a == cache_key("attn2", ("input", 1, 0), conds=(0,), batch=(1, 0))


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


# --------------------------------------------------------------------------------------------- tokens
def test_level_grids_use_ceil_halving_like_the_unet():
    # 520x776 px -> 65x97 latent -> 33x49 -> 17x25 (stride-2 conv with padding 1 = ceil)
    assert level_grids(65, 97, 3) == [(65, 97), (33, 49), (17, 25)]
    x = torch.zeros(1, 4, 65, 97)
    conv = torch.nn.Conv2d(4, 4, 3, stride=2, padding=1)
    y = conv(conv(x))
    assert tuple(y.shape[-2:]) == (17, 25)


def test_grid_for_tokens_finds_level_for_any_aspect_ratio():
    assert grid_for_tokens(65 * 97, 65, 97) == (1, 65, 97)
    assert grid_for_tokens(33 * 49, 65, 97) == (2, 33, 49)
    assert grid_for_tokens(77, 65, 97) is None           # a text sequence is not a grid


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


def test_grid_roundtrip_and_level_factors():
    x = torch.randn(2, 12, 4)
    assert torch.equal(grid_to_tokens(tokens_to_grid(x, 3, 4)), x)
    assert factor_for_level(1, (2.0, 1.5)) == 2.0
    assert factor_for_level(2, (2.0, 1.5)) == 1.5
    assert factor_for_level(3, (2.0, 1.5)) == 1.0


# ------------------------------------------------------------------------------------------ attention
def _ref_attention(q, k, v, heads):
    b, n, hd = q.shape
    d = hd // heads
    qh, kh, vh = (t.reshape(b, -1, heads, d).permute(0, 2, 1, 3) for t in (q, k, v))
    return F.scaled_dot_product_attention(qh, kh, vh).permute(0, 2, 1, 3).reshape(b, n, hd)


def test_attention_with_map_equals_sdpa_and_map_is_stochastic():
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 10, 16), torch.randn(2, 7, 16), torch.randn(2, 7, 16)
    out, attn = attention_with_map(q, k, v, heads=4)
    assert torch.allclose(out, _ref_attention(q, k, v, 4), atol=1e-5)
    assert attn.shape == (2, 4, 10, 7)
    assert torch.allclose(attn.sum(-1), torch.ones(2, 4, 10), atol=1e-6)


def test_attention_from_map_reproduces_output_and_map_dtype():
    torch.manual_seed(1)
    q, k, v = torch.randn(1, 9, 8), torch.randn(1, 9, 8), torch.randn(1, 9, 8)
    out, attn = attention_with_map(q, k, v, heads=2, map_dtype=torch.float16)
    assert attn.dtype == torch.float16
    again = attention_from_map(attn, v, heads=2)
    assert torch.allclose(again, out, atol=1e-2)
    exact = attention_from_map(attention_map(q, k, 2), v, 2)
    assert torch.allclose(exact, out, atol=1e-6)


def test_attention_chunked_matches_unchunked():
    torch.manual_seed(2)
    q, k, v = torch.randn(2, 33, 8), torch.randn(2, 20, 8), torch.randn(2, 20, 8)
    assert torch.allclose(attention_chunked(q, k, v, 2, query_chunk=8), _ref_attention(q, k, v, 2), atol=1e-5)


def test_map_entropy_bounds():
    uniform = torch.full((1, 1, 4, 8), 1 / 8)
    onehot = torch.zeros(1, 1, 4, 8)
    onehot[..., 0] = 1
    assert map_entropy(uniform) == pytest.approx(1.0, abs=1e-6)
    assert map_entropy(onehot) == pytest.approx(0.0, abs=1e-4)
