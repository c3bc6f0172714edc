"""FreeSpeed Benchmark: time an original MODEL against a FreeSpeed-patched one on the user's own
checkpoint and device, and show what the speed costs in fidelity.

Both models sample the same latent from the same noise with the same conditioning (what KSampler
runs: ``comfy.sample.sample``).  Every row is first sampled once under the FLOPs counter
(:mod:`..core.flops`: the whole run's counted FLOPs, FreeSpeed's own overheads included; this run is
also the warm-up and gives the output that is compared), then ``repeats`` interleaved rounds are
timed (each round runs every row once, so slow drifts of the machine hit all rows alike; the rounds
engine, the timing self-check and the fewer-steps rule are the benchmark CLI's, :mod:`..core.measure`).
Reported per row: counted FLOPs and median wall time with their ratios against the original,
PSNR/SSIM of the final latent against the original's (latents, not decoded images: no VAE needed)
and the FreeSpeed nodes' own run stats.  With ``fewer_steps`` on, the original also runs at fewer
steps: the fair comparison (is the patched model closer to the full run than the original with the
steps it could afford for the same FLOPs -- and, from a timing that passes its self-check, in the
same time?).  Under 3 rounds or with an inconsistent timing the time axis says "timing inconclusive".
Outputs: a picture (table + cost-vs-fidelity plot) and the table as markdown.
"""
from __future__ import annotations

import math
import time
from typing import Any

import numpy as np
import torch

import comfy.model_management
import comfy.sample
import comfy.samplers
import comfy.utils
from comfy_api.v0_0_2 import io

from ..core import charts, measure
from ..core.flops import count_flops
from ..core.readout import readout
from .hooks import FreeSpeedNode, installed, logger, prepare_sampling


def freespeed_stats(model) -> list[tuple[str, dict]]:
    """(technique name, last run stats) of every FreeSpeed technique installed on ``model``."""
    return [(t.name, dict(t.last_stats)) for t in installed(model) if t.last_stats]


def _readout(stats: dict) -> str:
    try:
        return readout(stats)
    except Exception:
        return ", ".join(f"{k} {v}" for k, v in stats.items() if isinstance(v, (int, float)))[:80]


def run_benchmark(model, patched, positive, negative, latent: dict, seed: int, steps: int, cfg: float,
                  sampler_name: str, scheduler: str, repeats: int = 3, fewer_steps: bool = True,
                  denoise: float = 1.0) -> dict:
    """Count, time and compare; returns the result document (rows with FLOPs, times, ratios, PSNR, SSIM,
    stats; ``timing``: the self-check of :func:`..core.measure.timing_check`)."""
    if repeats < 1:
        raise ValueError("FreeSpeed Benchmark: repeats must be >= 1")
    if steps < 1:
        raise ValueError("FreeSpeed Benchmark: steps must be >= 1")
    latent_image, noise, noise_mask = prepare_sampling(model, latent, seed)
    rows: list[dict[str, Any]] = [{"name": "original", "model": model, "steps": steps, "kind": "baseline"},
                                  {"name": "patched", "model": patched, "steps": steps, "kind": "patched"}]
    if fewer_steps:
        rows += [{"name": f"original, {s} steps", "model": model, "steps": s, "kind": "fewer_steps"}
                 for s in measure.fewer_steps_counts(steps, n=3)]
    pbar = comfy.utils.ProgressBar(len(rows) * (1 + repeats))
    device = comfy.model_management.get_torch_device()
    cuda = getattr(device, "type", "") == "cuda"

    def run(r: dict):
        comfy.model_management.throw_exception_if_processing_interrupted()
        out = comfy.sample.sample(r["model"], noise, r["steps"], cfg, sampler_name, scheduler, positive, negative,
                                  latent_image, denoise=denoise, noise_mask=noise_mask, seed=seed, disable_pbar=True)
        pbar.update(1)
        return out

    # the counted pass (also the warm-up): each row's whole run under the FLOPs counter; its output is compared
    counted = []
    for r in rows:
        out, flops = count_flops(run, r)
        counted.append((out.float().cpu(), flops, freespeed_stats(patched) if r["kind"] == "patched" else []))

    def sample(i: int, warm: bool):
        if cuda:
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        run(rows[i])
        if cuda:
            torch.cuda.synchronize(device)
        return None, time.perf_counter() - t0

    res = measure.timed_rounds(list(range(len(rows))), sample, repeats=repeats, warmup=False)
    ref = counted[0][0]
    base, base_flops = measure.median(res.times[0]), counted[0][1]
    doc_rows = []
    for i, r in enumerate(rows):
        out, flops, stats = counted[i]
        med = measure.median(res.times[i])
        doc_rows.append({"name": r["name"], "kind": r["kind"], "steps": r["steps"], "flops": flops,
                         "flops_ratio": base_flops / flops if flops else None, "times_s": res.times[i],
                         "median_s": med, "ratio": base / med, "psnr_db": measure.psnr(out, ref),
                         "ssim": measure.ssim(out, ref), "stats": stats})
    ok, why = measure.timing_check(doc_rows)
    measure.compare_with_fewer_steps(doc_rows, cost_key="flops", match_key="match_flops")
    if ok:
        measure.compare_with_fewer_steps(doc_rows, verdict_key="beats_fewer_steps_time", match_key="match_time")
    return {"rows": doc_rows, "steps": steps, "cfg": cfg, "sampler": sampler_name, "scheduler": scheduler,
            "seed": seed, "repeats": repeats, "device": str(device), "latent": list(latent_image.shape),
            "timing": {"ok": ok, "why": why}}


