"""Attention reuse on DiTs (issue 15): each block's attention output, kept at the step before the reuse window,
is returned at the reuse steps without any kernel work (PixArt: without the projections either), per branch."""
from __future__ import annotations

import pytest
import torch

from dit_helpers import FAMILIES, OVERRIDE_FAMILIES, KernelSpy, run, sigmas, step_of, tiny

from comfyui_freespeed.nodes.hooks import find
from comfyui_freespeed.nodes.mapreuse import MapReuseConfig, apply_mapreuse
from comfyui_freespeed.nodes.sites import add_attention_override

STEPS = 6        # late schedule from 50%: steps 3, 4, 5 reuse what step 2 kept
LATE = MapReuseConfig(start=0.5, map_dtype="fp32", dit_refresh_every=0)


def stats(m):
    return find(m, "freespeed.mapreuse").last_stats


@pytest.mark.parametrize("family", FAMILIES)
def test_schedule_off_is_exact(family):
    base = run(tiny(family).model, family, STEPS)
    assert torch.equal(run(apply_mapreuse(tiny(family).model, MapReuseConfig(schedule="off")), family, STEPS), base)


@pytest.mark.parametrize("family", OVERRIDE_FAMILIES)
def test_reuse_steps_run_no_attention_kernel_and_return_each_branchs_kept_output(family):
    t = tiny(family)
    spy = KernelSpy()
    m = apply_mapreuse(spy.install(t.model), LATE)
    seen = []

    def outer(call_next, func, *args, **kwargs):
        out = call_next(func, *args, **kwargs)
        to = kwargs.get("transformer_options") or {}
        seen.append((float(to["sigmas"].max()), to.get("freespeed.block"), tuple(to.get("cond_or_uncond") or ()),
                     (args[0].shape, args[1].shape), out.clone()))
        return out
    m = m.clone()
    add_attention_override(m, outer)
    res = run(m, family, STEPS, cfg=4.0)
    assert torch.isfinite(res).all()
    sig = sigmas(family, STEPS)
    assert spy.calls and all(step_of(c["sigma"], sig) < 3 for c in spy.calls)        # nothing at 3, 4, 5
    kept = {(b, q): (branches, o) for s_, b, branches, q, o in seen if step_of(s_, sig) == 2}
    for s_, b, branches, q, o in seen:
        if step_of(s_, sig) >= 3:
            kb, ko = kept[(b, q)]
            for i, br in enumerate(branches):       # per branch, whatever the order of the batch
                j = kb.index(br)
                n = o.shape[0] // len(branches)
                assert torch.equal(o[i * n:(i + 1) * n], ko[j * n:(j + 1) * n])
    s = stats(m)
    assert s["reuse_steps"] == [3, 4, 5] and s["keep_steps"] == [2] and s["layers_reused"] == s["layers_patched"]


def test_pixart_reuse_skips_the_projections_too():
    t = tiny("pixart")
    dm = t.model.model.diffusion_model
    counts = {"qkv": 0, "q_linear": 0}
    hooks = [dm.blocks[i].attn.qkv.register_forward_hook(lambda *a: counts.__setitem__("qkv", counts["qkv"] + 1))
             for i in range(len(dm.blocks))]
    hooks += [dm.blocks[i].cross_attn.q_linear.register_forward_hook(
        lambda *a: counts.__setitem__("q_linear", counts["q_linear"] + 1)) for i in range(len(dm.blocks))]
    try:
        m = apply_mapreuse(t.model, LATE)
        assert torch.isfinite(run(m, "pixart", STEPS)).all()
    finally:
        for h in hooks:
            h.remove()
    assert counts == {"qkv": 3 * len(dm.blocks), "q_linear": 3 * len(dm.blocks)}    # steps 0-2 only
    s = stats(m)
    assert s["reuse_calls"] == 3 * 2 * len(dm.blocks) and s["layers_patched"] == 2 * len(dm.blocks)


def test_budget_leaves_blocks_alone_and_caches_reset_between_runs():
    tight = apply_mapreuse(tiny("flux").model, MapReuseConfig(start=0.5, cache_limit_mb=0.01, dit_refresh_every=0))
    a = run(tight, "flux", STEPS)
    s = stats(tight)
    n = len(tiny("flux").model.model.diffusion_model.double_blocks) + len(tiny("flux").model.model.diffusion_model.single_blocks)
    # one block's output (2 x 141 tokens x 64 fp16 = 36 kB) is over the 10 kB budget: every block left alone
    assert s["layers_left_alone_budget"] == n and s["reuse_calls_left_alone"] == 3 * n and torch.isfinite(a).all()
    m = apply_mapreuse(tiny("wan").model, LATE)
    assert torch.equal(run(m, "wan", STEPS), run(m, "wan", STEPS)) and find(m, "freespeed.mapreuse").run is None


def test_cross_attention_switch_and_refresh():
    spy = KernelSpy()
    m = apply_mapreuse(spy.install(tiny("wan").model), MapReuseConfig(start=0.5, dit_refresh_every=2, cross_attention=False))
    run(m, "wan", STEPS)
    sig = sigmas("wan", STEPS)
    late = [c for c in spy.calls if step_of(c["sigma"], sig) >= 3]
    assert late and all(c["role"] == "cross" or step_of(c["sigma"], sig) == 4 for c in late)   # 4 refreshes
    assert stats(m)["reuse_steps"] == [3, 5]


def test_search_node_runs_on_a_dit():
    from comfyui_freespeed.nodes.mapreuse.search import MapReuseSearchNode
    t = tiny("qwen")
    out = MapReuseSearchNode.execute(t.model, t.cond(1), t.cond(2), {"samples": t.latent(16, 16)}, 0, 4, 4.0, "euler",
                                     "normal", 1)
    assert out.result[1] and "schedule" in out.result[2]


def test_dit_default_reuses_only_the_step_just_before():
    """DiT default (DiTFastAttn's AST): from 50% on, every other step reuses the output of the step just before it;
    UNets keep the paper's schedule (reuse to the end)."""
    assert MapReuseConfig().refresh_every == 0 and MapReuseConfig().dit_refresh_every == 2
    m = apply_mapreuse(tiny("sd3").model, MapReuseConfig(map_dtype="fp32"))
    run(m, "sd3", 10)
    s = stats(m)
    assert s["refresh_every"] == 2 and s["keep_steps"] == [4, 6, 8] and s["reuse_steps"] == [5, 7, 9]
