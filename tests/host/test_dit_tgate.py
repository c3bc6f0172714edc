"""T-GATE on DiTs (issue 15): Wan's separate cross-attention is cached as the CFG mean and skipped after the gate;
joint-attention DiTs (Flux/Chroma, SD3, Qwen-Image) freeze their text stream; CFG is dropped after the gate."""
from __future__ import annotations

import logging

import pytest
import torch

from dit_helpers import KernelSpy, run, sigmas, step_of, tiny
from tiny import patcher

import comfy.supported_models

from bench.models import SD15_UNET
from comfyui_freespeed.nodes.hooks import find
from comfyui_freespeed.nodes.sites import UnsupportedModelError, block_sites, detect_model
from comfyui_freespeed.nodes.tgate import TGateConfig, apply_tgate

STEPS, GATE = 6, 0.5          # normal scheduler: steps 0-2 before the gate, 3-5 after, cache step 2


def stats(m):
    return find(m, "freespeed.tgate").last_stats


@pytest.mark.parametrize("family", ["flux", "sd3", "wan", "qwen", "chroma"])
def test_gate_off_is_exact(family):
    base = run(tiny(family).model, family, STEPS)
    assert torch.equal(run(apply_tgate(tiny(family).model, TGateConfig(dit_gate=1.0)), family, STEPS), base)


def test_wan_cross_attention_cached_as_the_cfg_mean_and_cfg_dropped():
    t = tiny("wan")
    spy = KernelSpy()
    m = apply_tgate(spy.install(t.model), TGateConfig(dit_gate=GATE))
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
    n = len(t.model.model.diffusion_model.blocks)
    assert len(after) == 3 * n and all(c["n_k"] != 77 and c["batch"] == 1 for c in after)  # self-attention, cond only
    per_step = [outs[i * n:(i + 1) * n] for i in range(STEPS)]
    for (i, cache), (j, reused) in zip(per_step[2], per_step[4]):
        assert i == j and torch.allclose(reused[0], cache.mean(dim=0), atol=1e-5)
    s = stats(m)
    assert s["uncond_evaluations_skipped"] == 3 and s["attn2_calls_skipped"] == 3 * n and s["mode"] == "cross-attention"


def joint_text_k(calls, txt: int, branch=None):
    """The text part of the keys of every joint-attention call (of the rows of ``branch`` when given)."""
    out = []
    for c in calls:
        if c["role"] != "joint" or (branch is not None and branch not in c["branches"]):
            continue
        d = 2 if c["skip"] else 1
        k = c["k"]
        if branch is not None:
            n = k.shape[0] // len(c["branches"])
            i = c["branches"].index(branch)
            k = k[i * n:(i + 1) * n]
        out.append(k.narrow(d, 0, txt))
    return out


