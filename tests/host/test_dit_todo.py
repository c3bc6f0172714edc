"""ToDo on DiTs (issue 16) against tiny real models of every family: only image K/V are downsampled (per frame
on Wan, reference latents as their own grids), text K/V and every query are kept, masks follow, off is exact."""
from __future__ import annotations

import pytest
import torch

from dit_helpers import FAMILIES, OVERRIDE_FAMILIES, KernelSpy, run, tiny
from tiny import sample, tiny_wan22

from comfyui_freespeed.core.tokens import Grid, downsampled_size, kv_index
from comfyui_freespeed.nodes.dit import parse_attention
from comfyui_freespeed.nodes.hooks import find
from comfyui_freespeed.nodes.todo import ToDoConfig, apply_todo

STEPS = 3


def stats(m):
    return find(m, "freespeed.todo").last_stats


def expected_kv(layout, joint: bool, factor: float) -> int:
    n = layout.txt if joint else 0
    for g in layout.groups:
        nh, nw = downsampled_size(g.h, g.w, factor)
        n += g.frames * nh * nw
    return n


@pytest.mark.parametrize("family", FAMILIES)
def test_off_settings_reproduce_the_unpatched_output(family):
    base = run(tiny(family).model, family, STEPS)
    for cfg in (ToDoConfig(dit_blocks_from=0.0, factors=(1.0, 1.0)), ToDoConfig(start_percent=0.9, end_percent=0.1)):
        assert torch.equal(run(apply_todo(tiny(family).model, cfg), family, STEPS), base)


@pytest.mark.parametrize("family", OVERRIDE_FAMILIES)
def test_only_image_kv_shrink_by_factor_squared_and_text_rows_are_kept(family):
    t = tiny(family)
    inner = KernelSpy()
    m = apply_todo(inner.install(t.model), ToDoConfig(dit_blocks_from=0.0, factors=(2.0, 1.0)))
    outer = KernelSpy()
    m = outer.install(m)                          # sees the calls before ToDo changes them
    out = run(m, family, STEPS)
    assert torch.isfinite(out).all()
    selfs = [(o, i) for o, i in zip(outer.calls, inner.calls) if o["role"] in ("self", "joint")]
    assert selfs and len(outer.calls) == len(inner.calls)
    for o, i in selfs:
        lay = o["layout"]
        joint = o["role"] == "joint"
        assert i["n_q"] == o["n_q"]                                    # every query kept
        assert i["n_k"] == expected_kv(lay, joint, 2.0)
        d = 2 if o["skip"] else 1
        idx = kv_index(lay.segments(joint), 2.0)
        assert torch.equal(i["k"], o["k"].index_select(d, idx))      # nearest = verbatim post-RoPE rows
        if joint:
            assert torch.equal(i["k"].narrow(d, 0, lay.txt), o["k"].narrow(d, 0, lay.txt))     # all text kept
    for o, i in zip(outer.calls, inner.calls):
        if o["role"] == "cross":                                       # Wan's cross-attention: untouched
            assert i["n_k"] == o["n_k"] and torch.equal(i["k"], o["k"])
    s = stats(m)
    assert s["downsampled_calls"] == len(selfs) and s["kv_tokens_kept_pct"] == 25.0
    if family != "wan":
        assert s["text_kv_tokens"] == selfs[0][0]["layout"].txt
    else:
        assert s["untouched_non_grid"] == len(outer.calls) - len(selfs)


@pytest.mark.parametrize("frames", [1, 2, 5])
def test_wan_downsamples_each_frame(frames):
    t = tiny("wan")
    inner = KernelSpy()
    m = apply_todo(inner.install(t.model), ToDoConfig(dit_blocks_from=0.0, factors=(3.0, 1.0)))
    sample(m, t, 14, 10, steps=2, frames=frames)
    nh, nw = downsampled_size(7, 5, 3.0)
    assert {c["n_k"] for c in inner.calls if c["n_k"] != 77} == {frames * nh * nw}
    assert {c["layout"].main_grid for c in inner.calls} == {Grid(frames, 7, 5)}


