"""The benchmark suite (bench/suite.py, `make bench`'s default job) and the FreeSpeed Benchmark node,
end to end on tiny real models: rows, ratios from the interleaved timings, fidelity against the
full run, the fewer-steps comparison, the node stats, the written files.  No timing assertions."""
from __future__ import annotations

import json
import math
import os
import sys

import pytest
import torch

from conftest import REPO

if REPO not in sys.path:
    sys.path.insert(0, REPO)

from bench import host  # noqa: E402

host.setup("cpu")

from bench import suite, suite_report  # noqa: E402
from comfyui_freespeed.core import measure  # noqa: E402
from comfyui_freespeed.nodes.benchmark import BenchmarkNode, run_benchmark, verdict  # noqa: E402
from comfyui_freespeed.nodes.todo import ToDoConfig, apply_todo  # noqa: E402
from tiny import tiny_sd15  # noqa: E402


@pytest.fixture(scope="module")
def t15():
    return tiny_sd15(qk_std=0.3)


def _latent(t, h=16, w=16, batch=1):
    return {"samples": t.latent(h, w, batch)}


def test_benchmark_rows_ratios_and_fidelity(t15):
    patched = apply_todo(t15.model, ToDoConfig(factors=(2.0, 1.0)))
    doc = run_benchmark(t15.model, patched, t15.cond(1), t15.cond(2), _latent(t15), seed=3, steps=6, cfg=5.0,
                        sampler_name="euler", scheduler="normal", repeats=2, fewer_steps=True)
    rows = doc["rows"]
    assert [r["kind"] for r in rows] == ["baseline", "patched"] + ["fewer_steps"] * 3
    assert [r["steps"] for r in rows[2:]] == measure.fewer_steps_counts(6, n=3)
    base = measure.median(rows[0]["times_s"])
    for r in rows:
        assert len(r["times_s"]) == 2
        assert r["ratio"] == pytest.approx(base / measure.median(r["times_s"]))
        assert r["flops_ratio"] == pytest.approx(rows[0]["flops"] / r["flops"])
    # counted FLOPs: euler, one model call per step; ToDo's downsampled K/V cost less
    assert all(r["flops"] * 6 == rows[0]["flops"] * r["steps"] for r in rows[2:])
    assert 0 < rows[1]["flops"] < rows[0]["flops"]
    assert rows[0]["psnr_db"] == math.inf and rows[0]["ssim"] == pytest.approx(1.0)
    assert math.isfinite(rows[1]["psnr_db"])          # ToDo changed the output (peaked maps)
    assert all(math.isfinite(r["psnr_db"]) for r in rows[2:])
    (name, stats), = rows[1]["stats"]
    assert name == "ToDo" and stats["downsampled_calls"] > 0
    assert stats["steps"] == 6                          # from a full run
    # the pack's one fewer-steps rule at equal counted FLOPs: the curve is the fewer-steps runs and the full run
    want = measure.match_fewer_steps({r["steps"]: r["flops"] for r in rows if r["kind"] != "patched"},
                                     rows[1]["flops"])
    match = rows[1]["match_flops"]
    assert (match or {}).get("steps") == want
    if match is not None:
        assert rows[1]["beats_fewer_steps"] == (not match["baseline"] and
                                                rows[1]["psnr_db"] > next(r["psnr_db"] for r in rows[2:]
                                                                          if r["steps"] == want))
    # two rounds: no time verdict, the FLOPs verdict stands
    assert doc["timing"] == {"ok": False, "why": "2 timing rounds; a time verdict needs at least 3"}
    assert "match_time" not in rows[1] and "beats_fewer_steps_time" not in rows[1]
    text = verdict(doc)
    assert text.startswith("patched: FLOPs ") and "timing inconclusive (2 timing rounds" in text


