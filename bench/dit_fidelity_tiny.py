"""Deviation of the DiT paths from the unpatched model on the tiny in-process models of the host tests (random
weights with peaked attention): PSNR of the final latent against the unpatched run.  Random weights say nothing
about image quality; this compares *variants of one technique* with each other under identical conditions (ToDo
nearest vs avg-pool after RoPE, AT-EDM similar vs previous recovery, T-GATE with and without CFG).
Usage: ``python -m bench.dit_fidelity_tiny [--json PATH]`` (CPU, a minute)."""
from __future__ import annotations

import argparse
import math
import os
import sys

from . import host
from .report import emit_json

HERE = os.path.dirname(os.path.abspath(__file__))


def psnr(a, b) -> float:
    mse = float(((a - b) ** 2).mean())
    peak = float(b.max() - b.min()) or 1.0
    return round(10 * math.log10(peak * peak / mse), 2) if mse > 0 else math.inf


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.dit_fidelity_tiny")
    p.add_argument("--json", default=None)
    p.add_argument("--steps", type=int, default=12)
    a = p.parse_args(argv)
    host.setup(device="cpu")
    sys.path.insert(0, os.path.join(os.path.dirname(HERE), "tests", "host"))
    from tiny import sample, tiny_flux_deep, tiny_qwen, tiny_sd3_deep, tiny_wan

    from comfyui_freespeed.nodes.atedm import ATEDMConfig, apply_atedm
    from comfyui_freespeed.nodes.tgate import TGateConfig, apply_tgate
    from comfyui_freespeed.nodes.todo import ToDoConfig, apply_todo
    variants = {
        "todo_nearest_f2": lambda m: apply_todo(m, ToDoConfig(factors=(2.0, 1.0))),
        "todo_avgpool_f2": lambda m: apply_todo(m, ToDoConfig(factors=(2.0, 1.0), method="avg-pool")),
        "atedm_similar": lambda m: apply_atedm(m, ATEDMConfig(ratio=0.5, dit_start=0.0, dit_end=1.0)),
        "atedm_previous": lambda m: apply_atedm(m, ATEDMConfig(ratio=0.5, dit_start=0.0, dit_end=1.0,
                                                               recovery="previous")),
        "tgate_0.4": lambda m: apply_tgate(m, TGateConfig(dit_gate=0.4)),
        "tgate_0.4_keep_cfg": lambda m: apply_tgate(m, TGateConfig(dit_gate=0.4, keep_cfg=True)),
    }
    res = {}
    for fam, build in (("flux", tiny_flux_deep), ("sd3", tiny_sd3_deep), ("qwen", tiny_qwen), ("wan", tiny_wan)):
        t = build()
        for cfg in (1.0, 4.0):
            base = sample(t.model, t, 16, 16, steps=a.steps, cfg=cfg)
            row = {}
            for name, apply in variants.items():
                row[name] = psnr(sample(apply(t.model), t, 16, 16, steps=a.steps, cfg=cfg), base)
            res[f"{fam} cfg {cfg:g}"] = row
            print(fam, cfg, row, file=sys.stderr, flush=True)
    return emit_json({"steps": a.steps, "psnr_db_vs_unpatched": res}, a.json)


if __name__ == "__main__":
    sys.exit(main())
