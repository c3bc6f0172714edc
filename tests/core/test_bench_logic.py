"""The bench's pure logic: interleaved order, ratios from synthetic timings, the ideal-ratio formula,
the automatic repeat count and the result document's format.  No timing assertions."""
from __future__ import annotations

import json
import math
import os
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

from bench import report, results, timing  # noqa: E402
from bench.speed import todo_factors  # noqa: E402

from comfyui_freespeed.core import measure  # noqa: E402


# -- interleaving and ratios ----------------------------------------------------------------------
def test_ratio_ignores_a_single_outlier():
    base = [10.0, 10.0, 100.0]            # one disturbed run
    patched = [5.0, 5.0, 5.0]
    assert measure.speed_ratio(base, patched) == pytest.approx(2.0)


def test_median_of_nothing_is_an_error():
    with pytest.raises(ValueError):
        measure.median([])


# -- ideal ratio ----------------------------------------------------------------------------------
def test_ideal_ratio_formula():
    # T = 100, touched attention 40, factor 2: 100 / (60 + 40/4)
    assert timing.ideal_ratio(100.0, 40.0, 2.0) == pytest.approx(100.0 / 70.0)
    assert timing.ideal_ratio_from_share(0.4, 2.0) == pytest.approx(100.0 / 70.0)
    assert timing.ideal_ratio_from_share(0.0, 2.0) == pytest.approx(1.0)
    assert timing.ideal_ratio_from_share(1.0, 2.0) == pytest.approx(4.0)
    assert timing.ideal_ratio_from_share(0.5, 1.0) == pytest.approx(1.0)
    # the figures: 17% at 512², 36% at 768² (all of it touched) with factor 2
    assert timing.ideal_ratio_from_share(0.36, 2.0) == pytest.approx(1 / (0.64 + 0.09))


@pytest.mark.parametrize("args", [(0.0, 0.0, 2.0), (10.0, 11.0, 2.0), (10.0, -1.0, 2.0), (10.0, 5.0, 0.5)])
def test_ideal_ratio_rejects_bad_input(args):
    with pytest.raises(ValueError):
        timing.ideal_ratio(*args)


def test_fraction_of_ideal():
    assert timing.fraction_of_ideal(1.7, 2.0) == pytest.approx(0.85)


# -- automatic repeat count -----------------------------------------------------------------------
def test_want_another_round():
    assert measure.want_another_round(0, 5, 1e9, 1e9, 1e9, 10.0)          # always one round
    assert not measure.want_another_round(5, 5, 0.0, 1.0, 0.0, 100.0)     # max reached
    assert measure.want_another_round(1, 5, 50.0, 20.0, 20.0, 100.0)      # 90 <= 100
    assert not measure.want_another_round(1, 5, 50.0, 20.0, 40.0, 100.0)  # 110 > 100
    assert measure.want_another_round(3, 5, 1e9, 1e9, 0.0, None)          # no budget: up to max


def test_todo_factors():
    assert todo_factors(1, 2.0) == (2.0, 1.0)
    assert todo_factors(2, 3.0) == (1.0, 3.0)
    assert todo_factors(3, 2.0) == (1.0, 1.0, 2.0)
    with pytest.raises(ValueError):
        todo_factors(0, 2.0)


# -- result document ------------------------------------------------------------------------------
def _run(label, model_s, attn=0.0, sel=0.0, warmup=False, profile=False, batch=2, stats=None):
    rec = {"label": label, "warmup": warmup, "profile": profile, "wall_s": model_s + 0.1, "model_s": model_s,
           "forwards": 1, "unet_batch": [batch], "attention_s": attn, "selected_s": sel,
           "attention_share": attn / model_s, "selected_share": sel / model_s,
           "attention_calls": 32 if attn else 0, "selected_calls": 5 if attn else 0}
    if stats is not None:
        rec["technique_stats"] = stats
    return rec


def _synthetic_doc():
    stats = {"downsampled_calls": 5, "kv_tokens": {"level1": "16384->4096"}}
    runs = [_run("base", 1.0, 0.5, 0.4, warmup=True), _run("patched", 0.8, 0.2, 0.1, warmup=True, stats=stats),
            _run("base", 100.0, 50.0, 40.0), _run("patched", 75.0, 20.0, 10.0, stats=stats),
            _run("base", 104.0, 52.0, 41.6), _run("patched", 77.0, 21.0, 10.5, stats=stats)]
    res = results.summarize_kernel("pytorch", runs, 2.0, 2)
    env = {"python": "3", "torch": "2", "threads": 2, "cpu_count": 2, "platform": "x", "device": "cpu",
           "comfyui": "0.3.64", "cpu": "test cpu"}
    cfg = {"model": "sd15", "width": 1024, "height": 1024, "batch": 1, "steps": 1, "sampler": "euler", "cfg": 7.0,
           "latent": [128, 128], "unet_batch": 2, "model_label": "SD1.5 UNet", "dtype": "float32", "device": "cpu"}
    return results.document("todo", "ToDo factor 2 at attention level 1 (nearest)", env, cfg, [res], 321.0)


