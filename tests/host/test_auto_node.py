"""FreeSpeed Auto and FreeSpeed Preset on real tiny models (SD1.5, SDXL, Flux, Wan) and the trained fixture, with
``cost=flops`` (deterministic): the winner holds the target on every seed and is the cheapest candidate that
does, fewer steps and "nothing reaches the target" return the original MODEL, the budget bounds the trials,
an interrupt leaves no patches and no preset, presets round-trip and bad names/files fail clearly."""
from __future__ import annotations

import json
import math
import os

import pytest
import torch

import comfy.model_management as mm
import comfy.utils

from dit_helpers import tiny as tiny_dit
from tiny import sample, tiny_sd15, tiny_sdxl

from comfyui_freespeed.core import auto as A
from comfyui_freespeed.core.measure import psnr
from comfyui_freespeed.nodes.auto import AutoNode, PresetNode
from comfyui_freespeed.nodes.auto import presets
from comfyui_freespeed.nodes.auto.search import CANDIDATES, Job, accepted_keys, apply_parts, run_auto

STEPS = 3


def _fixture():
    from bench.fixtures import families
    if not os.path.isfile(families.spec("fixture").weights_path):
        pytest.skip("fixture weights missing")
    fx = families.load_fixture("fixture")

    class FxTiny:                      # the fixture behind the tiny-model interface of tiny.sample
        model = fx.patcher
        extra_frames = 0

        def cond(self, seed, batch=1):
            return fx.conditioning(["red disc at left"] if seed == 1 else [""])

        def latent(self, h, w, batch=1, frames=None):
            return fx.empty_latent(batch)
    return FxTiny()


BUILD = {"sd15": lambda: tiny_sd15(qk_std=0.3), "sdxl": lambda: tiny_sdxl(qk_std=0.3),
         "flux": lambda: tiny_dit("flux"), "wan": lambda: tiny_dit("wan"), "fixture": _fixture}
_MODELS: dict = {}


def tiny(name):
    if name not in _MODELS:
        _MODELS[name] = BUILD[name]()
    return _MODELS[name]


def job(name, **kw) -> Job:
    t = tiny(name)
    latent = {"samples": t.latent(8, 8)}
    kw = {"target": 20.0, "seeds": 2, "budget": 3, "cost": "flops", **kw}
    return Job(t.model, t.cond(1), t.cond(2), latent, 0, STEPS, 4.0, "euler", "normal", **kw)


def snapshot(model) -> str:
    """Everything a patch could leave on a ModelPatcher."""
    return repr((sorted(model.patches), sorted(model.object_patches), model.model_options.get("transformer_options"),
                 {k: sorted(v) for k, v in model.wrappers.items()}, sorted(model.model_options)))


def check_search(j: Job, res: dict) -> None:
    ref, log, winner, settings = res["reference"], res["log"], res["winner"], res["settings"]
    assert log.trials == len(log.candidates) <= j.budget
    assert settings["search"]["trials"] == log.trials and settings["search"]["wall_s"] > 0
    passing = [c for c in log.candidates
               if c.error is None and len(c.closeness) == j.seeds and all(v >= j.target for v in c.closeness)]
    cheaper = [c for c in passing if c.cost < ref.cost]
    if cheaper:
        assert winner.cost == min(c.cost for c in cheaper) and winner in cheaper
        assert len(winner.closeness) == j.seeds and all(v >= j.target for v in winner.closeness)
    else:
        assert winner is ref and res["model"] is j.model and not settings["reached"]


@pytest.mark.parametrize("name", ["sd15", "sdxl", "flux", "wan", "fixture"])
def test_winner_holds_on_every_seed_and_is_the_cheapest(name):
    t = tiny(name)
    j = job(name, budget=2)
    before = snapshot(t.model)
    res = run_auto(j)
    check_search(j, res)
    assert snapshot(t.model) == before                      # no patch leaks onto the input MODEL
    assert res["log"].candidates[0].kind == "fewer_steps"   # the fewer-steps ladder always comes first
    # the returned MODEL at the returned steps really is within the target of the full run (seed 0)
    got = sample(res["model"], t, h=8, w=8, steps=res["steps"], cfg=4.0, positive=j.positive, negative=j.negative)
    assert psnr(got, res["reference_outputs"][0]) >= j.target


def test_builtins_are_candidates_through_their_node_classes():
    keys, skipped = accepted_keys(tiny("sd15").model, CANDIDATES[0])
    assert keys == ["todo", "tgate", "encprop", "mapreuse", "atedm", "easycache", "tome"] and not skipped
    assert accepted_keys(tiny("sd15").model, CANDIDATES[1])[0] == keys[:5]
    keys, skipped = accepted_keys(tiny("flux").model, CANDIDATES[0])
    assert "easycache" in keys and "tome" not in keys and "UNet models only" in skipped["tome"]
    m = apply_parts(tiny("sd15").model, (("easycache", {"reuse_threshold": 0.1}), ("tome", {"ratio": 0.3})))
    assert type(m.model_options["transformer_options"]["easycache"]).__name__ == "EasyCacheHolder"
    assert m.model_options["transformer_options"]["easycache"].reuse_threshold == 0.1
    assert "attn1_patch" in m.model_options["transformer_options"]["patches"]       # ToMe's merge
    assert "easycache" not in (tiny("sd15").model.model_options.get("transformer_options") or {})


