"""AT-EDM on DiTs (issue 16): image tokens ranked at the range's first block (G-WPR over sampled query rows), the
rest of the range on kept image tokens + every text token, every pruned token scattered back at its end."""
from __future__ import annotations

import pytest
import torch

from dit_helpers import FAMILIES, OVERRIDE_FAMILIES, KernelSpy, run, tiny
from tiny import sample

from comfyui_freespeed.core.pruning import gather_tokens, kept_count, sampled_gwpr_scores, select_kept, strided_rows
from comfyui_freespeed.core.tokens import Grid, TokenLayout
from comfyui_freespeed.core.batch import BatchLayout
from comfyui_freespeed.nodes.atedm import ATEDMConfig, apply_atedm
from comfyui_freespeed.nodes.atedm.dit import ROW_STRIDE
from comfyui_freespeed.nodes.hooks import find
from comfyui_freespeed.nodes.sites import add_block_replace, block_sites, detect_model

STEPS = 4
WHOLE = ATEDMConfig(ratio=0.5, dsap_end=0.0, dit_start=0.0, dit_end=1.0, dit_warmup=0.0)   # rank at block 0, scatter at the last


def tech(m):
    return find(m, "freespeed.atedm")


@pytest.mark.parametrize("family", FAMILIES)
def test_ratio_zero_is_exact(family):
    base = run(tiny(family).model, family, STEPS)
    assert torch.equal(run(apply_atedm(tiny(family).model, ATEDMConfig(ratio=0.0)), family, STEPS), base)


@pytest.mark.parametrize("family", OVERRIDE_FAMILIES)
def test_pruned_blocks_see_every_text_token_and_the_kept_image_tokens(family):
    inner = KernelSpy()
    m = apply_atedm(inner.install(tiny(family).model), WHOLE)
    outer = KernelSpy()
    m = outer.install(m)
    rankings = []
    tech(m).ranking_probe = rankings.append
    assert torch.isfinite(run(m, family, STEPS)).all()
    lay = inner.calls[0]["layout"]
    keep = kept_count(lay.main_grid.n, 0.5)
    selfs = [c for c in inner.calls if c["n_q"] == c["n_k"]]
    full = lay.joint if lay.txt else lay.img
    pruned = lay.txt + keep
    assert {c["n_q"] for c in selfs} == {full, pruned}
    per_call = len(selfs) // STEPS
    assert sum(c["n_q"] == full for c in selfs) == STEPS         # only the ranking block runs in full
    assert sum(c["n_q"] == pruned for c in selfs) == STEPS * (per_call - 1)
    # the kept set is the top of the same ranking recomputed from the ranking block's q/k
    rank_call = [c for c in outer.calls if c["n_q"] == c["n_k"] == full][-1]
    q, k = rank_call["q"], rank_call["k"]
    if not rank_call["skip"]:
        b, n, c = q.shape
        q = q.view(b, n, rank_call["heads"], -1).transpose(1, 2)
        k = k.view(b, n, rank_call["heads"], -1).transpose(1, 2)
    g, off = lay.main_grid, lay.image_offset(bool(lay.txt))
    qm, km = q[:, :, off:off + g.n], k[:, :, off:off + g.n]
    rows = strided_rows(g.frames, g.h, g.w, ROW_STRIDE)
    ref = select_kept(sampled_gwpr_scores(qm[:, :, rows], km, rows, 5), keep)
    assert torch.equal(rankings[-1]["kept_main"], ref)
    s = tech(m).last_stats
    assert s["stack_calls_pruned"] == STEPS and s["flops_saved_pct"] > 0 and s["kept_tokens"] == {
        "image": f"{g.n}->{keep}"}


def recorder(got: dict, name: str, txt: int, single: bool):
    """A ``dit`` block replace that records the block's image-stream output under ``got[name]`` (single blocks:
    the image part of the concatenated stream)."""
    def rep(args, extra):
        out = extra["original_block"](args)
        got.setdefault(name, []).append(out["img"][:, txt:] if single else out["img"])
        return out
    return rep


def test_scattered_back_tokens_take_their_source_tokens_residual():
    t = tiny("flux")
    sites = block_sites(t.model, detect_model(t.model))
    txt = 77
    got = {}

    m = t.model.clone()
    add_block_replace(m, sites[0], recorder(got, "rank_out", txt, False))          # inner: the full ranking-block output
    add_block_replace(m, sites[-1], recorder(got, "last_kept", txt, True))         # inner: the pruned last-block output
    m = apply_atedm(m, WHOLE)
    m = m.clone()
    add_block_replace(m, sites[-1], recorder(got, "last_full", txt, True))         # outer: what AT-EDM scattered back
    rankings = []
    tech(m).ranking_probe = rankings.append
    assert torch.isfinite(run(m, "flux", 2, cfg=1.0)).all()
    r = rankings[-1]
    x, y, full = got["rank_out"][-1], got["last_kept"][-1], got["last_full"][-1]
    kept, source = r["kept"], r["source"]
    assert torch.equal(gather_tokens(full, kept), y)
    expect = x + gather_tokens(y - gather_tokens(x, kept), source)
    assert torch.allclose(full, expect, atol=1e-6)


