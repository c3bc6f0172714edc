"""The canvas's schedule preview (core/preview.py, served by POST /freespeed/preview) against the runs it
previews: the same schedule code, so step-exact schedules agree exactly; percent schedules resolved
against the model's own sigmas may move a boundary by one step (documented in core/preview.py)."""
from __future__ import annotations

import pytest

from tiny import sample, technique_of

from comfyui_freespeed.core.preview import preview
from comfyui_freespeed.core.readout import annotate
from comfyui_freespeed.nodes.encoder_propagation import EncoderPropagationConfig, apply_encoder_propagation
from comfyui_freespeed.nodes.tgate import TGateConfig, apply_tgate


def kinds(segments):
    return [(s["kind"], s["start"], s["end"]) for s in segments]


@pytest.mark.parametrize("k", [2, 3])
def test_encoder_propagation_preview_is_the_run(sd15, k):
    m = apply_encoder_propagation(sd15.model, EncoderPropagationConfig("every_k", every_k=k, max_parallel=1))
    sample(m, sd15, steps=10)
    run = annotate(technique_of(m, "freespeed.encoder_propagation").last_stats)
    pv = preview("FreeSpeedEncoderPropagation", {"schedule": "every k steps", "every_k": k}, 10)
    assert kinds(pv["segments"]) == kinds(run["segments"])


@pytest.mark.parametrize("gate", [0.3, 0.5, 0.7])
def test_tgate_preview_within_a_step_of_the_run(sd15, gate):
    m = apply_tgate(sd15.model, TGateConfig(gate=gate))
    sample(m, sd15, steps=10)
    before = technique_of(m, "freespeed.tgate").last_stats["steps_before_gate"]
    text = preview("FreeSpeedTGate", {"gate": gate}, 10)["text"]
    assert abs(int(text.split("gate at step ")[1].split("/")[0]) - before) <= 1, (text, before)