def test_fewer_steps_win_returns_the_original_model_and_fewer_steps():
    j = job("sd15", target=5.0, budget=1, candidates=CANDIDATES[1])
    res = run_auto(j)
    check_search(j, res)
    assert res["model"] is j.model and res["steps"] == 2
    assert res["settings"]["winner"]["kind"] == "fewer_steps"
    assert res["settings"]["verdict"].startswith("fewer steps won: 2 instead of 3 steps")


def test_unreachable_target_returns_the_original_model_and_says_so():
    j = job("sd15", target=150.0, budget=3)
    res = run_auto(j)
    check_search(j, res)
    assert res["model"] is j.model and res["steps"] == STEPS and not res["settings"]["reached"]
    assert "nothing tried holds 150 dB on all 2 seed(s)" in res["settings"]["verdict"]
    assert A.readout(res["settings"]).startswith("no winner at 150 dB")


@pytest.fixture
def user_dir(tmp_path):
    import folder_paths
    saved = folder_paths.get_user_directory()
    folder_paths.set_user_directory(str(tmp_path))
    yield tmp_path
    folder_paths.set_user_directory(saved)


def auto_node(name, save_as="", **kw):
    j = job(name, **kw)
    return AutoNode.execute(j.model, j.positive, j.negative, j.latent, j.seed, j.steps, j.cfg, j.sampler_name,
                            j.scheduler, j.denoise, j.target, j.seeds, j.budget, j.candidates, j.cost, save_as)


def test_interrupt_leaves_no_patches_and_no_preset(user_dir):
    t = tiny("sd15")
    before = snapshot(t.model)
    ticks = []

    def hook(value, total, preview, node_id=None):
        ticks.append(value)
        if len(ticks) == 3:                                # in the middle of the trials
            mm.interrupt_current_processing(True)
    comfy.utils.set_progress_bar_global_hook(hook)
    try:
        with pytest.raises(mm.InterruptProcessingException):
            auto_node("sd15", save_as="never", budget=4)
    finally:
        comfy.utils.set_progress_bar_global_hook(None)
        mm.interrupt_current_processing(False)
    assert len(ticks) == 4                   # 2 reference runs, 1 trial, the interrupted trial
    assert snapshot(t.model) == before
    assert not os.path.exists(os.path.join(str(user_dir), "freespeed", "never.json"))
    assert presets.list_presets() == []


def test_presets_round_trip_and_fail_clearly(user_dir):
    t = tiny("sd15")
    out = auto_node("sd15", save_as="tiny sd15", target=15.0, budget=2)
    model, steps, settings = out.result[0], out.result[1], json.loads(out.result[2])
    assert out.result[3].ndim == 4 and out.result[3].shape[-1] == 3          # the report IMAGE
    assert settings["search"]["trials"] <= 2 and "wall_s" in settings["search"]
    path = os.path.join(str(user_dir), "freespeed", "tiny sd15.json")
    assert settings["preset"] == path and presets.list_presets() == ["tiny sd15"]
    doc = json.load(open(path))
    assert doc["family"] == "sd1" and doc["resolution"] == [64, 64] and doc["tuned_steps"] == STEPS
    p_model, p_steps, info = PresetNode.execute(t.model, "tiny sd15").result
    assert p_steps == steps and "tuned on sd1 at 64x64 px" in info
    a = sample(model, t, h=8, w=8, steps=steps, cfg=4.0)
    b = sample(p_model, t, h=8, w=8, steps=p_steps, cfg=4.0)
    assert torch.equal(a, b)                                # the preset installs exactly the winner
    # never overwritten; bad names refused before any search
    with pytest.raises(ValueError, match="already exists"):
        auto_node("sd15", save_as="tiny sd15")
    for bad in ("../up", "a/b", ".."):
        with pytest.raises(ValueError, match="not allowed"):
            auto_node("sd15", save_as=bad)
        with pytest.raises(ValueError, match="not allowed"):
            PresetNode.execute(t.model, bad)
    with pytest.raises(ValueError, match="'nope' not found in .*saved presets: tiny sd15"):
        PresetNode.execute(t.model, "nope")
    with open(os.path.join(str(user_dir), "freespeed", "broken.json"), "w") as f:
        f.write("{not json")
    with pytest.raises(ValueError, match="'broken' .* is corrupt"):
        PresetNode.execute(t.model, "broken")
    with pytest.raises(ValueError, match="tuned on a sd1 model, not on this sdxl model"):
        PresetNode.execute(tiny("sdxl").model, "tiny sd15")
    assert math.isfinite(settings["search"]["wall_s"])