def test_benchmark_verdict_gives_time_only_from_a_consistent_timing():
    """The node's words from a document: the FLOPs verdict always; the time verdict only when the timing
    passed its self-check."""
    rows = [{"name": "original", "kind": "baseline", "steps": 20, "flops": 200, "flops_ratio": 1.0, "median_s": 2.0,
             "ratio": 1.0, "psnr_db": math.inf, "times_s": [2.0, 2.01, 1.99]},
            {"name": "patched", "kind": "patched", "steps": 20, "flops": 120, "flops_ratio": 200 / 120,
             "median_s": 1.25, "ratio": 1.6, "psnr_db": 33.0, "times_s": [1.25, 1.26, 1.24]}]
    rows += [{"name": f"original, {s} steps", "kind": "fewer_steps", "steps": s, "flops": 10 * s,
              "flops_ratio": 20 / s, "median_s": 0.1 * s, "ratio": 20 / s, "psnr_db": 25.0 + s,
              "times_s": [0.1 * s] * 3} for s in (5, 12, 19)]
    measure.compare_with_fewer_steps(rows, cost_key="flops", match_key="match_flops")
    doc = {"rows": rows, "timing": {"ok": False, "why": "the full run (20 steps) took 2.00 s where ..."}}
    assert verdict(doc) == ("patched: FLOPs 1.67x, further from the full run than the original with 12 steps (same "
                            "or lower FLOPs); timing inconclusive (the full run (20 steps) took 2.00 s where ...)")
    measure.compare_with_fewer_steps(rows, verdict_key="beats_fewer_steps_time", match_key="match_time")
    doc["timing"] = {"ok": True, "why": "3 rounds"}
    assert verdict(doc).endswith("; time 1.60x, further from the full run than the original with 12 steps "
                                 "(same or lower time)")


def test_benchmark_of_an_unpatched_clone_is_exact(t15):
    doc = run_benchmark(t15.model, t15.model.clone(), t15.cond(1), t15.cond(2), _latent(t15, 8, 12, 2), seed=1,
                        steps=3, cfg=4.0, sampler_name="euler", scheduler="normal", repeats=1, fewer_steps=False)
    assert len(doc["rows"]) == 2
    assert doc["rows"][1]["psnr_db"] == math.inf and doc["rows"][1]["stats"] == []
    assert doc["latent"] == [2, 4, 8, 12]


def test_benchmark_node_outputs_an_image_and_markdown(t15):
    patched = apply_todo(t15.model, ToDoConfig(factors=(2.0, 1.0)))
    out = BenchmarkNode.execute(t15.model, patched, t15.cond(1), t15.cond(2), _latent(t15), 0, 4, 5.0, "euler",
                                "normal", 1, True)
    img, md = out.result
    assert img.ndim == 4 and img.shape[0] == 1 and img.shape[-1] == 3 and img.shape[1] > 200 and img.shape[2] > 300
    assert img.dtype == torch.float32 and float(img.min()) >= 0.0 and float(img.max()) <= 1.0
    assert float(img.std()) > 0.01                    # something was drawn
    assert md.startswith("| row | steps | GFLOPs | FLOPs ratio |")
    assert "| patched | 4 |" in md and "ToDo:" in md and "timing inconclusive (1 timing round;" in md
    assert BenchmarkNode.validate_inputs(sampler_name="euler", scheduler="normal") is True
    assert "sampler_name must be one of" in BenchmarkNode.validate_inputs(sampler_name="nope", scheduler="normal")
    assert "scheduler must be one of" in BenchmarkNode.validate_inputs(sampler_name="euler", scheduler="nope")


# -- the suite -------------------------------------------------------------------------------------
def _tiny_subject(t):
    import comfy.sample
    lat = comfy.sample.fix_empty_latent_channels(t.model, t.latent(16, 16, 2))
    return suite.Subject("tiny-sd15", "tiny SD1.5 (test)", t.model, t.cond(1, 2), t.cond(2, 2), lat, lambda x: x,
                         True, 0.1, ["test subject"])


