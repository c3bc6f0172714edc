"""End-to-end sampling speed of a step-level technique (T-GATE, Encoder Propagation) against the
unpatched model, in one process.

``run_sampling_speed("tgate", "sd15", 512)`` builds the full-size SD1.5 (or SDXL) UNet with random
weights (:func:`bench.models.build`: the real ``unet_config`` of the architecture, checked against
ComfyUI's own model detection), makes two clones -- the unpatched *base* and the one the pack's node
code patched -- and samples both with ``comfy.sample.sample`` (what KSampler runs), interleaved
``base, patched, base, patched, ...`` after a short warm-up, with the same noise and random text
embeddings.  Defaults per technique are the papers' settings:

* ``tgate``: 25 steps, CFG 7, euler / normal, gate at 40% of denoising (step 10 of 25).  Base = 25
  forwards of batch 2; T-GATE = 10 of batch 2, then 15 of batch 1 without cross-attention.
* ``atedm``: 25 steps, CFG 7, euler / normal, the node's defaults (ratio 0.7, DSAP until 30%); the
  result also carries the node's FLOPs saving (``flops_saved_pct``, explicit-map cost in the time).
* ``encprop`` (Faster Diffusion): DDIM 50 steps (``ddim_uniform``), CFG 7.5, the paper's "50ls" key
  steps, 4 steps decoded in parallel, prior noise injection 0.003.

Reported: every run's wall time, the medians and their ratio (> 1 = faster), the UNet model time and
forward batches of each side (from :class:`bench.instrument.Instrument`'s DIFFUSION_MODEL wrapper),
and the node's own run stats.  Random weights make the images meaningless; this measures speed only
(fidelity against the full run is the benchmark's job).  On CPU the machine is often shared and
noisy; say so with the figures.  Usage:
``python -m bench.case_sampling --technique tgate --model sd15 --resolution 256 [--repeats 1]``.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from typing import Any, Optional

from . import host, timing


DEFAULTS = {
    "tgate": dict(steps=25, cfg=7.0, sampler="euler", scheduler="normal"),
    "encprop": dict(steps=50, cfg=7.5, sampler="ddim", scheduler="ddim_uniform"),
    "mapreuse": dict(steps=20, cfg=7.0, sampler="euler", scheduler="normal"),
    "atedm": dict(steps=25, cfg=7.0, sampler="euler", scheduler="normal"),
}
KEYS = {"tgate": "freespeed.tgate", "encprop": "freespeed.encoder_propagation", "mapreuse": "freespeed.mapreuse",
        "atedm": "freespeed.atedm"}


def parse_settings(pairs) -> dict[str, Any]:
    """``["cache_limit_mb=4096", "map_dtype=fp32"]`` -> {"cache_limit_mb": 4096, "map_dtype": "fp32"}: a value
    is read as JSON where it parses (numbers, true/false), else kept as text."""
    out: dict[str, Any] = {}
    for pair in pairs or ():
        name, sep, value = str(pair).partition("=")
        if not sep or not name.strip():
            raise ValueError(f"--set wants NAME=VALUE, got {pair!r}")
        try:
            out[name.strip()] = json.loads(value)
        except ValueError:
            out[name.strip()] = value
    return out


def _config(cls, settings: Optional[dict]):
    """``cls()`` with ``settings`` overriding its fields (unknown names are an error, not ignored)."""
    import dataclasses
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(settings or {}) - names)
    if unknown:
        raise ValueError(f"{cls.__name__} has no setting {', '.join(unknown)}; known: {', '.join(sorted(names))}")
    return cls(**(settings or {}))


def apply_technique(technique: str, model, gate: float = 0.4, max_parallel: int = 4, settings: Optional[dict] = None):
    """The pack's own node code on a clone of ``model``; ``settings`` override the Map Reuse / AT-EDM
    config's defaults (e.g. ``{"cache_limit_mb": 4096}``)."""
    if settings and technique not in ("mapreuse", "atedm"):
        raise ValueError("--set applies to the mapreuse and atedm cases (T-GATE: --gate; encprop: --max-parallel)")
    if technique == "tgate":
        from comfyui_freespeed.nodes.tgate import TGateConfig, apply_tgate
        return apply_tgate(model, TGateConfig(gate=float(gate)))
    if technique == "encprop":
        from comfyui_freespeed.nodes.encoder_propagation import EncoderPropagationConfig, apply_encoder_propagation
        return apply_encoder_propagation(model, EncoderPropagationConfig(max_parallel=int(max_parallel)))
    if technique == "mapreuse":    # the node's defaults: late schedule from 50%, fp16 maps, 1024 MB budget
        from comfyui_freespeed.nodes.mapreuse import MapReuseConfig, apply_mapreuse
        return apply_mapreuse(model, _config(MapReuseConfig, settings))
    if technique == "atedm":       # the node's defaults: ratio 0.7, DSAP until 30%, attention levels 1+2
        from comfyui_freespeed.nodes.atedm import ATEDMConfig, apply_atedm
        return apply_atedm(model, _config(ATEDMConfig, settings))
    raise ValueError(f"unknown technique {technique!r}; expected one of {', '.join(DEFAULTS)}")


