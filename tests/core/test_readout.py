"""core/readout.py: the canvas readout and schedule segments computed from a technique's stats (no host).

The stats dicts below have the shape each technique publishes (``core.stats``: the same keys,
realistic values).
"""
from __future__ import annotations

import dataclasses
import json

import pytest

from comfyui_freespeed.core import readout
from comfyui_freespeed.core.techniques import TECHNIQUES


def tgate_stats(**kw):
    s = {"technique": "T-GATE", "model": "SD1.x/SD2.x", "evaluations": 25, "extra_evaluations": 0, "steps": 25,
         "wall_s": 3.21, "gate_pct": 40.0, "gate_sigma": 2.31, "steps_before_gate": 10, "steps_after_gate": 15,
         "cache_step": 9, "keep_cfg": False, "attn2_calls_skipped": 240, "attn2_calls_computed": 160,
         "uncond_evaluations_skipped": 15, "uncond_evaluations": 10, "cache": {"entries": 16}, "cache_peak_mb": 3.2}
    s.update(kw)
    return s


def todo_stats(**kw):
    s = {"technique": "ToDo", "model": "SD1.x/SD2.x", "evaluations": 20, "extra_evaluations": 0, "steps": 20,
         "wall_s": 1.5, "downsampled_calls": 40, "outside_window_calls": 0, "full_attention_calls": 60,
         "untouched_non_grid": 0, "untouched_unknown_block": 0, "kv_tokens_kept_pct": 25.0,
         "kv_tokens": {"level1": "4096->1024"}, "window_pct": [0.0, 100.0], "factors": [2.0, 1.0],
         "method": "nearest"}
    s.update(kw)
    return s


def prop_stats(**kw):
    s = {"technique": "Encoder Propagation", "model": "SD1.x/SD2.x", "evaluations": 50, "extra_evaluations": 0,
         "steps": 50, "wall_s": 7.0, "schedule": "paper 50ls", "planned_key_steps": [0, 1, 2, 3, 5, 10, 15, 25, 35],
         "key_steps": 9, "decoder_only_steps": 41, "parallel_steps": 30, "max_parallel": 4,
         "largest_parallel_batch": 4, "feature_cache_peak_mb": 12.0, "parallel_batch_peak_mb": 40.0,
         "parallel_outputs_peak_mb": 1.0, "noise_injection": 0.003, "injected_steps": 25, "controlnet": "reuse"}
    s.update(kw)
    return s


def covers_unit_interval(segs):
    assert segs, segs
    assert segs[0]["start"] == 0.0 and segs[-1]["end"] == 1.0, segs
    for a, b in zip(segs, segs[1:]):
        assert a["end"] == b["start"], segs
    for s in segs:
        assert 0.0 <= s["start"] <= s["end"] <= 1.0 and s["kind"] in ("full", "active", "key") and s["label"]


def test_tgate_readout_names_gate_step_reuse_cfg_and_estimate():
    out = readout.annotate(tgate_stats())
    text = out["readout"]
    assert text.startswith("gate at step 10/25 · cross-attn reused 15 steps (240 calls) · CFG off after gate"), text
    # 25 steps x 2 branches vs 10 x 2 + 15 x 1 x 0.9 = 50 / 33.5
    assert out["speedup_est"] == pytest.approx(50 / 33.5, abs=0.01)
    assert "~1.5× est." in text and text.endswith("3.21 s")
    segs = out["segments"]
    covers_unit_interval(segs)
    assert [(s["kind"], s["start"], s["end"]) for s in segs] == [
        ("full", 0.0, 0.36), ("key", 0.36, 0.4), ("active", 0.4, 1.0)]


