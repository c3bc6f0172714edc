"""core/preview.py: the schedule preview the canvas asks the server for, computed with the run's own
schedule code on a linear schedule (percent p = step p * steps)."""
from __future__ import annotations

import json

from comfyui_freespeed.core.preview import preview, preview_schedule


def kinds(p):
    return [(s["kind"], round(s["start"], 4), round(s["end"], 4)) for s in p["segments"]]


def test_tgate_gate_step_and_cache_step():
    p = preview("FreeSpeedTGate", {"gate": 0.7, "keep_cfg": False}, 10)
    assert p["text"] == "gate at step 7/10 · CFG off after gate"
    assert kinds(p) == [("full", 0.0, 0.6), ("key", 0.6, 0.7), ("active", 0.7, 1.0)]
    assert preview("FreeSpeedTGate", {"gate": 1.0}, 10)["text"] == "gate off (100%)"
    assert "CFG kept" in preview("FreeSpeedTGate", {"gate": 0.4, "keep_cfg": True}, 25)["text"]


def test_encoder_propagation_key_steps():
    p = preview("FreeSpeedEncoderPropagation", {"schedule": "paper 50ls"}, 50)
    keys = [i for i in range(50) if any(s["kind"] == "key" and s["start"] <= i / 50 < s["end"] for s in p["segments"])]
    assert keys == [0, 1, 2, 3, 5, 10, 15, 25, 35] and p["text"] == "9 key steps/50 · 41 decoder-only"
    p = preview("FreeSpeedEncoderPropagation", {"schedule": "every k steps", "every_k": 4}, 10)
    assert p["text"] == "3 key steps/10 · 7 decoder-only"
    bad = preview("FreeSpeedEncoderPropagation", {"schedule": "custom percents", "key_percents": "x"}, 10)
    assert bad["segments"]                                  # an unparsable list falls back to the paper's


def test_mapreuse_late_and_custom():
    p = preview("FreeSpeedAttentionMapReuse", {"schedule": "late (paper)", "start": 0.5, "refresh_every": 0}, 20)
    assert p["text"] == "10 reuse steps/20"
    assert kinds(p) == [("full", 0.0, 0.45), ("key", 0.45, 0.5), ("active", 0.5, 1.0)]
    p = preview("FreeSpeedAttentionMapReuse", {"schedule": "custom percents", "custom_percents": "50, 90"}, 10)
    assert p["text"] == "2 reuse steps/10"
    assert preview("FreeSpeedAttentionMapReuse", {"schedule": "off"}, 10)["text"] == "no reuse step"


def test_todo_and_atedm_windows():
    p = preview("FreeSpeedToDo", {"factor_level_1": 2.0, "factor_level_2": 1.0, "start_percent": 0.2,
                                  "end_percent": 0.8}, 20)
    assert kinds(p) == [("full", 0.0, 0.2), ("active", 0.2, 0.8), ("full", 0.8, 1.0)]
    assert preview("FreeSpeedToDo", {"factor_level_1": 1.0, "factor_level_2": 1.0}, 20)["text"] == "factors 1: off"
    p = preview("FreeSpeedATEDM", {"ratio": 0.5, "dsap_end_percent": 0.3}, 20)
    assert kinds(p) == [("active", 0.0, 0.3), ("active", 0.3, 1.0)]


def test_preview_never_raises_and_is_json():
    for bad in [("FreeSpeedTGate", {"gate": "x"}, None), ("FreeSpeedNope", {}, 10), ("FreeSpeedToDo", None, -3),
                ("FreeSpeedAttentionMapReuse", {"start": None}, 1e9)]:
        json.dumps(preview(*bad))
    assert preview("FreeSpeedNope", {}, 10) == {"segments": [], "text": ""}


def test_preview_schedule_is_linear_in_percent():
    s = preview_schedule(8)
    assert s.total_steps == 8
    assert [round(s.info(x).percent, 4) for x in s.sigmas[:-1]] == [i / 8 for i in range(8)]