def test_suite_document_rows_and_files(t15, tmp_path):
    opts = suite.SuiteOptions(model="tiny", width=128, height=128, batch=2, steps=6, cfg=5.0,
                              rows=["todo", "tgate", "stacked", "tome", "easycache"], fewer_steps=[2, 4], repeats=2)
    doc = suite.run_suite(opts, subject=_tiny_subject(t15))
    names = [r["name"] for r in doc["rows"]]
    assert names == ["baseline", "todo", "tgate", "stacked", "tome", "easycache", "steps2", "steps4"]
    rows = {r["name"]: r for r in doc["rows"]}
    base = measure.median(rows["baseline"]["times_s"])
    for r in doc["rows"]:
        assert tuple(r) == suite.ROW_KEYS                           # one schema for every row
        assert r["error"] is None, r
        assert len(r["times_s"]) == 2
        assert r["time_ratio"] == pytest.approx(base / measure.median(r["times_s"]), rel=1e-2)
        assert r["flops_ratio"] == pytest.approx(rows["baseline"]["flops"] / r["flops"], rel=1e-3)
    # counted FLOPs: euler calls the model once per step, so the fewer-steps rows cost steps/6 of the full run
    assert rows["steps2"]["flops"] * 3 == rows["baseline"]["flops"] == rows["steps4"]["flops"] * 6 // 4
    assert rows["todo"]["flops"] < rows["baseline"]["flops"] and rows["stacked"]["flops"] < rows["todo"]["flops"]
    assert rows["baseline"]["psnr"] == math.inf
    assert rows["steps2"]["psnr"] < rows["steps4"]["psnr"]      # fewer steps, further from the full run
    assert rows["todo"]["stats"]["freespeed.todo"]["downsampled_calls"] > 0
    assert set(rows["stacked"]["stats"]) == {"freespeed.todo", "freespeed.tgate", "freespeed.encoder_propagation"}
    assert rows["todo"]["readout"]
    # the FLOPs verdict: the largest step count not costlier than the row, and its PSNR against it
    for name in ("todo", "tgate", "stacked", "tome"):
        r = rows[name]
        fit = [s for s in (2, 4, 6) if rows["baseline" if s == 6 else f"steps{s}"]["flops"] <= r["flops"]]
        if not fit:
            assert r["match_flops"] is None and r["verdict_flops"] == "cheaper than every fewer-steps run"
            continue
        assert r["match_flops"]["steps"] == max(fit)
        if max(fit) < 6:
            assert r["beats_fewer_steps"] == (r["psnr"] > rows[f"steps{max(fit)}"]["psnr"])
            assert r["verdict_flops"].startswith(f"vs {max(fit)} steps: closeness ")
    # two rounds: no time verdict
    assert doc["timing"]["ok"] is False and "2 timing rounds" in doc["timing"]["why"]
    assert all(rows[n]["verdict_time"] == "inconclusive" and rows[n]["beats_fewer_steps_time"] is None
               for n in ("todo", "tgate", "stacked", "tome", "easycache"))
    assert doc["config"]["rounds"] == 2 and doc["config"]["steps"] == 6
    paths = suite_report.write(doc, str(tmp_path))
    assert sorted(os.path.basename(p) for p in paths) == ["suite.json", "suite.md", "suite.png"]
    back = json.loads((tmp_path / "suite.json").read_text())
    assert back["kind"] == "freespeed-bench-suite" and back["version"] == 3
    assert all(tuple(r) == suite.ROW_KEYS for r in back["rows"])
    assert back["rows"][0]["psnr"] is None          # inf (the reference itself) is null in JSON
    md = (tmp_path / "suite.md").read_text()
    assert md.count("\n|") >= len(names) + 1 and "FreeSpeed ToDo" in md and "timing inconclusive" in md
    from PIL import Image
    assert Image.open(tmp_path / "suite.png").size == (900, 600)
    text = suite_report.terminal(doc)
    assert "FreeSpeed T-GATE" in text and "at equal FLOPs" in text and "timing inconclusive: 2 timing rounds" in text


def test_suite_flops_verdicts_are_the_same_in_two_runs(t15):
    """Counted FLOPs and the verdicts at equal FLOPs do not depend on the machine's mood: two runs give the
    same values row for row (ToMe's random merge included: the RNG is seeded per run), whatever the timing."""
    opts = suite.SuiteOptions(model="tiny", width=128, height=128, batch=2, steps=6, cfg=5.0,
                              rows=["todo", "tome", "easycache"], fewer_steps=[2, 4], repeats=1)
    keys = ("flops", "flops_ratio", "psnr", "match_flops", "beats_fewer_steps", "verdict_flops")
    a, b = (suite.run_suite(opts, subject=_tiny_subject(t15)) for _ in range(2))
    assert [[r[k] for k in keys] for r in a["rows"]] == [[r[k] for k in keys] for r in b["rows"]]
    assert {r["name"]: r["verdict_flops"] for r in a["rows"] if r["kind"] != "baseline"
            and r["kind"] != "fewer_steps"}.keys() == {"todo", "tome", "easycache"}


def test_suite_reports_a_refusing_row_instead_of_crashing(t15, monkeypatch):
    def refuse(m):
        raise ValueError("FreeSpeed test: not supported")
    rows = suite.technique_rows()
    monkeypatch.setattr(suite, "technique_rows",
                        lambda: [r if r.name != "todo" else suite.Row("todo", "ToDo", "freespeed", refuse) for r in rows])
    opts = suite.SuiteOptions(model="tiny", width=128, height=128, batch=2, steps=3, cfg=5.0, rows=["todo"],
                              fewer_steps=[], repeats=1)
    doc = suite.run_suite(opts, subject=_tiny_subject(t15))
    todo = doc["rows"][1]
    assert todo["error"] == "FreeSpeed test: not supported"
    assert "not run: FreeSpeed test" in suite_report.terminal(doc)
    with pytest.raises(ValueError, match="unknown row"):
        suite.select_rows(["nope"], 20, None)