def _fmt_psnr(v: float) -> str:
    return "ref" if not math.isfinite(v) else f"{v:.2f}"


def table_rows(doc: dict) -> list[list[str]]:
    out = []
    for r in doc["rows"]:
        stats = "; ".join(f"{name}: {_readout(s)}" for name, s in r["stats"]) if r["stats"] else ""
        fr = "-" if r.get("flops_ratio") is None else f"{r['flops_ratio']:.2f}x"
        out.append([r["name"], str(r["steps"]), f"{r['flops'] / 1e9:.1f}", fr, f"{r['median_s']:.2f}",
                    f"{r['ratio']:.2f}x", _fmt_psnr(r["psnr_db"]), f"{r['ssim']:.3f}", stats[:90]])
    return out


HEADER = ["row", "steps", "GFLOPs", "FLOPs ratio", "median s", "time ratio", "PSNR dB", "SSIM", "FreeSpeed stats"]


def _versus(p: dict, axis: str, ratio: float, unit: str) -> str:
    m = p.get(f"match_{axis}")
    if f"match_{axis}" not in p:
        return f"{unit} {ratio:.2f}x"
    if m is None:
        return f"{unit} {ratio:.2f}x, cheaper than every fewer-steps run measured"
    if m.get("baseline"):
        return f"{unit} {ratio:.2f}x, not cheaper than the original itself"
    v = p["beats_fewer_steps" + ("_time" if axis == "time" else "")]
    word = "closer to the full run than" if v else "further from the full run than"
    return f"{unit} {ratio:.2f}x, {word} the original with {m['steps']} steps (same or lower {unit})"


def verdict(doc: dict) -> str:
    """The patched row at equal counted FLOPs and -- only from a timing that passes its self-check -- at
    equal wall time ("timing inconclusive" with the reason otherwise)."""
    p = doc["rows"][1]
    text = "patched: " + _versus(p, "flops", p["flops_ratio"] or 0.0, "FLOPs")
    t = doc.get("timing") or {}
    if not t.get("ok"):
        return text + f"; timing inconclusive ({t.get('why')})"
    return text + "; " + _versus(p, "time", p["ratio"], "time")


def markdown(doc: dict) -> str:
    head = "| " + " | ".join(HEADER) + " |"
    sep = "|" + "|".join(["---"] + ["---:"] * 7 + ["---"]) + "|"
    body = ["| " + " | ".join(c.replace("|", "/") for c in r) + " |" for r in table_rows(doc)]
    return "\n".join([head, sep, *body, "", f"- {verdict(doc)}",
                      f"- {doc['steps']} steps {doc['sampler']}/{doc['scheduler']}, CFG {doc['cfg']:g}, seed "
                      f"{doc['seed']}, latent {'x'.join(str(v) for v in doc['latent'])}, {doc['repeats']} interleaved "
                      f"round(s) after a counted run of each row, {doc['device']}; FLOPs counted over the whole run; "
                      "PSNR/SSIM of the final latents against the original; a time verdict needs >= 3 rounds and "
                      "a step-count curve that passes the self-check"])


