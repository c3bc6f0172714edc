"""Encoder propagation on DiTs (issue 15): the front blocks run at key steps only; at the other steps the first
rear block gets *this step's* front input plus the residual the front added at the last key step."""
from __future__ import annotations

import pytest
import torch

from dit_helpers import FAMILIES, run, sigmas, tiny

from comfyui_freespeed.core.propagation import front_blocks
from comfyui_freespeed.nodes.encoder_propagation import EncoderPropagationConfig, apply_encoder_propagation
from comfyui_freespeed.nodes.hooks import find
from comfyui_freespeed.nodes.sites import block_sites, detect_model

STEPS = 6
EVERY2 = EncoderPropagationConfig(schedule="every_k", every_k=2, noise_injection=0.0, dit_warmup=0.0, dit_every=0)


def stats(m):
    return find(m, "freespeed.encoder_propagation").last_stats


def blocks(family):
    t = tiny(family)
    return [t.model.model.diffusion_model.get_submodule(s.path) for s in block_sites(t.model, detect_model(t.model))]


@pytest.mark.parametrize("family", FAMILIES)
def test_every_step_a_key_step_is_exact(family):
    base = run(tiny(family).model, family, STEPS)
    cfg = EncoderPropagationConfig(schedule="every_k", every_k=1, noise_injection=0.0)
    assert torch.equal(run(apply_encoder_propagation(tiny(family).model, cfg), family, STEPS), base)


@pytest.mark.parametrize("family", FAMILIES)
def test_front_blocks_run_at_key_steps_only_and_the_residual_is_added_to_the_current_input(family):
    bl = blocks(family)
    n_front = front_blocks(len(bl), EVERY2.dit_front)
    calls = [0] * len(bl)
    rear_in = []
    # a linear inside each block counts the block's real work (PixArt's patched block forward is still called)
    inner = [next(m for m in b.modules() if isinstance(m, torch.nn.Linear)) for b in bl]
    hooks = [lin.register_forward_hook(lambda m, a, o, i=i: calls.__setitem__(i, calls[i] + 1))
             for i, lin in enumerate(inner)]

    def first_rear(mod, args, kwargs):
        x = args[0] if args else kwargs.get("img", kwargs.get("hidden_states", kwargs.get("x")))
        rear_in.append(x.clone())
    hooks.append(bl[n_front].register_forward_pre_hook(first_rear, with_kwargs=True))
    front_in = []
    if family == "flux":       # the front input: Flux's post_input patch sees img/txt right before block 0
        m = apply_encoder_propagation(tiny(family).model, EVERY2)
        m.set_model_post_input_patch(lambda d: (front_in.append(torch.cat((d["txt"], d["img"]), 1).clone()), d)[1])
    else:
        m = apply_encoder_propagation(tiny(family).model, EVERY2)
    try:
        assert torch.isfinite(run(m, family, STEPS)).all()
    finally:
        for h in hooks:
            h.remove()
    assert calls[:n_front] == [STEPS // 2] * n_front and calls[n_front:] == [STEPS] * (len(bl) - n_front)
    s = stats(m)
    assert s["key_steps"] == 3 and s["decoder_only_steps"] == 3 and s["front_blocks"] == f"{n_front}/{len(bl)}"
    if family == "flux":       # front ends inside the single blocks: rear input = cat(txt, img) + residual
        for key in (0, 2, 4):
            delta = rear_in[key] - front_in[key]
            assert torch.allclose(rear_in[key + 1], front_in[key + 1] + delta, atol=1e-5)


def test_branches_are_kept_apart_and_runs_reset():
    from comfyui_freespeed.nodes.sites import add_block_replace
    t = tiny("wan")
    bl = blocks("wan")
    n_front = front_blocks(len(bl), EVERY2.dit_front)
    m = apply_encoder_propagation(t.model, EVERY2).clone()
    front_in, rear_in = [], []

    def record(args, extra):                        # outside Encoder Propagation: this step's front input
        front_in.append(args["img"].clone())
        return extra["original_block"](args)
    add_block_replace(m, block_sites(m, detect_model(m))[0], record)
    h = bl[n_front].register_forward_pre_hook(lambda mod, a: rear_in.append(a[0].clone()))
    try:
        a = run(m, "wan", STEPS, cfg=5.0)           # cond and uncond batched: two rows per call
        b = run(m, "wan", STEPS, cfg=5.0)
    finally:
        h.remove()
    assert torch.equal(a, b) and stats(m)["feature_cache_peak_mb"] > 0       # a re-run starts from an empty cache
    assert front_in[0].shape[0] == 2 and len(front_in) == 2 * STEPS
    for k in (0, 2, 4):                             # each row (branch) gets its own key-step residual
        key = rear_in[k] - front_in[k]
        assert not torch.allclose(key[0], key[1], atol=1e-3)                 # the branches' residuals differ
        assert torch.allclose(rear_in[k + 1], front_in[k + 1] + key, atol=1e-5)


def test_paper_schedule_and_noise_injection_run_on_qwen():
    m = apply_encoder_propagation(tiny("qwen").model, EncoderPropagationConfig(noise_on_flow=True))
    assert torch.isfinite(run(m, "qwen", 10)).all()
    s = stats(m)
    sig = sigmas("qwen", 10)
    half = float(tiny("qwen").model.get_model_object("model_sampling").percent_to_sigma(0.5)) * (1 + 1e-4)
    keys = s["planned_key_steps"]
    propagated = [i for i in range(10) if i not in keys]
    assert propagated and s["decoder_only_steps"] == len(propagated)
    assert all(sig[i] <= half for i in propagated)                  # DiT warm-up: nothing propagated before 50%
    assert all(i + 1 not in propagated for i in propagated)         # from there on a key step every 2nd step
    assert s["injected_steps"] == sum(sig[i] <= half for i in range(10)) and s["max_parallel"] == 1