def test_odd_sizes_batch_three_and_factor_three():
    t = tiny("flux")
    inner = KernelSpy()
    m = apply_todo(inner.install(t.model), ToDoConfig(dit_blocks_from=0.0, factors=(3.0, 1.0)))
    out = sample(m, t, 15, 13, steps=2, batch=3)                 # 8x7 tokens (padding), factor 3 -> 3x3
    assert out.shape == (3, 16, 15, 13) and torch.isfinite(out).all()
    assert {c["n_k"] for c in inner.calls} == {77 + 9} and {c["batch"] for c in inner.calls} == {6}


def test_flux_reference_latent_is_its_own_grid():
    t = tiny("flux")
    ref = torch.randn(1, 16, 8, 12)
    pos = [[t.cond(1)[0][0], {**t.cond(1)[0][1], "reference_latents": [ref]}]]
    inner = KernelSpy()
    m = apply_todo(inner.install(t.model), ToDoConfig(dit_blocks_from=0.0, factors=(2.0, 1.0)))
    out = sample(m, t, 16, 16, steps=2, positive=pos)
    assert torch.isfinite(out).all()
    pos_calls = [c for c in inner.calls if len(c["layout"].groups) == 2]
    assert pos_calls and all(c["layout"].groups[1] == Grid(1, 4, 6) for c in pos_calls)
    assert {c["n_k"] for c in pos_calls} == {77 + 16 + 6}         # 8x8 -> 4x4, 4x6 -> 2x3


def test_flux_attention_mask_keeps_the_matching_key_columns():
    t = tiny("flux")
    L = 77 + 64
    mask = torch.zeros(1, L, L)
    mask[:, :, 70:77] = -10.0                  # some text keys masked
    pos = [[t.cond(1)[0][0], {**t.cond(1)[0][1], "attention_mask": mask, "attention_mask_img_shape": (8, 8)}]]
    inner = KernelSpy()
    seen = []
    orig = inner._override

    def spy(call_next, func, *args, **kwargs):
        a = parse_attention(args, kwargs)
        seen.append((a.mask.shape[-1] if torch.is_tensor(a.mask) else None, a.n_k))
        return orig(call_next, func, *args, **kwargs)
    inner._override = spy
    m = apply_todo(inner.install(t.model), ToDoConfig(dit_blocks_from=0.0, factors=(2.0, 1.0)))
    out = sample(m, t, 16, 16, steps=2, positive=pos, cfg=1.0)
    assert torch.isfinite(out).all()
    assert seen and all(mk == nk for mk, nk in seen if mk is not None) and any(mk is not None for mk, _ in seen)