def picture(doc: dict) -> torch.Tensor:
    """The table and the cost-vs-fidelity plot (x: counted FLOPs ratio) as a ComfyUI IMAGE (1, H, W, 3) in [0, 1]."""
    title = (f"FreeSpeed Benchmark: {doc['steps']} steps {doc['sampler']}, CFG {doc['cfg']:g}, "
             f"latent {'x'.join(str(v) for v in doc['latent'])}, {doc['device']}")
    table = charts.text_table(HEADER, table_rows(doc), title=title, notes=[verdict(doc)])
    pts = [{"label": r["name"], "x": r["flops_ratio"], "y": r["psnr_db"]} for r in doc["rows"] if r["kind"] == "patched"]
    curve = [(r["flops_ratio"], r["psnr_db"], f"{r['steps']} st") for r in doc["rows"] if r["kind"] == "fewer_steps"]
    plot = charts.speed_fidelity_plot(pts, curve, size=(max(table.width, 700), 420),
                                      x_label="counted FLOPs ratio vs original (×, higher is cheaper)")
    img = charts.stack_images([table, plot])
    arr = np.asarray(img, dtype=np.float32) / 255.0
    return torch.from_numpy(arr)[None]


class BenchmarkNode(FreeSpeedNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return cls.schema(
            "FreeSpeedBenchmark", "FreeSpeed Benchmark",
            description=("Times the original MODEL against a FreeSpeed-patched one (same noise, conditioning and "
                         "latent; interleaved repeats) and compares their outputs (PSNR/SSIM of the final latents), "
                         "with the original at fewer steps as the fair comparison. Outputs a table + plot image."),
            model_input=False, inputs=[
                io.Model.Input("model", tooltip="The original MODEL (what goes into the FreeSpeed node)."),
                io.Model.Input("patched_model", tooltip="The MODEL out of the FreeSpeed node(s)."),
                io.Conditioning.Input("positive"),
                io.Conditioning.Input("negative"),
                io.Latent.Input("latent_image"),
                io.Int.Input("seed", default=0, min=0, max=0xffffffffffffffff, control_after_generate=True),
                io.Int.Input("steps", default=20, min=1, max=10000),
                io.Float.Input("cfg", default=7.0, min=0.0, max=100.0, step=0.1, round=0.01),
                io.Combo.Input("sampler_name", options=comfy.samplers.KSampler.SAMPLERS),
                io.Combo.Input("scheduler", options=comfy.samplers.KSampler.SCHEDULERS),
                io.Int.Input("repeats", default=3, min=1, max=20,
                             tooltip="Timed interleaved rounds after the counted run (medians are compared); a "
                                     "time verdict needs at least 3 and a consistent fewer-steps curve."),
                io.Boolean.Input("fewer_steps", default=True,
                                 tooltip="Also time the original at 3 fewer step counts: the fair comparison."),
            ],
            outputs=[io.Image.Output(display_name="report"), io.String.Output(display_name="markdown")],
        )

    @classmethod
    def fingerprint_inputs(cls, **kwargs):
        return float("nan")           # timings are measurements: never serve them from the cache

    @classmethod
    def execute(cls, model, patched_model, positive, negative, latent_image, seed, steps, cfg, sampler_name,
                scheduler, repeats, fewer_steps) -> io.NodeOutput:
        t0 = time.perf_counter()
        doc = run_benchmark(model, patched_model, positive, negative, latent_image, int(seed), int(steps), float(cfg),
                            sampler_name, scheduler, int(repeats), bool(fewer_steps))
        logger.info("FreeSpeed Benchmark: %s (%d rows, %.1f s)", verdict(doc), len(doc["rows"]),
                    time.perf_counter() - t0)
        return io.NodeOutput(picture(doc), markdown(doc))


