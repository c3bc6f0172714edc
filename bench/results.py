"""The result document of a speed comparison (pure: no torch, no ComfyUI).

:func:`summarize_kernel` turns one kernel's run records into ratios and shares;
:func:`document` assembles the JSON document.  Its top-level keys are :data:`TOP_KEYS`, each entry
of ``results`` has the keys of :data:`RESULT_KEYS` (tests pin both: the README, the plot and the
node read this format).

A run record (one sampling run of one model) is a dict with at least ``label`` ("base" |
"patched"), ``warmup``, ``profile`` (bool), ``wall_s``, ``model_s`` (time inside the UNet forwards),
``unet_batch`` (list), ``attention_s``, ``selected_s``, ``attention_share``, ``selected_share`` and
``attention_calls`` (0 when the run's attention calls were not timed).
"""
from __future__ import annotations

import math
import time

from comfyui_freespeed.core import measure

from . import timing

SCHEMA = "freespeed-bench/speed/1"
IDEAL_ASSUMES = ("ideal = T / (T - A_sel + A_sel / f^2): the touched attention calls (time A_sel of the base "
                 "model time T) become f^2 times cheaper (attention cost proportional to Nq*Nk) and everything "
                 "else costs the same")
KERNEL_LABELS = {"pytorch": "SDPA (pytorch)", "sub_quad": "sub-quadratic", "split": "split", "basic": "basic"}

TOP_KEYS = ("schema", "benchmark", "technique", "technique_label", "created", "environment", "config", "results",
            "wall_s", "ideal_assumes")
RESULT_KEYS = ("kernel", "kernel_label", "repeats", "base_s", "patched_s", "base_median_s", "patched_median_s",
               "base_wall_s", "patched_wall_s", "measured_ratio", "wall_ratio", "attention_share", "selected_share",
               "ideal_ratio", "fraction_of_ideal", "selected_attention_speedup", "unet_batch",
               "unet_batch_expected", "batched_cfg", "technique_stats", "runs")


def summarize_kernel(kernel: str, runs: list, factor: float, want_batch: int) -> dict:
    """Ratios and shares of one kernel's runs.

    * measured ratio: median base model time / median patched model time over the timed runs;
    * attention shares: medians over the base runs whose attention calls were timed (the timed runs
      themselves on CPU, separate profiling runs on CUDA);
    * ideal ratio from the touched share and ``factor`` (:func:`bench.timing.ideal_ratio`).
    """
    timed = [r for r in runs if not r["warmup"] and not r["profile"]]
    base = [r for r in timed if r["label"] == measure.BASE]
    patched = [r for r in timed if r["label"] == measure.PATCHED]
    prof = [r for r in runs if r["attention_calls"] and not r["warmup"]]
    prof_base = [r for r in prof if r["label"] == measure.BASE] or base
    prof_patched = [r for r in prof if r["label"] == measure.PATCHED] or patched
    measured = measure.speed_ratio([r["model_s"] for r in base], [r["model_s"] for r in patched])
    wall = measure.speed_ratio([r["wall_s"] for r in base], [r["wall_s"] for r in patched])
    share_all = measure.median(r["attention_share"] for r in prof_base)
    share_sel = measure.median(r["selected_share"] for r in prof_base)
    ideal = timing.ideal_ratio_from_share(share_sel, factor)
    sel_base = measure.median(r["selected_s"] for r in prof_base)
    sel_patched = measure.median(r["selected_s"] for r in prof_patched)
    batches = sorted({b for r in timed for b in r["unet_batch"]})
    stats = next((r.get("technique_stats") for r in reversed(patched) if r.get("technique_stats")), {})
    return {
        "kernel": kernel,
        "kernel_label": KERNEL_LABELS.get(kernel, kernel),
        "repeats": len(base),
        "base_s": [r["model_s"] for r in base],
        "patched_s": [r["model_s"] for r in patched],
        "base_median_s": measure.median(r["model_s"] for r in base),
        "patched_median_s": measure.median(r["model_s"] for r in patched),
        "base_wall_s": [r["wall_s"] for r in base],
        "patched_wall_s": [r["wall_s"] for r in patched],
        "measured_ratio": measured,
        "wall_ratio": wall,
        "attention_share": share_all,
        "selected_share": share_sel,
        "ideal_ratio": ideal,
        "fraction_of_ideal": timing.fraction_of_ideal(measured, ideal),
        "selected_attention_speedup": (sel_base / sel_patched) if sel_patched > 0 else math.nan,
        "unet_batch": batches,
        "unet_batch_expected": want_batch,
        "batched_cfg": batches == [want_batch],
        "technique_stats": stats,
        "runs": runs,
    }


def document(technique: str, technique_label: str, environment: dict, config: dict, results: list,
             wall_s: float) -> dict:
    """The JSON document of one speed comparison (keys :data:`TOP_KEYS`)."""
    return {
        "schema": SCHEMA,
        "benchmark": "speed",
        "technique": technique,
        "technique_label": technique_label,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "environment": environment,
        "config": config,
        "results": results,
        "wall_s": wall_s,
        "ideal_assumes": IDEAL_ASSUMES,
    }