def test_avg_pool_keys_are_the_mean_of_each_2x2_cell_and_text_keys_are_verbatim():
    t = tiny("qwen")
    inner = KernelSpy()
    m = apply_todo(inner.install(t.model), ToDoConfig(dit_blocks_from=0.0, factors=(2.0, 1.0), method="avg-pool"))
    outer = KernelSpy()
    run(outer.install(m), "qwen", STEPS)
    assert outer.calls and len(outer.calls) == len(inner.calls)
    for o, i in zip(outer.calls, inner.calls):
        lay, g = o["layout"], o["layout"].main_grid
        txt, k = lay.txt, o["k"]                                        # [B, L, H*D]
        grid = k[:, txt:].reshape(k.shape[0], g.h, g.w, -1).permute(0, 3, 1, 2)
        ref = torch.nn.functional.avg_pool2d(grid, 2).flatten(2).transpose(1, 2)
        assert i["n_k"] == txt + (g.h // 2) * (g.w // 2) and i["n_q"] == o["n_q"]
        assert torch.equal(i["k"][:, :txt], k[:, :txt])
        assert torch.allclose(i["k"][:, txt:], ref, atol=1e-6)


def test_pixart_uses_comfys_strided_kv_compression_where_it_can():
    t = tiny("pixart")
    m = apply_todo(t.model, ToDoConfig(dit_blocks_from=0.0, factors=(2.0, 1.0)))
    assert run(m, "pixart", 2).isfinite().all()
    s = stats(m)
    assert s["kv_tokens"] == {"image": "576->144"} and s["downsampled_calls"] == 2 * 4
    odd = apply_todo(t.model, ToDoConfig(dit_blocks_from=0.0, factors=(2.0, 1.0)))
    run(odd, "pixart", 2, h=50, w=48)              # 25 x 24 tokens: 2 does not divide 25 -> left alone, counted
    assert stats(odd)["downsampled_calls"] == 0 and stats(odd)["untouched_non_grid"] == 2 * 4
    avg = apply_todo(t.model, ToDoConfig(dit_blocks_from=0.0, factors=(2.0, 1.0), method="avg-pool"))
    run(avg, "pixart", 2)
    assert stats(avg)["downsampled_calls"] == 0


def test_resolution_bands_pick_the_papers_factor():
    inner = KernelSpy()
    m = apply_todo(inner.install(tiny("sd3").model), ToDoConfig(dit_blocks_from=0.0, factors=(1.0, 1.0), bands=True))
    run(m, "sd3", 2)                                # 128 px: the first band, factor 2
    assert stats(m)["factors"] == [2.0] and {c["n_k"] for c in inner.calls} == {77 + 16}


def test_resolution_bands_use_the_models_own_pixels_per_token():
    """Wan 2.1: VAE 8 x patch 2 = 16 px per token; Wan 2.2 5B: VAE 16 x patch 2 = 32.  The same 40x42 token grid is
    ~650 px (factor 2) on Wan 2.1 and ~1310 px (factor 3) on Wan 2.2."""
    for t, px, factor in ((tiny("wan"), 8, 2.0), (tiny_wan22(), 16, 3.0)):
        inner = KernelSpy()
        m = apply_todo(inner.install(t.model), ToDoConfig(dit_blocks_from=0.0, factors=(1.0, 1.0), bands=True))
        sample(m, t, 80, 84, steps=1, frames=1, positive=t.cond(1, tokens=8), negative=t.cond(2, tokens=8))
        assert stats(m)["factors"] == [factor], px
        nh, nw = downsampled_size(40, 42, factor)
        assert {c["n_k"] for c in inner.calls if c["role"] == "self"} == {nh * nw}


def test_dit_default_downsamples_the_back_half_of_the_blocks_only():
    """The DiT default follows PixArt-Σ's trained 2x2 K/V compression (blocks 14-27 of 28): the back half."""
    assert ToDoConfig().dit_blocks_from == 0.5 and ToDoConfig().factors[0] == 2.0
    t = tiny("flux")                                  # 2 double + 3 single blocks: positions 3 and 4 (single 1, 2)
    inner = KernelSpy()
    m = apply_todo(inner.install(t.model), ToDoConfig())
    run(m, "flux", 2)
    shrunk = {(c["block"].kind, c["block"].index) for c in inner.calls if c["n_k"] < c["n_q"]}
    full = {(c["block"].kind, c["block"].index) for c in inner.calls if c["n_k"] == c["n_q"]}
    assert shrunk == {("single", 1), ("single", 2)} and full == {("double", 0), ("double", 1), ("single", 0)}
    s = stats(m)
    assert s["downsampled_calls"] == 2 * 2 and s["full_attention_calls"] == 2 * 3
    pix = apply_todo(tiny("pixart").model, ToDoConfig())   # 4 blocks: blocks 2 and 3
    run(pix, "pixart", 2)
    assert stats(pix)["downsampled_calls"] == 2 * 2