def run_sampling_speed(technique: str, model_name: str, resolution: int, steps: Optional[int] = None,
                       cfg: Optional[float] = None, gate: float = 0.4, repeats: int = 1,
                       sampler: Optional[str] = None, scheduler: Optional[str] = None,
                       attention: Optional[str] = None, warmup_steps: int = 1, seed: int = 0,
                       device: Optional[str] = None, max_parallel: int = 4, batch: int = 1,
                       settings: Optional[dict] = None, log=None) -> dict[str, Any]:
    """Time ``repeats`` interleaved runs of base and patched; see the module docstring.

    ``attention``: None = ComfyUI's default kernel (sub-quadratic on CPU), or ``pytorch`` (SDPA) /
    ``sub_quad`` / ``split`` / ``basic`` on both sides.  ``warmup_steps``: each side is first sampled
    once with this many steps (loads the model, fills allocator caches); not measured.
    """
    host.setup(device="cpu" if device in (None, "cpu") else device)
    import torch

    import comfy.sample

    d = DEFAULTS[technique]
    steps = d["steps"] if steps is None else steps
    cfg = d["cfg"] if cfg is None else cfg
    sampler = sampler or d["sampler"]
    scheduler = scheduler or d["scheduler"]
    from .instrument import Instrument, find_technique
    from .models import build, resolve_dtype

    say = log or (lambda *a: None)
    t_build = time.perf_counter()
    dev = torch.device(device) if device else torch.device("cpu")
    bm = build(model_name, device=dev, dtype=resolve_dtype("auto", dev))
    say(f"built {bm.spec.label} ({bm.params / 1e6:.0f} M params, {bm.dtype}) in {time.perf_counter() - t_build:.1f} s")
    sync = timing.device_sync(bm.device)
    sides = {timing.BASE: bm.patcher.clone(), timing.PATCHED: apply_technique(technique, bm.patcher, gate, max_parallel, settings)}
    inst = {}
    for label, m in sides.items():
        inst[label] = Instrument(attention, sync=sync, record_attention=False)
        inst[label].install(m)

    latent = bm.latent(resolution, resolution, batch)
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
            stats = dict(find_technique(sides[label], KEYS[technique]).last_stats)
        say(f"{label}: {secs:.1f} s")
    by = timing.split_runs(measured)
    base_med, tg_med = timing.median(by[timing.BASE]), timing.median(by[timing.PATCHED])
    return {
        "case": technique,
        "model": bm.spec.label, "params_m": round(bm.params / 1e6, 1), "dtype": str(bm.dtype).replace("torch.", ""),
        "device": str(bm.device), "resolution": resolution, "batch": batch, "latent": [resolution // 8, resolution // 8],
        "steps": steps, "cfg": cfg, "gate": gate if technique == "tgate" else None,
        "max_parallel": max_parallel if technique == "encprop" else None, "sampler": sampler, "scheduler": scheduler,
        "attention": attention or "comfy default", "repeats": repeats, "torch_threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(),
        "base_s": [round(x, 3) for x in by[timing.BASE]], "patched_s": [round(x, 3) for x in by[timing.PATCHED]],
        "base_median_s": round(base_med, 3), "patched_median_s": round(tg_med, 3),
        "ratio": round(base_med / tg_med, 3),
        # Encoder Propagation serves decoder-only passes without calling the wrapped UNet forward, so the
        # instrument's DIFFUSION_MODEL wrapper sees its key steps only: no model-time ratio for it
        "model_time_ratio": (round(timing.median(model_time[timing.BASE]) / timing.median(model_time[timing.PATCHED]), 3)
                             if technique != "encprop" else None),
        "unet_batches": {k: _runs(v) for k, v in batches.items()},
        # AT-EDM: the node's own FLOPs counter (whole UNet, pruning overhead included), vs the paper's 38.8%
        "flops_saved_pct": (stats or {}).get("flops_saved_pct") if technique == "atedm" else None,
        "settings": settings or {},
        "stats": stats,
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
    p = argparse.ArgumentParser(prog="python -m bench.case_sampling",
                                description="T-GATE / Encoder Propagation / Map Reuse / AT-EDM end-to-end speed vs unpatched")
    p.add_argument("--technique", default="tgate", choices=list(DEFAULTS))
    p.add_argument("--model", default="sd15", choices=["sd15", "sdxl"])
    p.add_argument("--resolution", type=int, default=256, help="image side in pixels (latent = /8)")
    p.add_argument("--steps", type=int, default=None, help="default: the technique's paper setting")
    p.add_argument("--cfg", type=float, default=None)
    p.add_argument("--sampler", default=None)
    p.add_argument("--scheduler", default=None)
    p.add_argument("--batch", type=int, default=1, help="latent batch (the UNet batch is twice this with CFG)")
    p.add_argument("--max-parallel", type=int, default=4, help="encprop: steps decoded in one batch")
    p.add_argument("--json", default=None, help="also write the result here")
    p.add_argument("--gate", type=float, default=0.4)
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--attention", default=None, help="pytorch | sub_quad | split | basic (default: ComfyUI's)")
    p.add_argument("--device", default=None)
    p.add_argument("--set", action="append", default=[], metavar="NAME=VALUE",
                   help="mapreuse/atedm: override a node setting (repeatable), e.g. --set cache_limit_mb=4096")
    a = p.parse_args(argv)
    try:
        settings = parse_settings(a.set)
    except ValueError as e:
        p.error(str(e))
    res = run_sampling_speed(a.technique, a.model, a.resolution, a.steps, a.cfg, a.gate, a.repeats,
                             sampler=a.sampler, scheduler=a.scheduler, attention=a.attention, device=a.device,
                             max_parallel=a.max_parallel, batch=a.batch, settings=settings,
                             log=lambda m: print(m, file=sys.stderr, flush=True))
    text = json.dumps(res, indent=1, default=str)
    print(text)
    if a.json:
        with open(a.json, "w") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