@pytest.mark.parametrize("family", ["flux", "sd3", "qwen"])
@pytest.mark.parametrize("neg_tokens", [77, 40])
def test_joint_dits_freeze_the_positive_text_stream_whether_batched_or_not(family, neg_tokens, monkeypatch):
    """After the gate only the positive branch runs: each block's text keys/values are the positive branch's at the
    cache step, the same whether ComfyUI batched cond and uncond (equal prompt lengths, memory allowing) or not."""
    t = tiny(family)
    pos, neg = t.cond(1), t.cond(2, tokens=neg_tokens)
    sig = sigmas(family, STEPS)
    outs = {}
    for batched in (True, False):
        if not batched:                       # no memory to batch: ComfyUI runs cond and uncond one at a time
            monkeypatch.setattr(t.model.model, "memory_required", lambda *a, **k: float("inf"))
        inner = KernelSpy()
        m = apply_tgate(inner.install(t.model), TGateConfig(dit_gate=GATE))
        outer = KernelSpy()
        m = outer.install(m)
        outs[batched] = run(m, family, STEPS, cfg=4.0, positive=pos, negative=neg)
        assert torch.isfinite(outs[batched]).all()
        lay = outer.calls[0]["layout"]
        txt = next(c["layout"].txt for c in outer.calls if 0 in c["branches"])
        cache_calls = [c for c in outer.calls if step_of(c["sigma"], sig) == 2]
        assert {c["batch"] for c in cache_calls} == ({2} if batched and neg_tokens == 77 else {1})
        positive = joint_text_k(cache_calls, txt, branch=0)
        after = [c for c in inner.calls if step_of(c["sigma"], sig) >= 3 and c["role"] == "joint"]
        assert after and all(c["batch"] == 1 and c["n_q"] == 1 + lay.img and c["n_k"] == txt + lay.img for c in after)
        frozen = joint_text_k(after, txt)
        assert len(frozen) == 3 * len(positive)
        for i, k in enumerate(frozen):      # every step after the gate: the positive branch's text at the cache step
            assert torch.allclose(k, positive[i % len(positive)], atol=1e-5)
        s = stats(m)
        assert s["mode"] == "text stream" and s["text_tokens_frozen"] == txt and s["uncond_evaluations_skipped"] == 3
        assert s["attn2_calls_skipped"] == 3 * len(positive)
        monkeypatch.undo()
    assert torch.allclose(outs[True], outs[False], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("family", ["flux", "sd3"])
def test_a_positive_prompt_without_a_cached_text_stream_is_computed_in_full_counted_and_warned(family, caplog):
    """A positive prompt that starts after the cache step (ConditioningSetTimestepRange) has no frozen text stream:
    its calls run in full with its own text (never another prompt's text, never an error), counted, one warning."""
    t = tiny(family)
    (a, da), (b, db) = t.cond(1)[0], t.cond(3, tokens=40)[0]
    pos = [[a, {**da, "start_percent": 0.0, "end_percent": 0.7}], [b, {**db, "start_percent": 0.7, "end_percent": 1.0}]]
    inner = KernelSpy()
    m = apply_tgate(inner.install(t.model), TGateConfig(dit_gate=GATE))
    with caplog.at_level(logging.WARNING, logger="FreeSpeed"):
        out = run(m, family, STEPS, cfg=4.0, positive=pos)
    assert torch.isfinite(out).all()
    sig = sigmas(family, STEPS)
    after = [c for c in inner.calls if step_of(c["sigma"], sig) >= 3 and c["role"] == "joint"]
    assert {c["layout"].txt for c in after} == {77, 40}
    for c in after:                          # the keys carry the text of the prompt this call runs, whole
        assert c["n_k"] == c["layout"].joint
        assert c["n_q"] == (1 + c["layout"].img if c["layout"].txt == 77 else c["layout"].joint)
    s = stats(m)
    n = len({(c["block"].kind, c["block"].index) for c in after})
    late_b = {c["sigma"] for c in after if c["layout"].txt == 40}      # model calls of B after the gate
    late_a = {c["sigma"] for c in after if c["layout"].txt == 77}
    assert s["attn2_calls_computed_no_cache"] == len(late_b) and s["attn2_calls_skipped"] == n * len(late_a)
    assert caplog.text.count("no text stream cached") == 1 and caplog.text.count("FreeSpeed T-GATE:") == 1


def test_flux_without_cfg_warns_that_only_the_text_stream_saves_work(caplog):
    m = apply_tgate(tiny("flux").model, TGateConfig(dit_gate=GATE))
    with caplog.at_level(logging.WARNING, logger="FreeSpeed"):
        run(m, "flux", STEPS, cfg=1.0)
    dm = tiny("flux").model.model.diffusion_model
    assert "no CFG" in caplog.text and stats(m)["attn2_calls_skipped"] == 3 * (len(dm.double_blocks) + len(dm.single_blocks))


def test_keep_cfg_and_self_attention_v2_on_wan():
    m = apply_tgate(tiny("wan").model, TGateConfig(dit_gate=0.7, keep_cfg=True, self_attention=True, sa_warmup=1,
                                                   sa_interval=2))
    assert torch.isfinite(run(m, "wan", 10, cfg=5.0)).all()        # self-attention reused at steps 3 and 5
    s = stats(m)
    n = len(tiny("wan").model.model.diffusion_model.blocks)
    assert s["uncond_evaluations_skipped"] == 0 and s["attn1_calls_skipped"] == 2 * n


def test_caches_reset_between_runs_and_requeue_is_identical():
    m = apply_tgate(tiny("sd3").model, TGateConfig(dit_gate=GATE))
    a = run(m, "sd3", STEPS)
    b = run(m, "sd3", STEPS)
    assert torch.equal(a, b) and find(m, "freespeed.tgate").run is None      # the run (and its cache) is dropped


def _built(mc):
    """A ModelPatcher around a real comfy.model_base model built from a tiny config (weights not needed)."""
    mc.set_inference_dtype(torch.float32, None)
    return patcher(mc.get_model({}))


@pytest.mark.parametrize("which", ["hunyuan_dit", "svd"])
def test_refusal_names_the_class_and_the_true_reason(which):
    """HunyuanDiT and SVD have cross-attention: the refusal says their family has no T-GATE path, not that no
    cross-attention layer was found."""
    if which == "hunyuan_dit":
        m = _built(comfy.supported_models.HunyuanDiT(
            {"image_model": "hydit", "hidden_size": 64, "depth": 2, "num_heads": 4, "text_states_dim": 64,
             "text_states_dim_t5": 64, "text_len": 8, "text_len_t5": 8, "input_size": (16, 16), "patch_size": 2,
             "in_channels": 4}))
        cls = "comfy.model_base.HunyuanDiT"
    else:
        m = _built(comfy.supported_models.SVD_img2vid(dict(
            SD15_UNET, model_channels=64, num_res_blocks=[1, 1], channel_mult=[1, 2], transformer_depth=[1, 1],
            transformer_depth_middle=1, transformer_depth_output=[1] * 4, context_dim=64, in_channels=8,
            adm_in_channels=768, use_temporal_attention=True, use_temporal_resblock=True,
            use_linear_in_transformer=True, extra_ff_mix_layer=True, use_spatial_context=True,
            merge_strategy="learned_with_images", merge_factor=0.0, video_kernel_size=[3, 1, 1],
            disable_temporal_crossattention=False, max_ddpm_temb_period=10000)))
        cls = "comfy.model_base.SVD_img2vid"
    assert any("CrossAttention" in type(mod).__name__ or getattr(mod, "attn2", None) is not None
               for mod in m.model.diffusion_model.modules())           # it does have cross-attention
    with pytest.raises(UnsupportedModelError) as e:
        apply_tgate(m, TGateConfig())
    msg = str(e.value)
    assert cls in msg and "no cross-attention" not in msg and "has cross-attention" in msg


@pytest.mark.parametrize("family", ["flux", "sd3"])
def test_applied_twice_the_later_node_does_the_work_once(family, caplog):
    single = apply_tgate(tiny(family).model, TGateConfig(dit_gate=GATE))
    once = run(single, family, STEPS)
    inner = apply_tgate(tiny(family).model, TGateConfig(dit_gate=GATE))
    twice = apply_tgate(inner, TGateConfig(dit_gate=GATE))
    with caplog.at_level(logging.WARNING, logger="FreeSpeed"):
        out = run(twice, family, STEPS)
    assert torch.equal(out, once)
    n = len(block_sites(tiny(family).model, detect_model(tiny(family).model)))
    assert stats(twice)["attn2_calls_skipped"] == stats(single)["attn2_calls_skipped"] == 3 * n
    assert caplog.text.count("applied twice") == 1