def test_tgate_keep_cfg_off_and_no_cfg():
    kept = readout.readout(tgate_stats(keep_cfg=True, uncond_evaluations_skipped=0, uncond_evaluations=25))
    assert "CFG kept" in kept and "CFG off" not in kept
    off = readout.annotate(tgate_stats(gate_pct=100.0, gate_sigma=None, steps_before_gate=25, steps_after_gate=0,
                                       cache_step=None, attn2_calls_skipped=0))
    assert off["readout"].startswith("gate off (100%)") and off["speedup_est"] is None
    assert [s["kind"] for s in off["segments"]] == ["full"]
    nocfg = readout.annotate(tgate_stats(uncond_evaluations_skipped=0, uncond_evaluations=0))
    assert "no CFG (cfg 1)" in nocfg["readout"]
    assert nocfg["speedup_est"] == pytest.approx(25 / (10 + 15 * 0.9), abs=0.01)


def test_tgate_speedup_formula_edges():
    assert readout.tgate_speedup(0, 0, True, True) is None
    assert readout.tgate_speedup(10, 10, True, True) == pytest.approx(1.0)
    assert readout.tgate_speedup(10, 0, True, True) == pytest.approx(2 / 0.9)


def test_todo_readout_and_window_segments():
    out = readout.annotate(todo_stats())
    assert out["readout"].startswith("K/V ÷2 at level 1 (4096→1024 tok) · 40 attn calls downsampled · K/V kept 25%")
    assert out["speedup_est"] is None            # depends on the resolution: the benchmark measures it
    assert [(s["kind"], s["start"], s["end"]) for s in out["segments"]] == [("active", 0.0, 1.0)]
    win = readout.annotate(todo_stats(window_pct=[20.0, 60.0], outside_window_calls=12))
    assert "window 20–60%" in win["readout"]
    covers_unit_interval(win["segments"])
    assert [(s["kind"], s["start"], s["end"]) for s in win["segments"]] == [
        ("full", 0.0, 0.2), ("active", 0.2, 0.6), ("full", 0.6, 1.0)]
    none = readout.annotate(todo_stats(factors=[1.0, 1.0], downsampled_calls=0, kv_tokens={}))
    assert none["readout"].startswith("factors 1: nothing downsampled")
    assert [s["kind"] for s in none["segments"]] == ["full"]


def test_todo_missed_window_is_said():
    text = readout.readout(todo_stats(downsampled_calls=0, outside_window_calls=30, kv_tokens={}))
    assert "window missed every step" in text


def test_propagation_readout_key_steps_and_segments():
    out = readout.annotate(prop_stats())
    text = out["readout"]
    assert text.startswith("9 key steps/50 · 41 decoder-only (30 batched) · noise 0.003·z_T at 25 steps"), text
    assert out["speedup_est"] == pytest.approx(50 / (9 + 41 * 0.6), abs=0.01)
    segs = out["segments"]
    covers_unit_interval(segs)
    keys = [s for s in segs if s["kind"] == "key"]
    # steps 0-3 merge into one key segment; 5, 10, 15, 25, 35 are single-step segments
    assert [(round(s["start"] * 50), round(s["end"] * 50)) for s in keys] == [
        (0, 4), (5, 6), (10, 11), (15, 16), (25, 26), (35, 36)]
    every = readout.annotate(prop_stats(planned_key_steps=list(range(50)), key_steps=50, decoder_only_steps=0,
                                        parallel_steps=0, injected_steps=0))
    assert every["speedup_est"] is None and [s["kind"] for s in every["segments"]] == ["full"]


def test_mapreuse_readout_and_segments():
    s = {"technique": "Attention Map Reuse", "model": "SD1.x/SD2.x", "evaluations": 20, "steps": 20, "wall_s": 2.0,
         "schedule": "late", "start_pct": 50.0, "refresh_every": 0, "reuse_steps": list(range(10, 20)),
         "keep_steps": [9], "reuse_calls": 160, "keep_calls": 16, "layers_left_alone_budget": 0, "cache_peak_mb": 512.0}
    out = readout.annotate(s)
    assert out["readout"] == ("10 reuse steps/20 · maps kept at 9 · 160 layer calls reused a map · maps 512 MB · "
                              "2.00 s"), out["readout"]
    assert [(s_["kind"], s_["start"], s_["end"]) for s_ in out["segments"]] == [
        ("full", 0.0, 0.45), ("key", 0.45, 0.5), ("active", 0.5, 1.0)]
    off = readout.annotate(dict(s, schedule="off", reuse_steps=[], keep_steps=[], reuse_calls=0, cache_peak_mb=0))
    assert off["readout"].startswith("no reuse step (off)") and [x["kind"] for x in off["segments"]] == ["full"]