def test_summarize_kernel_from_synthetic_runs():
    r = _synthetic_doc()["results"][0]
    assert r["repeats"] == 2                                     # warm-ups dropped
    assert r["base_median_s"] == pytest.approx(102.0)
    assert r["patched_median_s"] == pytest.approx(76.0)
    assert r["measured_ratio"] == pytest.approx(102.0 / 76.0)
    assert r["attention_share"] == pytest.approx(0.5)
    assert r["selected_share"] == pytest.approx(0.4)
    assert r["ideal_ratio"] == pytest.approx(1 / (0.6 + 0.1))
    assert r["fraction_of_ideal"] == pytest.approx(r["measured_ratio"] / r["ideal_ratio"])
    assert r["selected_attention_speedup"] == pytest.approx(40.8 / 10.25)
    assert r["batched_cfg"] and r["technique_stats"]["downsampled_calls"] == 5


def test_profile_runs_give_the_shares_when_timed_runs_did_not_record():
    runs = [_run("base", 10.0), _run("patched", 8.0),                    # timed, attention not recorded
            _run("base", 11.0, 6.0, 5.5, profile=True), _run("patched", 9.0, 3.0, 1.4, profile=True)]
    r = results.summarize_kernel("pytorch", runs, 2.0, 2)
    assert r["repeats"] == 1 and r["measured_ratio"] == pytest.approx(10.0 / 8.0)
    assert r["selected_share"] == pytest.approx(0.5)


def test_document_format_is_stable():
    doc = _synthetic_doc()
    assert tuple(doc) == results.TOP_KEYS
    assert tuple(doc["results"][0]) == results.RESULT_KEYS
    assert doc["schema"] == "freespeed-bench/speed/1"
    back = json.loads(report.to_json(doc))
    assert set(back) == set(results.TOP_KEYS)
    assert set(back["results"][0]) == set(results.RESULT_KEYS)


def test_json_has_no_nan():
    doc = _synthetic_doc()
    doc["results"][0]["selected_attention_speedup"] = math.nan
    assert json.loads(report.to_json(doc))["results"][0]["selected_attention_speedup"] is None


def test_tables_show_the_three_figures(tmp_path):
    doc = _synthetic_doc()
    text = report.terminal(doc)
    for col in ("attn share", "touched share", "ideal x", "measured x", "of ideal"):
        assert col in text
    md = report.markdown(doc)
    assert md.count("\n| ") >= 2 and "| SDPA (pytorch) |" in md
    paths = report.write(doc, str(tmp_path / "a" / "speed.json"), str(tmp_path / "speed.md"))
    assert len(paths) == 2 and json.load(open(paths[0]))["technique"] == "todo"


# -- the suite's fewer-steps comparison ------------------------------------------------------------
def test_case_settings_are_parsed_as_json_where_they_parse():
    from bench.case_sampling import parse_settings
    assert parse_settings(["cache_limit_mb=4096", "map_dtype=fp32", "cache_on_cpu=true", "start=0.6"]) == {
        "cache_limit_mb": 4096, "map_dtype": "fp32", "cache_on_cpu": True, "start": 0.6}
    assert parse_settings([]) == {}
    with pytest.raises(ValueError, match="NAME=VALUE"):
        parse_settings(["cache_limit_mb"])


def test_suite_defaults_depend_on_the_model():
    from types import SimpleNamespace

    import torch
    from bench.suite import SuiteOptions, resolve
    sd, xl = resolve(SuiteOptions(model="sd15")), resolve(SuiteOptions(model="sdxl"))
    assert (sd.batch, sd.width, sd.cfg, sd.steps, sd.sampler) == (1, 512, 7.0, 20, "euler") and (xl.batch, xl.width) == (1, 1024)
    assert resolve(SuiteOptions(model="sd15", batch=3, width=256, height=256)).batch == 3
    # a fixture subject brings its own size, steps, cfg and sampler; explicit options still win where given
    sub = SimpleNamespace(defaults={"width": 256, "height": 256, "steps": 30, "cfg": 4.0, "sampler": "dpmpp_2m"},
                          latent=torch.zeros(64, 4, 32, 32))
    fx = resolve(SuiteOptions(), sub)
    assert (fx.batch, fx.width, fx.steps, fx.cfg, fx.sampler, fx.scheduler) == (64, 256, 30, 4.0, "dpmpp_2m", "normal")
    assert resolve(SuiteOptions(steps=12, cfg=2.0), sub).steps == 12 and resolve(SuiteOptions(cfg=2.0), sub).cfg == 2.0


