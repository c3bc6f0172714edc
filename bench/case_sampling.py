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
from .report import emit_json


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


def apply_technique(technique: str, model, gate: float = 0.4, max_parallel: int = 4, settings: Optional[dict] = None):
    """The pack's own node code on a clone of ``model`` at the node's defaults; ``--gate`` (T-GATE),
    ``--max-parallel`` (Encoder Propagation) and ``settings`` (any config field, e.g.
    ``{"cache_limit_mb": 4096}``) override them."""
    from comfyui_freespeed.nodes import registry
    settings = dict(settings or {})
    if technique == "tgate":
        settings.setdefault("gate", float(gate))
    elif technique == "encprop":
        settings.setdefault("max_parallel", int(max_parallel))
    return registry.apply(technique, model, registry.config(technique, **settings))


def run_sampling_speed(technique: str, model_name: str, resolution: int, steps: Optional[int] = None,
                       cfg: Optional[float] = None, gate: float = 0.4, repeats: int = 1,
                       sampler: Optional[str] = None, scheduler: Optional[str] = None,
                       attention: Optional[str] = None, warmup_steps: int = 1, seed: int = 0,
                       device: Optional[str] = None, max_parallel: int = 4, batch: int = 1,
                       settings: Optional[dict] = None, log=None, frames: Optional[int] = None) -> dict[str, Any]:
    """Time ``repeats`` interleaved runs of base and patched; see the module docstring.

    ``attention``: None = ComfyUI's default kernel (sub-quadratic on CPU), or ``pytorch`` (SDPA) /
    ``sub_quad`` / ``split`` / ``basic`` on both sides.  ``warmup_steps``: each side is first sampled
    once with this many steps (loads the model, fills allocator caches); not measured.
    """
    host.setup(device="cpu" if device in (None, "cpu") else device)
    import torch

    import comfy.sample

    from comfyui_freespeed.core.techniques import get
    from comfyui_freespeed.core import measure
    d = get(technique).paper_sampling
    steps = d["steps"] if steps is None else steps
    cfg = d["cfg"] if cfg is None else cfg
    sampler = sampler or d["sampler"]
    scheduler = scheduler or d["scheduler"]
    from comfyui_freespeed.nodes.hooks import find

    from .instrument import Instrument
    from .models import build, resolve_dtype

    say = log or (lambda *a: None)
    t_build = time.perf_counter()
    dev = torch.device(device) if device else torch.device("cpu")
    bm = build(model_name, device=dev, dtype=resolve_dtype("auto", dev))
    say(f"built {bm.spec.label} ({bm.params / 1e6:.0f} M params, {bm.dtype}) in {time.perf_counter() - t_build:.1f} s")
    sync = timing.device_sync(bm.device)
    sides = {measure.BASE: bm.patcher.clone(), measure.PATCHED: apply_technique(technique, bm.patcher, gate, max_parallel, settings)}
    inst = {}
    for label, m in sides.items():
        inst[label] = Instrument(attention, sync=sync, record_attention=False)
        inst[label].install(m)

    latent = bm.latent(resolution, resolution, batch)
    if frames and latent.ndim == 5:            # video models: another latent frame count
        latent = latent[:, :, :1].repeat(1, 1, int(frames), 1, 1)
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

    model_time: dict[str, list[float]] = {label: [] for label in sides}
    batches: dict[str, list[int]] = {}
    stats = None

    def one(label: str, warm: bool):
        nonlocal stats
        inst[label].reset()
        secs = run(label, warmup_steps if warm else steps)
        say(f"{'warm-up ' if warm else ''}{label}: {secs:.1f} s")
        if not warm:
            model_time[label].append(sum(f.seconds for f in inst[label].forwards))
            batches[label] = [f.batch for f in inst[label].forwards]
            if label == measure.PATCHED:
                stats = dict(find(sides[label], get(technique).wrapper_key).last_stats)
        return None, secs

    res = measure.timed_rounds((measure.BASE, measure.PATCHED), one, repeats=repeats, warmup=warmup_steps > 0)
    by = res.times
    base_med, tg_med = measure.median(by[measure.BASE]), measure.median(by[measure.PATCHED])
    return {
        "case": technique,
        "model": bm.spec.label, "params_m": round(bm.params / 1e6, 1), "dtype": str(bm.dtype).replace("torch.", ""),
        "device": str(bm.device), "resolution": resolution, "batch": batch,
        "latent": list(latent.shape[2:]),
        "steps": steps, "cfg": cfg, "gate": gate if technique == "tgate" else None,
        "max_parallel": max_parallel if technique == "encprop" else None, "sampler": sampler, "scheduler": scheduler,
        "attention": attention or "comfy default", "repeats": repeats, "torch_threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(),
        "base_s": [round(x, 3) for x in by[measure.BASE]], "patched_s": [round(x, 3) for x in by[measure.PATCHED]],
        "base_median_s": round(base_med, 3), "patched_median_s": round(tg_med, 3),
        "ratio": round(base_med / tg_med, 3),
        # Encoder Propagation serves decoder-only passes without calling the wrapped UNet forward, so the
        # instrument's DIFFUSION_MODEL wrapper sees its key steps only: no model-time ratio for it
        # (SD3 and PixArt have no DIFFUSION_MODEL wrapper: no model time there either)
        "model_time_ratio": (round(measure.median(model_time[measure.BASE]) / measure.median(model_time[measure.PATCHED]), 3)
                             if technique != "encprop" and measure.median(model_time[measure.PATCHED]) > 0 else None),
        "unet_batches": {k: _runs(v) for k, v in batches.items()},
        # AT-EDM: the node's own FLOPs counter (whole UNet, pruning overhead included), vs the paper's 38.8%
        "flops_saved_pct": (stats or {}).get("flops_saved_pct") if technique == "atedm" else None,
        "settings": settings or {},
        "amdahl": dit_amdahl(technique, bm, latent, stats) if bm.spec.is_dit else None,
        "stats": stats,
    }


