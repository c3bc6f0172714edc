"""Every ComfyUI model class of the DiT families (issue 21): each ``comfy.model_base`` subclass of Flux, SD3, PixArt,
WAN21 and QwenImage is either run by every node at its defaults here or refused by name (``nodes/sites.py``
``REFUSED_CLASSES``), and docs/dit-support.md lists it.  Full-length adds inside the block stack (Wan VACE hints,
Wan Animate's face adapter, Qwen-Image block patches) end AT-EDM's pruned range; Encoder Propagation's front
residual carries the hints that arrive inside the front; Chroma's skip lists never leave a front input unset."""
from __future__ import annotations

import inspect
import os

import pytest
import torch

import comfy.model_base

from dit_helpers import run, tiny
from dit_variants import (tiny_chroma_radiance, tiny_wan22_5b, tiny_wan_animate, tiny_wan_camera, tiny_wan_humo,
                          tiny_wan_s2v, tiny_wan_vace)
from tiny import sample, tiny_chroma

from comfyui_freespeed.core.propagation import front_blocks
from comfyui_freespeed.core.techniques import TECHNIQUES, get
from comfyui_freespeed.nodes import registry
from comfyui_freespeed.nodes.atedm import ATEDMConfig, apply_atedm
from comfyui_freespeed.nodes.dit import layout_for_call
from comfyui_freespeed.nodes.encoder_propagation import EncoderPropagationConfig, apply_encoder_propagation
from comfyui_freespeed.nodes.hooks import find
from comfyui_freespeed.nodes.sites import REFUSED_CLASSES, UnsupportedModelError, detect_model

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ROOTS = (comfy.model_base.Flux, comfy.model_base.SD3, comfy.model_base.PixArt, comfy.model_base.WAN21,
         comfy.model_base.QwenImage)
# class name -> builder of a tiny instance (the families' base builders are in dit_helpers / tiny.py)
TESTED = {"Flux": lambda: tiny("flux"), "Chroma": tiny_chroma, "SD3": lambda: tiny("sd3"),
          "PixArt": lambda: tiny("pixart"), "WAN21": lambda: tiny("wan"), "QwenImage": lambda: tiny("qwen"),
          "WAN21_Vace": tiny_wan_vace, "WAN21_Camera": tiny_wan_camera, "WAN22_Animate": tiny_wan_animate,
          "WAN22": tiny_wan22_5b}
REFUSED_BUILDERS = {"WAN22_S2V": tiny_wan_s2v, "ChromaRadiance": tiny_chroma_radiance, "WAN21_HuMo": tiny_wan_humo}
KEYS = [t.key for t in TECHNIQUES]
STEPS = 2


def family_classes() -> list[str]:
    return sorted(n for n, c in inspect.getmembers(comfy.model_base, inspect.isclass)
                  if issubclass(c, ROOTS) and c.__module__ == comfy.model_base.__name__)


def test_every_model_class_of_the_dit_families_is_tested_or_refused_and_in_the_docs():
    names = family_classes()
    assert {"Flux", "Chroma", "ChromaRadiance", "WAN21_Vace", "WAN22_S2V", "QwenImage"} <= set(names)
    unclassified = [n for n in names if n not in TESTED and n not in REFUSED_CLASSES]
    assert not unclassified, f"classify these comfy.model_base classes (test them or refuse them): {unclassified}"
    assert not set(TESTED) & set(REFUSED_CLASSES)
    assert set(REFUSED_BUILDERS) == set(REFUSED_CLASSES)
    with open(os.path.join(REPO, "docs", "dit-support.md"), encoding="utf-8") as f:
        doc = f.read()
    missing = [n for n in names if f"`{n}`" not in doc]
    assert not missing, f"docs/dit-support.md does not list {missing}"


_BUILT: dict = {}
BASE = {"Flux": "flux", "SD3": "sd3", "PixArt": "pixart", "WAN21": "wan", "QwenImage": "qwen"}


def built(name: str):
    if name not in _BUILT:
        _BUILT[name] = (TESTED.get(name) or REFUSED_BUILDERS[name])()
    return _BUILT[name]


def go(name: str, model, steps: int = STEPS, **kw):
    """Sample a (patched) clone of the class's tiny model."""
    if name in BASE:
        return run(model, BASE[name], steps, **kw)
    return sample(model, built(name), 16, 16, steps=steps, **kw)


@pytest.mark.parametrize("key", KEYS)
@pytest.mark.parametrize("name", sorted(TESTED))
def test_every_tested_class_runs_every_node_at_its_defaults(name, key):
    t = built(name)
    assert type(t.model.model).__name__ == name and detect_model(t.model).family != "other"
    m = registry.apply(key, t.model)
    out = go(name, m)
    assert torch.isfinite(out).all()
    tech = find(m, get(key).wrapper_key)
    assert tech is not None and tech.run is None and tech.last_stats["evaluations"] == STEPS


@pytest.mark.parametrize("key", KEYS)
@pytest.mark.parametrize("name", sorted(REFUSED_CLASSES))
def test_refused_classes_are_refused_by_every_node_by_name(name, key):
    t = built(name)
    with pytest.raises(UnsupportedModelError) as e:
        registry.apply(key, t.model)
    msg = str(e.value)
    assert f"comfy.model_base.{name} " in msg and REFUSED_CLASSES[name] in msg


