"""ToDo and Encoder Propagation next to what users put beside them: LoRA, SAG, PAG (T-GATE's own
compatibility tests live in test_tgate.py).

Each case checks that the technique still acted (its run stats), that the other patch still changed
the result (it was not silently dropped), and that nothing crashed or produced non-finite values.
"""
from __future__ import annotations

import pytest
import torch

from tiny import sample

from comfyui_freespeed.nodes.encoder_propagation import EncoderPropagationConfig, apply_encoder_propagation
from comfyui_freespeed.nodes.todo import ToDoConfig, apply_todo

STEPS = 6


def _todo(model):
    return apply_todo(model, ToDoConfig((2.0, 1.0)))


def _encprop(model):
    # key steps at 0% and 50%: steps 1-2 and 4-5 of 6 are decoder-only
    return apply_encoder_propagation(model, EncoderPropagationConfig(schedule="custom", key_percents=(0.0, 0.5)))


TECHNIQUES = {"todo": (_todo, "freespeed.todo"), "encprop": (_encprop, "freespeed.encoder_propagation")}


def _stats(model, key):
    import comfy.patcher_extension as pe
    wrappers = model.wrappers.get(pe.WrappersMP.OUTER_SAMPLE, {}).get(key, [])
    assert wrappers, f"{key} is not installed"
    return wrappers[0].__self__.last_stats


def _acted(name, s):
    if name == "todo":
        return s["downsampled_calls"] > 0
    return s["decoder_only_steps"] > 0


def _sag(model):
    from comfy_extras.nodes_sag import SelfAttentionGuidance
    return SelfAttentionGuidance.execute(model, 0.5, 2.0).result[0]


def _pag(model):
    from comfy_extras.nodes_pag import PerturbedAttentionGuidance
    return PerturbedAttentionGuidance.execute(model, 3.0).result[0]


def _lora(model):
    key = "diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_v.weight"
    w = model.get_model_object(key)
    m = model.clone()
    m.add_patches({key: (torch.randn(w.shape, generator=torch.Generator().manual_seed(5)) * 0.5,)}, 1.0)
    return m


OTHERS = {"lora": _lora, "sag": _sag, "pag": _pag}


@pytest.mark.parametrize("other", sorted(OTHERS))
@pytest.mark.parametrize("name", sorted(TECHNIQUES))
@pytest.mark.parametrize("order", ["technique_first", "technique_last"])
def test_technique_with_lora_sag_pag(sd15, name, other, order):
    apply, key = TECHNIQUES[name]
    add = OTHERS[other]
    m = add(apply(sd15.model)) if order == "technique_first" else apply(add(sd15.model))
    out = sample(m, sd15, steps=STEPS)
    assert torch.isfinite(out).all()
    s = _stats(m, key)
    assert _acted(name, s), s
    assert s["evaluations"] >= STEPS
    # the other patch still matters: without it, the same technique gives a different result
    assert not torch.equal(out, sample(apply(sd15.model), sd15, steps=STEPS)), f"{other} had no effect"


@pytest.mark.parametrize("kw", [dict(denoise=0.5), dict(start_step=3, last_step=8)])
def test_encoder_propagation_partial_runs(sd15, kw):
    """denoise < 1 and a KSamplerAdvanced range: the run's own first step is a key step, decoder-only
    steps follow the percent schedule, and the output stays finite."""
    m = apply_encoder_propagation(sd15.model, EncoderPropagationConfig(schedule="every_k", every_k=2))
    out = sample(m, sd15, steps=10, **kw)
    assert torch.isfinite(out).all()
    s = _stats(m, "freespeed.encoder_propagation")
    n = 10 if "denoise" in kw else 5
    assert s["evaluations"] == n and s["key_steps"] + s["decoder_only_steps"] == n
    assert s["key_steps"] >= 1 and s["decoder_only_steps"] >= 1
    assert not torch.equal(out, sample(sd15.model, sd15, steps=10, **kw))
