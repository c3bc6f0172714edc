"""``python -m bench sweep --technique NAME``: the tuning sweep behind each node's defaults.

A technique's main knobs (:data:`GRIDS`) are run on a fixture's *held-out* prompts x seeds (never the
bench set), at each (sampler, steps) setting (default 20 and 50 steps, ``euler`` and ``dpmpp_2m``),
next to the baseline and its fewer-steps curve, through the suite's own measurement (``bench.suite.measure``:
the rounds engine, closeness, prompt accuracy, fixture FD, the verdicts on both axes).  Writes
``bench/out/sweep_<technique>.{json,png}``: every point, the speed-quality-closeness frontier per setting,
and the setting-independent pick (:func:`recommend`).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import time
from typing import Optional

log = logging.getLogger("FreeSpeed.bench")

GRIDS: dict[str, list[dict]] = {
    "todo": [dict(factors=(f, 1.0)) for f in (1.5, 2.0, 3.0)]
    + [dict(factors=(2.0, 1.0), start_percent=0.0, end_percent=e) for e in (0.5, 0.8)]
    + [dict(factors=(2.0, 2.0))],
    "tgate": [dict(gate=g) for g in (0.3, 0.4, 0.5, 0.6, 0.7, 0.8)] + [dict(gate=g, keep_cfg=True) for g in (0.4, 0.6)],
    "encprop": [dict(schedule="50ls")] + [dict(schedule="every_k", every_k=k) for k in (2, 3, 4)]
    + [dict(schedule="50ls", noise_injection=0.0)],
    "mapreuse": [dict(start=s) for s in (0.5, 0.6, 0.7, 0.8)] + [dict(start=s, refresh_every=2) for s in (0.5, 0.7)],
    "atedm": [dict(ratio=r, dsap_end=d) for r in (0.3, 0.5, 0.7) for d in (0.0, 0.3)] + [dict(ratio=0.5, dsap_end=0.5)],
}


def label(settings: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in settings.items()) or "defaults"


def frontier(points: list[dict]) -> list[str]:
    """Names of the points not dominated on (counted FLOPs ratio up, FD down, PSNR up)."""
    def dominated(p, q):
        ge = q["flops_ratio"] >= p["flops_ratio"] and q["fd"] <= p["fd"] and q["psnr"] >= p["psnr"]
        gt = q["flops_ratio"] > p["flops_ratio"] or q["fd"] < p["fd"] or q["psnr"] > p["psnr"]
        return ge and gt
    return [p["name"] for p in points if not any(dominated(p, q) for q in points if q is not p)]


def recommend(doc: dict) -> Optional[dict]:
    """The configuration that beats fewer steps (at equal counted FLOPs) on quality in the most settings
    (then on closeness, then the highest mean FLOPs ratio); None when no configuration beats fewer steps on
    quality anywhere."""
    score: dict[str, list] = {}
    for st in doc["settings"]:
        for r in st["rows"]:
            if r.get("kind") != "freespeed" or r.get("flops_ratio") is None:
                continue
            s = score.setdefault(r["name"], [0, 0, [], r["settings"]])
            s[0] += bool(r.get("beats_fewer_steps_quality"))
            s[1] += bool(r.get("beats_fewer_steps"))
            s[2].append(r["flops_ratio"])
    if not score:
        return None
    name, (q, c, ratios, settings) = max(score.items(), key=lambda kv: (kv[1][0], kv[1][1], sum(kv[1][2]) / len(kv[1][2])))
    return None if q == 0 else {"name": name, "settings": settings, "beats_quality_in": q, "beats_closeness_in": c,
                                "mean_flops_ratio": round(sum(ratios) / len(ratios), 3), "of_settings": len(doc["settings"])}


def run_sweep(technique: str, model: str = "fixture", steps_list=(20, 50), samplers=("euler", "dpmpp_2m"),
              rounds: int = 1, t_start: Optional[float] = None, grid: Optional[list] = None) -> dict:
    import torch

    from comfyui_freespeed.core.measure import timing_check

    from . import suite
    from .fixtures.families import load_fixture
    from .models import resolve_dtype
    from .speed import environment, resolve_device

    t_start = t_start or time.perf_counter()
    if technique not in GRIDS and grid is None:
        raise ValueError(f"no sweep grid for {technique!r}; one of {', '.join(GRIDS)}")
    grid = grid if grid is not None else GRIDS[technique]
    device = resolve_device("auto")
    fx = load_fixture(model, device=device)
    prompts, seeds = fx.held_out_set()
    sub = suite.Subject(fx.name, fx.label, fx.patcher, fx.conditioning(prompts), fx.negative(len(prompts)),
                        fx.empty_latent(len(prompts)), fx.to_image, True, fx.params_m, noise=fx.noise(seeds),
                        prompts=list(prompts), fixture=fx,
                        defaults={"cfg": fx.cfg, "scheduler": fx.scheduler, "width": fx.size * 8,
                                  "height": fx.size * 8})
    from comfyui_freespeed.core.techniques import get
    key = get(technique).wrapper_key
    configs = [suite.Row(f"{technique}[{i}]", f"{get(technique).label} ({label(s)})", "freespeed",
                         suite.technique(technique, **s), (key,)) for i, s in enumerate(grid)]
    settings = []
    for steps in steps_list:
        for sampler in samplers:
            opts = suite.resolve(suite.SuiteOptions(model=model, steps=steps, sampler=sampler, repeats=rounds,
                                                    budget_s=1e9), sub)
            rows = [suite.Row("baseline", "baseline", "baseline", lambda m: m.clone())] + configs + \
                suite.fewer_steps_rows(steps)
            log.info("sweep %s: %d steps %s, %d rows", technique, steps, sampler, len(rows))
            recs, n = suite.measure(sub, rows, opts)
            suite.verdicts(recs, timing_check(recs)[0])
            for r in recs:
                r.pop("_image", None)
                if r["kind"] == "freespeed":
                    r["settings"] = grid[int(r["name"].split("[")[1].rstrip("]"))]
            pts = [r for r in recs if r["kind"] == "freespeed" and r.get("fd") is not None]
            settings.append({"steps": steps, "sampler": sampler, "rounds": n, "rows": recs,
                             "frontier": frontier(pts) if pts else []})
    doc = {"kind": "freespeed-bench-sweep", "version": 1, "technique": technique, "fixture": fx.name,
           "set": "held_out", "n_samples": len(prompts), "environment": {**environment(device),
                                                                          "torch_threads": torch.get_num_threads()},
           "dtype": str(resolve_dtype("auto", device)).replace("torch.", ""), "settings": settings,
           "wall_s": round(time.perf_counter() - t_start, 1)}
    doc["recommended"] = recommend(doc)
    return doc


def plot(doc: dict):
    """One cost (counted FLOPs ratio)-vs-FD panel per (sampler, steps) setting, the fewer-steps curve drawn through."""
    from comfyui_freespeed.core.charts import speed_fidelity_plot, stack_images
    panels = []
    for st in doc["settings"]:
        pts = [{"label": r["name"].split("[")[1].rstrip("]"), "x": r["flops_ratio"], "y": r["fd"]}
               for r in st["rows"] if r["kind"] == "freespeed" and r.get("fd") is not None]
        curve = [(r["flops_ratio"], r["fd"], f"{r['steps']} st") for r in st["rows"]
                 if r["kind"] in ("fewer_steps", "baseline") and r.get("fd") is not None]
        panels.append(speed_fidelity_plot(pts, curve, size=(900, 420), y_label="fixture FD (lower is better)",
                                          x_label="counted FLOPs ratio vs baseline (×, higher is cheaper)",
                                          title=f"{doc['technique']} on {doc['fixture']} (held-out): {st['steps']} steps "
                                                f"{st['sampler']}; point n = grid entry n"))
    return stack_images(panels)


def main(argv: list, t_start: float, setup) -> int:
    p = argparse.ArgumentParser(prog="python -m bench sweep", description=__doc__.split("\n\n")[1])
    p.add_argument("--technique", required=True, choices=sorted(GRIDS))
    p.add_argument("--model", default="fixture", help="a fixture (default: fixture)")
    p.add_argument("--steps", default="20,50", help="comma-separated step counts")
    p.add_argument("--samplers", default="euler,dpmpp_2m", help="comma-separated ComfyUI sampler names")
    p.add_argument("--rounds", type=int, default=1, help="interleaved timed rounds per setting")
    p.add_argument("--out", default=None, metavar="DIR", help="output folder (default bench/out)")
    p.add_argument("-q", "--quiet", action="store_true")
    if not setup(argv):
        return 2
    a = p.parse_args(argv)
    doc = run_sweep(a.technique, a.model, [int(x) for x in a.steps.split(",") if x],
                    [x.strip() for x in a.samplers.split(",") if x.strip()], a.rounds, t_start)
    from .report import to_json
    out = a.out or os.path.join(os.path.dirname(os.path.abspath(__file__)), "out")
    os.makedirs(out, exist_ok=True)
    stem = os.path.join(out, f"sweep_{a.technique}")
    with open(stem + ".json", "w") as fh:
        fh.write(to_json(doc))
    plot(doc).save(stem + ".png")
    print(json.dumps({"technique": doc["technique"], "recommended": doc["recommended"],
                      "frontier": {f"{s['steps']} {s['sampler']}": s["frontier"] for s in doc["settings"]}}, indent=1))
    log.info("wrote %s.json and .png (%.0f s)", stem, doc["wall_s"])
    return 0


__all__ = ["GRIDS", "run_sweep", "recommend", "frontier", "plot", "main"]