def block_inputs(dm) -> tuple[list, list]:
    """Forward pre-hooks recording (block index, input tokens) of every block call."""
    seen = []
    hooks = [b.register_forward_pre_hook(lambda mod, a, i=i: seen.append((i, int(a[0].shape[1]))))
             for i, b in enumerate(dm.blocks)]
    return seen, hooks


def test_vace_pruned_range_never_spans_a_hint():
    t = tiny_wan_vace()
    dm = t.model.model.diffusion_model
    hints = set(dm.vace_layers_mapping)                       # {0, 2, 4, 6}: hints added after these blocks
    seen, hooks = block_inputs(dm)
    try:
        m = apply_atedm(t.model, ATEDMConfig(dit_warmup=0.0))  # the repro (size 38 vs 128), pruning from step 0
        assert torch.isfinite(sample(m, t, 16, 16, steps=4)).all()
    finally:
        for h in hooks:
            h.remove()
    full = 3 * 8 * 8
    pruned = [(i, n) for i, n in seen if n < full]
    assert pruned, "nothing was pruned"
    assert all(i - 1 not in hints for i, _ in pruned)         # a block whose input is pruned never follows a hint
    s = find(m, "freespeed.atedm").last_stats
    assert s["stack_calls_pruned"] > 0 and s["stack_calls_left_control"] > 0
    assert s["stack_calls_pruned"] + s["stack_calls_left_control"] + s["stack_calls_full"] == s["evaluations"]


def test_animate_face_adapter_and_qwen_block_patches_end_the_range():
    a = tiny_wan_animate()
    dm = a.model.model.diffusion_model
    info = detect_model(a.model)
    x, ctx = torch.zeros(1, 16, 3, 16, 16), torch.zeros(1, 7, 64)
    assert layout_for_call(info, dm, x, ctx, None, {}).control == frozenset()
    assert layout_for_call(info, dm, x, ctx, None, {"face_pixel_values": torch.zeros(1)}).control == frozenset(
        {("block", 0), ("block", 5)})
    seen = []

    def patch(kw):                                           # a full-length add after every block (DiffSynth-style)
        seen.append(int(kw["img"].shape[1]))
        kw["img"][:, :64] += 0.0
        return kw
    m = tiny("qwen").model.clone()
    m.set_model_double_block_patch(patch)
    m = apply_atedm(m, ATEDMConfig(ratio=0.5, dsap_end=0.0, dit_start=0.0, dit_end=1.0, dit_warmup=0.0))
    assert torch.isfinite(run(m, "qwen", STEPS)).all()
    assert set(seen) == {64}                                 # the patch always sees every image token
    s = find(m, "freespeed.atedm").last_stats
    assert s["stack_calls_left_control"] == s["evaluations"] and s["stack_calls_pruned"] == 0


def test_encoder_propagation_front_residual_carries_the_vace_hints_inside_it():
    from comfyui_freespeed.nodes.sites import add_block_replace, block_sites
    t = tiny_wan_vace()
    dm = t.model.model.diffusion_model
    cfg = EncoderPropagationConfig(schedule="every_k", every_k=2, dit_front=0.5, dit_warmup=0.0, dit_every=0)
    n_front = front_blocks(len(dm.blocks), cfg.dit_front)
    assert n_front == 4 and {0, 2} <= set(dm.vace_layers_mapping) and 3 not in dm.vace_layers_mapping
    m = apply_encoder_propagation(t.model, cfg)
    m = m.clone()
    front_in, rear_in = [], []

    def record(args, extra):                                 # outside Encoder Propagation: this step's front input
        front_in.append(args["img"].clone())
        return extra["original_block"](args)
    add_block_replace(m, block_sites(m, detect_model(m))[0], record)
    h = dm.blocks[n_front].register_forward_pre_hook(lambda mod, a: rear_in.append(a[0].clone()))
    try:
        assert torch.isfinite(sample(m, t, 16, 16, steps=6)).all()
    finally:
        h.remove()
    assert len(front_in) == len(rear_in) == 6
    for k in (0, 2, 4):                                      # key step k, propagated step k + 1
        key_residual = rear_in[k] - front_in[k]              # blocks 0-3 plus the hints after blocks 0 and 2
        assert torch.allclose(rear_in[k + 1], front_in[k + 1] + key_residual, atol=1e-5)
    s = find(m, "freespeed.encoder_propagation").last_stats
    assert s["key_steps"] == 3 and s["decoder_only_steps"] == 3


@pytest.mark.parametrize("attr,skip", [("skip_mmdit", [0]), ("skip_mmdit", [1]), ("skip_dit", [0]), ("skip_dit", [1])])
def test_chroma_skip_lists(attr, skip):
    t = tiny_chroma()                                        # its own instance: the skip list is set on it
    setattr(t.model.model.diffusion_model, attr, skip)
    m = apply_encoder_propagation(t.model, EncoderPropagationConfig(schedule="every_k", every_k=2, dit_warmup=0.0, dit_every=0))
    assert torch.isfinite(sample(m, t, 16, 16, steps=4)).all()
    s = find(m, "freespeed.encoder_propagation").last_stats
    assert s["key_steps"] == 2 and s["decoder_only_steps"] == 2
    m = apply_atedm(t.model, ATEDMConfig(ratio=0.5, dsap_end=0.0, dit_start=0.0, dit_end=1.0, dit_warmup=0.0))
    assert torch.isfinite(sample(m, t, 16, 16, steps=4)).all()
    s = find(m, "freespeed.atedm").last_stats
    assert s["stack_calls_pruned"] == 4                      # the range moves to the blocks that run