def test_unknown_technique_and_garbage_never_raise():
    out = readout.annotate({"technique": "Something New", "steps": 20, "wall_s": 1.0, "maps_reused": 12,
                            "keep": True})
    assert out["readout"] == "20 steps · maps reused 12 · 1.00 s" and out["segments"] == []
    for bad in ({}, {"technique": "T-GATE"}, {"technique": "ToDo", "factors": None},
                {"technique": "Encoder Propagation", "steps": "x"}, None):
        got = readout.annotate(bad)
        assert isinstance(got["readout"], str)


@pytest.mark.parametrize("stats", [tgate_stats(), todo_stats(), prop_stats()])
def test_annotation_is_json(stats):
    json.dumps(readout.annotate(stats))


def atedm_stats(**kw):
    s = {"technique": "AT-EDM", "model": "SDXL", "evaluations": 25, "extra_evaluations": 0, "steps": 25,
         "wall_s": 9.5, "stack_calls_full": 32, "stack_calls_pruned": 243, "stack_calls_left_kv_changed": 0,
         "stack_calls_left_foreign_attn1": 0, "stack_calls_left_no_map": 0, "attn2_full_grid_calls": 0,
         "gflops_per_eval_full": 13520.0, "gflops_per_eval_run": 8240.0, "flops_saved_pct": 39.1,
         "attn_ff_saved_pct": 52.0, "tokens_kept_pct": 30.0, "kept_tokens": {"level1": "4096->1229",
                                                                              "level2": "1024->307"},
         "ratio": 0.7, "dsap_end_pct": 30.0, "early_scale": 1.0, "levels": [1, 2], "stacks": 11}
    s.update(kw)
    return s


def test_atedm_readout_and_dsap_segments():
    out = readout.annotate(atedm_stats())
    text = out["readout"]
    assert text.startswith("prune 70% (L1 4096→1229, L2 1024→307 tok) · 243 stack calls pruned · tokens kept 30%"
                           " · FLOPs −39.1% · DSAP to 30%"), text
    assert out["speedup_est"] is None and text.endswith("9.50 s")
    covers_unit_interval(out["segments"])
    assert [(s["kind"], s["start"], s["end"]) for s in out["segments"]] == [("active", 0.0, 0.3), ("active", 0.3, 1.0)]
    off = readout.annotate(atedm_stats(ratio=0.0, stack_calls_pruned=0, kept_tokens={}))
    assert off["readout"].startswith("ratio 0: nothing pruned") and [s["kind"] for s in off["segments"]] == ["full"]
    left = readout.readout(atedm_stats(stack_calls_left_kv_changed=5, dsap_end_pct=0.0))
    assert "5 left alone" in left and "DSAP" not in left
    assert readout.annotate(atedm_stats(dsap_end_pct=0.0))["segments"] == [
        {"start": 0.0, "end": 1.0, "kind": "active", "label": "pruned"}]


def test_every_registered_technique_has_a_rule_and_its_stats_round_trip():
    for t in TECHNIQUES:
        assert t.name in readout.RULES
        s = t.stats()
        assert s.technique == t.name
        assert t.stats.from_dict(json.loads(json.dumps(s.as_dict()))) == s
        assert readout.annotate(s.as_dict())["readout"]
        # a key a rule reads but the stats class does not define would fall back silently: keep them in step
        assert {f.name for f in dataclasses.fields(t.stats)} >= {"technique", "steps", "wall_s"}
