"""T-GATE speed case: end-to-end sampling time of T-GATE against the unpatched model, one process.

``run_tgate_speed("sd15", 256)`` builds the full-size SD1.5 (or SDXL) UNet with random weights
(:func:`bench.models.build`: the real ``unet_config`` of the architecture, checked against
ComfyUI's own model detection), makes two clones -- the unpatched *base* and the one the pack's node
code patched (:func:`nodes.tgate.apply_tgate`) -- and samples both with ``comfy.sample.sample``
(what KSampler runs), interleaved ``base, tgate, base, tgate, ...`` after a short warm-up, with the
same noise and random text embeddings.  Defaults are the paper's setting: 25 steps, CFG 7, gate at
40% of denoising (step 10 of 25 with the "normal" scheduler), euler.

Reported: every run's wall time, the medians and their ratio (> 1 = T-GATE faster), the UNet model
time and forward batches of each side (from :class:`bench.instrument.Instrument`'s DIFFUSION_MODEL
wrapper: base = 25 forwards of batch 2; T-GATE = 10 of batch 2 then 15 of batch 1), and the node's
own run stats.  Random weights make the images meaningless; this measures speed only (fidelity
against the full run is the benchmark's job).

On CPU the machine is often shared and noisy; say so with the figures.  Usage:
``python -m bench.case_tgate --model sd15 --resolution 256 [--repeats 1] [--attention sub_quad]``.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from typing import Any, Optional

from . import host, timing


def run_tgate_speed(model_name: str, resolution: int, steps: int = 25, cfg: float = 7.0, gate: float = 0.4,
                    repeats: int = 1, sampler: str = "euler", scheduler: str = "normal",
                    attention: Optional[str] = None, warmup_steps: int = 1, seed: int = 0,
                    device: Optional[str] = None, log=None) -> dict[str, Any]:
    """Time ``repeats`` interleaved runs of base and T-GATE; see the module docstring.

    ``attention``: None = ComfyUI's default kernel (sub-quadratic on CPU), or ``pytorch`` (SDPA) /
    ``sub_quad`` / ``split`` / ``basic`` on both sides.  ``warmup_steps``: each side is first sampled
    once with this many steps (loads the model, fills allocator caches); not measured.
    """
    host.setup(device="cpu" if device in (None, "cpu") else device)
    import torch

    import comfy.sample

    from comfyui_freespeed.nodes.tgate import TGateConfig, apply_tgate

    from .instrument import Instrument, find_technique
    from .models import build

    say = log or (lambda *a: None)
    t_build = time.perf_counter()
    bm = build(model_name, device=torch.device(device) if device else None)
    say(f"built {bm.spec.label} ({bm.params / 1e6:.0f} M params, {bm.dtype}) in {time.perf_counter() - t_build:.1f} s")
    sync = timing.device_sync(bm.device)
    sides = {timing.BASE: bm.patcher.clone(), timing.PATCHED: apply_tgate(bm.patcher, TGateConfig(gate=float(gate)))}
    inst = {}
    for label, m in sides.items():
        inst[label] = Instrument(attention, sync=sync, record_attention=False)
        inst[label].install(m)

    latent = bm.latent(resolution, resolution)
    latent = comfy.sample.fix_empty_latent_channels(bm.patcher, latent)
    noise = comfy.sample.prepare_noise(latent, seed)
    pos = bm.cond(1, width=resolution, height=resolution)
    neg = bm.cond(2, width=resolution, height=resolution)

    def run(label: str, n_steps: int) -> float:
        with torch.inference_mode():
            if sync:
                sync()
            t0 = time.perf_counter()
            comfy.sample.sample(sides[label], noise, n_steps, cfg, sampler, scheduler, pos, neg, latent,
                                denoise=1.0, seed=seed, disable_pbar=True)
            if sync:
                sync()
            return time.perf_counter() - t0

    if warmup_steps > 0:
        for label in sides:
            say(f"warm-up {label}: {run(label, warmup_steps):.1f} s")
    measured: list[tuple[str, float]] = []
    model_time: dict[str, list[float]] = {label: [] for label in sides}
    batches: dict[str, list[int]] = {}
    stats = None
    for label, _ in timing.interleaved_order(repeats, warmup=0):
        inst[label].reset()
        secs = run(label, steps)
        measured.append((label, secs))
        model_time[label].append(sum(f.seconds for f in inst[label].forwards))
        batches[label] = [f.batch for f in inst[label].forwards]
        if label == timing.PATCHED:
            stats = dict(find_technique(sides[label], "freespeed.tgate").last_stats)
        say(f"{label}: {secs:.1f} s")
    by = timing.split_runs(measured)
    base_med, tg_med = timing.median(by[timing.BASE]), timing.median(by[timing.PATCHED])
    return {
        "case": "tgate",
        "model": bm.spec.label, "params_m": round(bm.params / 1e6, 1), "dtype": str(bm.dtype).replace("torch.", ""),
        "device": str(bm.device), "resolution": resolution, "latent": [resolution // 8, resolution // 8],
        "steps": steps, "cfg": cfg, "gate": gate, "sampler": sampler, "scheduler": scheduler,
        "attention": attention or "comfy default", "repeats": repeats, "torch_threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(),
        "base_s": [round(x, 3) for x in by[timing.BASE]], "tgate_s": [round(x, 3) for x in by[timing.PATCHED]],
        "base_median_s": round(base_med, 3), "tgate_median_s": round(tg_med, 3),
        "ratio": round(base_med / tg_med, 3),
        "model_time_ratio": round(timing.median(model_time[timing.BASE]) / timing.median(model_time[timing.PATCHED]), 3),
        "unet_batches": {k: _runs(v) for k, v in batches.items()},
        "tgate_stats": stats,
    }


def _runs(xs: list[int]) -> str:
    """[2, 2, 1, 1, 1] -> "2x2 1x3" (batch x count, in order)."""
    out: list[list[int]] = []
    for x in xs:
        if out and out[-1][0] == x:
            out[-1][1] += 1
        else:
            out.append([x, 1])
    return " ".join(f"{b}x{n}" for b, n in out)


def main(argv: Optional[list] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.case_tgate", description="T-GATE end-to-end speed vs unpatched")
    p.add_argument("--model", default="sd15", choices=["sd15", "sdxl"])
    p.add_argument("--resolution", type=int, default=256, help="image side in pixels (latent = /8)")
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--cfg", type=float, default=7.0)
    p.add_argument("--gate", type=float, default=0.4)
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--attention", default=None, help="pytorch | sub_quad | split | basic (default: ComfyUI's)")
    p.add_argument("--device", default=None)
    a = p.parse_args(argv)
    res = run_tgate_speed(a.model, a.resolution, a.steps, a.cfg, a.gate, a.repeats, attention=a.attention,
                          device=a.device, log=lambda m: print(m, file=sys.stderr, flush=True))
    print(json.dumps(res, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
