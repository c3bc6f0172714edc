"""The DiT paths together (issues 15-16): every pair of FreeSpeed nodes stacked in both orders, with ComfyUI's
EasyCache in both orders, and probe-style inputs (cfg 1, heun, dpmpp_sde, denoise 0.3, re-queue, step-count
change, an interrupt) on Flux and Wan: nothing crashes, outputs stay finite, every run leaves clean state."""
from __future__ import annotations

import itertools

import pytest
import torch

import comfy.sample
from comfy_extras.nodes_easycache import EasyCacheNode

from dit_helpers import KernelSpy, run, tiny
from tiny import sample, tiny_flux_controlnet, with_control

from comfyui_freespeed.nodes.atedm import ATEDMConfig, apply_atedm
from comfyui_freespeed.nodes.encoder_propagation import EncoderPropagationConfig, apply_encoder_propagation
from comfyui_freespeed.nodes.hooks import find, installed
from comfyui_freespeed.nodes.mapreuse import MapReuseConfig, apply_mapreuse
from comfyui_freespeed.nodes.tgate import TGateConfig, apply_tgate
from comfyui_freespeed.nodes.todo import ToDoConfig, apply_todo

APPLY = {
    "todo": lambda m: apply_todo(m, ToDoConfig(factors=(2.0, 1.0))),
    "tgate": lambda m: apply_tgate(m, TGateConfig(gate=0.5, dit_gate=0.5)),
    "mapreuse": lambda m: apply_mapreuse(m, MapReuseConfig(start=0.6)),
    "encprop": lambda m: apply_encoder_propagation(m, EncoderPropagationConfig(schedule="every_k", every_k=2)),
    "atedm": lambda m: apply_atedm(m, ATEDMConfig(ratio=0.5, dsap_end=0.0)),
}
STEPS = 4


def finite_and_clean(m, out):
    assert torch.isfinite(out).all()
    for t in installed(m):
        assert t.run is None and t.last_stats.get("evaluations", 0) > 0


PAIRS = ([("flux", a, b) for a, b in itertools.permutations(APPLY, 2)]          # Flux: both orders
         + [("wan", a, b) for a, b in itertools.combinations(APPLY, 2)])        # Wan: one order each


@pytest.mark.parametrize("family,first,second", PAIRS)
def test_every_pair_stacks_in_both_orders(family, first, second):
    m = APPLY[second](APPLY[first](tiny(family).model))
    finite_and_clean(m, run(m, family, STEPS))


@pytest.mark.parametrize("name", list(APPLY))
def test_easycache_in_both_orders(name):
    t = tiny("flux")
    for m in (APPLY[name](EasyCacheNode.execute(t.model, 0.05, 0.1, 0.95, False).result[0]),
              EasyCacheNode.execute(APPLY[name](t.model), 0.05, 0.1, 0.95, False).result[0]):
        finite_and_clean(m, run(m, "flux", 8))


@pytest.mark.parametrize("family", ["flux", "wan"])
@pytest.mark.parametrize("name", list(APPLY))
def test_probe_inputs_never_crash(family, name):
    m = APPLY[name](tiny(family).model)
    for kw in (dict(cfg=1.0), dict(sampler="heun"), dict(sampler="dpmpp_sde"), dict(denoise=0.3), dict(steps=7)):
        steps = kw.pop("steps", STEPS)
        finite_and_clean(m, run(m, family, steps, **kw))
    assert torch.equal(run(m, family, STEPS), run(m, family, STEPS))          # re-queue of a cached MODEL


@pytest.mark.parametrize("name", list(APPLY))
def test_an_interrupted_run_leaves_no_state(name):
    t = tiny("qwen")
    m = APPLY[name](t.model)
    lat = comfy.sample.fix_empty_latent_channels(m, t.latent(16, 16))
    noise = comfy.sample.prepare_noise(lat, 0)

    def stop(step, *args):
        if step == 2:
            raise KeyboardInterrupt("interrupted")
    with pytest.raises(KeyboardInterrupt), torch.inference_mode():
        comfy.sample.sample(m, noise, STEPS, 4.0, "euler", "normal", t.cond(1), t.cond(2), lat, callback=stop,
                            disable_pbar=True)
    assert all(x.run is None for x in installed(m))
    finite_and_clean(m, run(m, "qwen", STEPS))


def test_flux_controlnet_residuals_with_every_node():
    """A tiny Flux ControlNet adds full-length residuals after double block 0 and single blocks 0-1 (forward
    positions 0, 2, 3): AT-EDM ranking at block 1 must scatter back at block 2, before its residual."""
    t = tiny("flux")
    cn = tiny_flux_controlnet()
    pos = with_control(t.cond(1), cn, torch.randn(1, 16, 16, 16))
    base = sample(t.model, t, 16, 16, steps=STEPS, positive=pos)
    assert torch.isfinite(base).all()
    for name, apply in APPLY.items():
        m = apply(t.model)
        finite_and_clean(m, sample(m, t, 16, 16, steps=STEPS, positive=pos))
    inner = KernelSpy()
    m = apply_atedm(inner.install(t.model), ATEDMConfig(ratio=0.5, dsap_end=0.0, dit_start=0.2, dit_end=1.0, dit_warmup=0.0))
    finite_and_clean(m, sample(m, t, 16, 16, steps=STEPS, positive=pos, cfg=1.0))
    full, pruned = 77 + 64, 77 + 32
    model_calls = [c["n_q"] for c in inner.calls if c["layout"] is not None]      # not the ControlNet's own
    assert model_calls[:5] == [full, full, pruned, full, full] and model_calls.count(pruned) == STEPS
    # ComfyUI repeats a real Flux ControlNet's residuals over every block: nothing can be pruned, counted
    pos = with_control(t.cond(1), tiny_flux_controlnet(cover_all=True), torch.randn(1, 16, 16, 16))
    m = apply_atedm(t.model, ATEDMConfig(ratio=0.5, dsap_end=0.0, dit_start=0.2, dit_end=1.0, dit_warmup=0.0))
    finite_and_clean(m, sample(m, t, 16, 16, steps=STEPS, positive=pos, cfg=1.0))
    s = find(m, "freespeed.atedm").last_stats
    assert s["stack_calls_pruned"] == 0 and s["stack_calls_left_control"] == STEPS


@pytest.mark.parametrize("name", list(APPLY))
def test_chroma_and_qwen_edit_reference_latents_run_every_node(name):
    m = APPLY[name](tiny("chroma").model)
    finite_and_clean(m, run(m, "chroma", STEPS))
    q = tiny("qwen")
    pos = [[q.cond(1)[0][0], {**q.cond(1)[0][1], "reference_latents": [torch.randn(1, 16, 1, 12, 12)]}]]
    m = APPLY[name](q.model)
    finite_and_clean(m, sample(m, q, 16, 16, steps=STEPS, positive=pos))


@pytest.mark.parametrize("name", list(APPLY))
def test_odd_sizes_batch_three_and_wan_frame_counts(name):
    t = tiny("flux")
    m = APPLY[name](t.model)
    out = sample(m, t, 15, 13, steps=STEPS, batch=3)               # not divisible by the patch (2) nor the factor
    assert out.shape == (3, 16, 15, 13)
    finite_and_clean(m, out)
    w = tiny("wan")
    m = APPLY[name](w.model)
    for frames in (1, 4):
        out = sample(m, w, 14, 10, steps=STEPS, frames=frames)
        assert out.shape == (1, 16, frames, 14, 10)
        finite_and_clean(m, out)
