"""T-GATE on DiTs (issue 15): Wan's separate cross-attention is cached as the CFG mean and skipped after the gate;
joint-attention DiTs (Flux/Chroma, SD3, Qwen-Image) freeze their text stream; CFG is dropped after the gate."""
from __future__ import annotations

import logging

import pytest
import torch

from dit_helpers import KernelSpy, run, sigmas, step_of, tiny

from comfyui_freespeed.nodes.hooks import find
from comfyui_freespeed.nodes.tgate import TGateConfig, apply_tgate

STEPS, GATE = 6, 0.5          # normal scheduler: steps 0-2 before the gate, 3-5 after, cache step 2


def stats(m):
    return find(m, "freespeed.tgate").last_stats


@pytest.mark.parametrize("family", ["flux", "sd3", "wan", "qwen", "chroma"])
def test_gate_off_is_exact(family):
    base = run(tiny(family).model, family, STEPS)
    assert torch.equal(run(apply_tgate(tiny(family).model, TGateConfig(gate=1.0)), family, STEPS), base)


def test_wan_cross_attention_cached_as_the_cfg_mean_and_cfg_dropped():
    t = tiny("wan")
    spy = KernelSpy()
    m = apply_tgate(spy.install(t.model), TGateConfig(gate=GATE))
    outs = []
    hooks = [t.model.model.diffusion_model.blocks[i].cross_attn.register_forward_hook(
        lambda mod, inp, out, i=i: outs.append((i, out.clone()))) for i in range(len(t.model.model.diffusion_model.blocks))]
    try:
        res = run(m, "wan", STEPS, cfg=5.0)
    finally:
        for h in hooks:
            h.remove()
    assert torch.isfinite(res).all()
    sig = sigmas("wan", STEPS)
    after = [c for c in spy.calls if step_of(c["sigma"], sig) >= 3]
    assert after and all(c["n_q"] == c["n_k"] and c["batch"] == 1 for c in after)   # no cross-attn kernel, cond only
    n = len(t.model.model.diffusion_model.blocks)
    per_step = [outs[i * n:(i + 1) * n] for i in range(STEPS)]
    for (i, cache), (j, reused) in zip(per_step[2], per_step[4]):
        assert i == j and torch.allclose(reused[0], cache.mean(dim=0), atol=1e-5)
    s = stats(m)
    assert s["uncond_evaluations_skipped"] == 3 and s["attn2_calls_skipped"] == 3 * n and s["mode"] == "cross-attention"


@pytest.mark.parametrize("family", ["flux", "sd3", "qwen"])
def test_joint_dits_freeze_the_text_stream_as_the_cfg_mean(family):
    t = tiny(family)
    inner = KernelSpy()
    m = apply_tgate(inner.install(t.model), TGateConfig(gate=GATE))
    outer = KernelSpy()
    m = outer.install(m)
    res = run(m, family, STEPS, cfg=4.0)
    assert torch.isfinite(res).all()
    sig = sigmas(family, STEPS)
    lay = outer.calls[0]["layout"]
    txt, img = lay.txt, lay.img
    joint_before = [c for c in outer.calls if step_of(c["sigma"], sig) == 2 and c["n_q"] == txt + img]
    reuse = [c for c in inner.calls if step_of(c["sigma"], sig) >= 3]
    assert joint_before and reuse
    # after the gate: cond only, one text query row, the cached text keys in front of the image keys
    joint_after = [c for c in reuse if c["n_k"] == txt + img]
    assert joint_after and all(c["n_q"] == 1 + img and c["batch"] == 1 for c in joint_after)
    d = 2 if joint_before[0]["skip"] else 1
    for before, after in zip(joint_before, joint_after[:len(joint_before)]):
        assert torch.allclose(after["k"].narrow(d, 0, txt)[0], before["k"].narrow(d, 0, txt).mean(dim=0), atol=1e-5)
    s = stats(m)
    assert s["mode"] == "text stream" and s["text_tokens_frozen"] == txt and s["uncond_evaluations_skipped"] == 3


def test_flux_without_cfg_warns_that_only_the_text_stream_saves_work(caplog):
    m = apply_tgate(tiny("flux").model, TGateConfig(gate=GATE))
    with caplog.at_level(logging.WARNING, logger="FreeSpeed"):
        run(m, "flux", STEPS, cfg=1.0)
    assert "no CFG" in caplog.text and stats(m)["attn2_calls_skipped"] > 0


def test_keep_cfg_and_self_attention_v2_on_wan():
    m = apply_tgate(tiny("wan").model, TGateConfig(gate=0.7, keep_cfg=True, self_attention=True, sa_warmup=1,
                                                   sa_interval=2))
    assert torch.isfinite(run(m, "wan", 10, cfg=5.0)).all()        # self-attention reused at steps 3 and 5
    s = stats(m)
    assert s["uncond_evaluations_skipped"] == 0 and s["attn1_calls_skipped"] > 0


def test_caches_reset_between_runs_and_requeue_is_identical():
    m = apply_tgate(tiny("sd3").model, TGateConfig(gate=GATE))
    a = run(m, "sd3", STEPS)
    b = run(m, "sd3", STEPS)
    assert torch.equal(a, b) and find(m, "freespeed.tgate").run is None      # the run (and its cache) is dropped