def test_reference_latent_tokens_are_never_pruned_and_wan_frames():
    t = tiny("flux")
    pos = [[t.cond(1)[0][0], {**t.cond(1)[0][1], "reference_latents": [torch.randn(1, 16, 8, 8)]}]]
    inner = KernelSpy()
    m = apply_atedm(inner.install(t.model), WHOLE)
    assert torch.isfinite(sample(m, t, 16, 16, steps=2, positive=pos, cfg=1.0)).all()
    assert {c["n_q"] for c in inner.calls} == {77 + 64 + 16, 77 + 32 + 16}
    inner = KernelSpy()
    w = tiny("wan")
    m = apply_atedm(inner.install(w.model), WHOLE)
    assert torch.isfinite(sample(m, w, 10, 12, steps=2, frames=2)).all()         # 2 x 5 x 6 tokens
    assert {c["n_q"] for c in inner.calls} == {60, 30}


def test_pixart_blocks_run_on_the_kept_tokens():
    t = tiny("pixart")
    dm = t.model.model.diffusion_model
    sizes = []
    hooks = [b.register_forward_pre_hook(lambda mod, a, i=i: sizes.append((i, a[0].shape[1])))
             for i, b in enumerate(dm.blocks)]
    try:
        m = apply_atedm(t.model, WHOLE)
        assert torch.isfinite(run(m, "pixart", 2)).all()
    finally:
        for h in hooks:
            h.remove()
    assert set(sizes) == {(0, 576), (1, 288), (2, 288), (3, 288)}


def test_dsap_spares_the_range_edges_early():
    inner = KernelSpy()
    cfg = ATEDMConfig(ratio=0.5, dsap_end=0.5, dit_start=0.0, dit_end=1.0, dit_warmup=0.0)
    m = apply_atedm(inner.install(tiny("flux").model), cfg)
    run(m, "flux", STEPS, cfg=1.0)
    per = [inner.calls[i * 5:(i + 1) * 5] for i in range(STEPS)]
    assert [c["n_q"] for c in per[0]] == [141, 141, 77 + 32, 77 + 32, 141]       # early: rank 1, scatter at 3
    assert [c["n_q"] for c in per[-1]] == [141] + [77 + 32] * 4


def test_previous_recovery_gives_pruned_tokens_their_own_residual_of_the_previous_step():
    t = tiny("flux")
    sites = block_sites(t.model, detect_model(t.model))
    txt, got = 77, {}

    m = t.model.clone()
    add_block_replace(m, sites[0], recorder(got, "rank_out", txt, False))          # inner: the full ranking-block output
    m = apply_atedm(m, ATEDMConfig(ratio=0.5, dsap_end=0.0, dit_start=0.0, dit_end=1.0, dit_warmup=0.0,
                                   recovery="previous"))
    m = m.clone()
    add_block_replace(m, sites[-1], recorder(got, "last_full", txt, True))         # outer: what AT-EDM scattered back
    rankings = []
    tech(m).ranking_probe = rankings.append
    assert torch.isfinite(run(m, "flux", 3, cfg=1.0)).all()
    x, full = got["rank_out"], got["last_full"]
    assert len(x) == len(full) == len(rankings) == 3
    for c in (1, 2):
        pruned = torch.ones(full[c].shape[1], dtype=torch.bool)
        pruned[rankings[c]["kept"][0]] = False
        own = full[c - 1] - x[c - 1]                                   # the range's residual at the previous call
        assert pruned.sum() == 32
        assert torch.allclose(full[c][:, pruned], x[c][:, pruned] + own[:, pruned], atol=1e-5)


def test_range_ends_before_a_controlnet_residual():
    from comfyui_freespeed.core.schedule import RunSchedule
    from comfyui_freespeed.nodes.hooks import RunContext
    t = tech(apply_atedm(tiny("flux").model, WHOLE))
    r = t.new_run(RunContext(RunSchedule(torch.tensor([1.0, 0.0]), None)))
    lay = TokenLayout("flux", 77, (Grid(1, 8, 8),), 0, True, frozenset({("double", 1)}))
    pc = t._plan(r, 0.9, lay, BatchLayout((0,), (), 1), {})
    assert pc.rank == 0 and pc.last == 1                # scattered back at double block 1, before its residual
    lay0 = TokenLayout("flux", 77, (Grid(1, 8, 8),), 0, True, frozenset({("double", 0)}))
    assert t._plan(r, 0.9, lay0, BatchLayout((0,), (), 1), {}) is None and r.stats.stack_calls_left_control == 1