# -- the suite's row schema, verdicts on two cost axes and the timing rule ------------------------
def _suite_rows(base_times=(20.0, 20.1, 19.9)):
    """Synthetic suite rows in the one schema: a 20-step baseline, a fewer-steps curve with FLOPs linear in
    the steps and times ~1 s per step, a technique at 60% of the FLOPs and 55% of the time, and a peer that
    is not cheaper than the full run."""
    from bench.suite import ROW_KEYS

    def row(name, kind, steps, flops, times, psnr, fd=30.0, acc=0.5):
        r = dict.fromkeys(ROW_KEYS)
        r.update({"name": name, "label": name, "kind": kind, "steps": steps, "flops": flops,
                  "flops_ratio": 2000 / flops, "times_s": list(times), "median_s": sorted(times)[len(times) // 2],
                  "psnr": psnr, "fd": fd, "fd_spread": 1.0, "prompt_accuracy": acc})
        return r
    rows = [row("baseline", "baseline", 20, 2000, base_times, math.inf)]
    rows.append(row("tech", "freespeed", 20, 1200, (11.0, 11.1, 10.9), 35.0, fd=25.0))
    rows.append(row("peer", "peer", 20, 2000, (19.0, 19.1, 18.9), 40.0))
    rows += [row(f"steps{s}", "fewer_steps", s, 100 * s, [s + d for d in (0.0, 0.1, -0.1)], 20.0 + s)
             for s in (5, 10, 11, 13, 16, 19)]
    return rows


def test_suite_verdicts_at_equal_flops_and_equal_time():
    from bench.suite import ROW_KEYS, verdicts
    rows = _suite_rows()
    ok, why = measure.timing_check(rows)
    assert ok, why
    verdicts(rows, ok)
    assert all(tuple(r) == ROW_KEYS for r in rows)            # verdicts keep the one schema
    tech, peer = rows[1], rows[2]
    # equal FLOPs: 1200 FLOPs affords 11 steps (1100), whose PSNR 31 dB is below the technique's 35 dB;
    # FD 25 beats 30 by more than the spread, accuracy equal: better on both
    assert tech["match_flops"]["steps"] == 11 and tech["beats_fewer_steps"] is True
    assert tech["beats_fewer_steps_quality"] is True
    assert tech["verdict_flops"] == "vs 11 steps: closeness better, quality better"
    # equal time: 11.0 s affords 11 steps (11.0 s) too
    assert tech["match_time"]["steps"] == 11 and tech["verdict_time"] == "vs 11 steps: closeness better, quality better"
    assert peer["verdict_flops"] == "not cheaper than the full run" and peer["beats_fewer_steps"] is False
    assert peer["verdict_time"] == "vs 19 steps: closeness better, quality not better"   # 40 dB vs 39 dB
    for r in rows[3:] + rows[:1]:                             # the curve itself has no verdict
        assert r["verdict_flops"] is None and r["verdict_time"] is None


def test_suite_gives_no_time_verdict_from_an_inconsistent_timing():
    from bench import suite_report
    from bench.suite import verdicts
    rows = _suite_rows(base_times=(26.0, 26.1, 25.9))        # the full run 30% slower than its curve predicts
    ok, why = measure.timing_check(rows)
    assert not ok and "outlier" in why
    verdicts(rows, ok)
    tech = rows[1]
    assert tech["verdict_time"] == "inconclusive" and tech["beats_fewer_steps_time"] is None
    assert tech["match_time"] is None
    assert tech["verdict_flops"] == "vs 11 steps: closeness better, quality better"     # FLOPs verdict stands
    doc = {"rows": rows, "timing": {"ok": ok, "why": why}}
    assert suite_report.timing_line(doc).startswith("timing inconclusive: the full run (20 steps) took 26.00 s")
    assert any(x.endswith("; time: inconclusive") and x.startswith("tech: FLOPs 1.67x, vs 11 steps")
               for x in suite_report.goal_lines(doc))