def dit_amdahl(technique: str, bm, latent, stats: Optional[dict]) -> Optional[dict]:
    """The ideal speed-up of ToDo / AT-EDM on a DiT from its FLOPs (Amdahl): ToDo removes the image K/V share of
    the attention FLOPs (QKᵀ and ·V scale with the key count), AT-EDM the share its own counter reports."""
    from comfyui_freespeed.core.pruning import dit_block_flops
    from comfyui_freespeed.core.tokens import downsampled_size
    from comfyui_freespeed.nodes.sites import detect_model, dit_block_shapes
    if technique not in ("todo", "atedm"):
        return None
    shapes = dit_block_shapes(bm.patcher, detect_model(bm.patcher))
    frames = int(latent.shape[2]) if latent.ndim == 5 else 1
    h, w = -(-int(latent.shape[-2]) // 2), -(-int(latent.shape[-1]) // 2)
    n_img, n_txt = frames * h * w, bm.spec.tokens
    joint = bm.spec.family in ("flux", "sd3")
    total = sum(dit_block_flops(s, n_img, n_txt if joint else 0, 0 if joint else n_txt) for s in shapes.values())
    attn = 0
    for s in shapes.values():
        lq = n_img + (n_txt if s.joint else 0)
        attn += (4 * lq * lq * s.dim if s.joint else 0) + s.image_self * 4 * n_img * n_img * s.dim
    out = {"block_gflops_per_sample": round(total / 1e9, 1), "attention_share": round(attn / total, 3)}
    if technique == "todo":
        f = float((stats or {}).get("factors", [2.0])[0] or 2.0)
        nh, nw = downsampled_size(h, w, f)
        kept = frames * nh * nw
        saved = 0
        for s in shapes.values():
            lq = n_img + (n_txt if s.joint else 0)
            if s.joint:
                saved += 4 * lq * (n_img - kept) * s.dim
            saved += s.image_self * 4 * n_img * (n_img - kept) * s.dim
        out["todo_flops_saved"] = round(saved / total, 3)
        out["ideal_speedup"] = round(1 / (1 - saved / total), 3)
    else:
        pct = float((stats or {}).get("flops_saved_pct") or 0.0)
        out["ideal_speedup"] = round(1 / (1 - pct / 100), 3)
    return out


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
    host.register_package()
    from comfyui_freespeed.core.techniques import TECHNIQUES
    p = argparse.ArgumentParser(prog="python -m bench.case_sampling",
                                description="T-GATE / Encoder Propagation / Map Reuse / AT-EDM end-to-end speed vs unpatched")
    from .models import SPECS
    p.add_argument("--technique", default="tgate", choices=[t.key for t in TECHNIQUES],
                   help="todo: DiT models only here (the UNet ToDo has its own bench, python -m bench)")
    p.add_argument("--model", default="sd15",
                   choices=["sd15", "sdxl"] + [k for k, v in SPECS.items() if v.is_dit and not v.hidden],
                   help="DiTs: flux-dev (needs ~48 GB RAM in fp32), flux-dev-slice, sd35-large, sd35-medium, "
                        "wan21-1.3b")
    p.add_argument("--resolution", type=int, default=256, help="image side in pixels (latent = /8; Wan: 2 latent frames)")
    p.add_argument("--steps", type=int, default=None, help="default: the technique's paper setting")
    p.add_argument("--cfg", type=float, default=None)
    p.add_argument("--sampler", default=None)
    p.add_argument("--scheduler", default=None)
    p.add_argument("--batch", type=int, default=1, help="latent batch (the UNet batch is twice this with CFG)")
    p.add_argument("--frames", type=int, default=None, help="video models (Wan): latent frames (default 2)")
    p.add_argument("--max-parallel", type=int, default=4, help="encprop: steps decoded in one batch")
    p.add_argument("--json", default=None, help="also write the result here")
    p.add_argument("--gate", type=float, default=0.4)
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--attention", default=None, help="pytorch | sub_quad | split | basic (default: ComfyUI's)")
    p.add_argument("--device", default=None)
    p.add_argument("--set", action="append", default=[], metavar="NAME=VALUE",
                   help="override a node setting (repeatable), e.g. --set cache_limit_mb=4096")
    a = p.parse_args(argv)
    try:
        settings = parse_settings(a.set)
    except ValueError as e:
        p.error(str(e))
    res = run_sampling_speed(a.technique, a.model, a.resolution, a.steps, a.cfg, a.gate, a.repeats,
                             sampler=a.sampler, scheduler=a.scheduler, attention=a.attention, device=a.device,
                             max_parallel=a.max_parallel, batch=a.batch, settings=settings,
                             log=lambda m: print(m, file=sys.stderr, flush=True), frames=a.frames)
    return emit_json(res, a.json)


if __name__ == "__main__":
    sys.exit(main())
