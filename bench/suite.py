"""The benchmark's main job: every FreeSpeed node, a stacked preset, fewer-steps runs and ComfyUI's
built-in peers, timed side by side and compared with the full run.

What one run does
-----------------
1. Builds the model: ``fixture`` (the small SD1.x-family UNet trained here, ``bench/fixture.py``:
   real, peaked attention, so fidelity figures mean something), ``sd15`` / ``sdxl`` (full-size
   architectures with random weights: speed only, their PSNR is not meaningful), or a checkpoint
   path (a user's own weights; prompts encoded with its CLIP).
2. Makes one MODEL per row by running the pack's own node code (or the peer node's ``execute``)
   on clones of it.  Rows: ``baseline``; each FreeSpeed node at its defaults; ``stacked`` (ToDo +
   T-GATE + Encoder Propagation); ``euler N steps`` rows (the baseline with fewer steps: the fair
   comparison); peers ``TomePatchModel`` (ratio 0.3), ``HyperTile`` and ``EasyCache`` at their
   defaults.
3. Samples every row with ``comfy.sample.sample`` (what KSampler runs) from the same noise and
   prompts, in interleaved rounds (each round runs every row once, the order rotating), after a
   short warm-up round (``warmup_steps`` per row, not timed); the number of rounds fits ``budget_s``.
   The first timed round gives the fidelity outputs and the node stats (runs are deterministic).
4. Reports per row: median wall time, speed ratio against the baseline's median of the same rounds,
   PSNR and SSIM of its final latent against the baseline's (:mod:`comfyui_freespeed.core.measure`),
   the CUDA peak memory when on a GPU, the node's own stats (its canvas readout line), and the
   fewer-steps run of the same or lower wall time with its PSNR: the row *beats fewer steps* when
   its PSNR is higher.

The fixture's latent is its image (no VAE): fidelity is computed on the sampled latent in model
space, batch = one sample per prompt.
"""
from __future__ import annotations

import logging
import math
import os
import platform
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

log = logging.getLogger("FreeSpeed.bench")

FIXTURE_PROMPTS = ("large red disc at left", "small blue square at right", "large green bar at top",
                   "small yellow disc at bottom")
REAL_PROMPTS = ("a photo of a red fox in the snow, detailed fur", "a watercolor landscape with mountains and a lake",
                "a portrait of an old fisherman, studio lighting", "a bowl of fruit on a wooden table")


# ------------------------------------------------------------------------------------------------
# rows
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Row:
    name: str
    label: str
    kind: str                                   # "baseline" | "freespeed" | "stacked" | "fewer_steps" | "peer"
    apply: Callable[[Any], Any]                 # base ModelPatcher -> the row's MODEL
    keys: tuple = ()                            # FreeSpeed wrapper keys whose stats the row reports
    steps: Optional[int] = None                 # fewer-steps rows: their step count


def _todo(m):
    from comfyui_freespeed.nodes.todo import ToDoConfig, apply_todo
    return apply_todo(m, ToDoConfig())


def _tgate(m):
    from comfyui_freespeed.nodes.tgate import TGateConfig, apply_tgate
    return apply_tgate(m, TGateConfig())


def _encprop(m):
    from comfyui_freespeed.nodes.encoder_propagation import EncoderPropagationConfig, apply_encoder_propagation
    return apply_encoder_propagation(m, EncoderPropagationConfig())


def _mapreuse(m):
    from comfyui_freespeed.nodes.mapreuse import MapReuseConfig, apply_mapreuse
    return apply_mapreuse(m, MapReuseConfig())


def _atedm(m):
    from comfyui_freespeed.nodes import atedm
    return atedm.apply_atedm(m, atedm.ATEDMConfig())


def _stacked(m):
    return _encprop(_tgate(_todo(m)))


def _peer(module: str, cls: str, **kw):
    def apply(m):
        import importlib
        node = getattr(importlib.import_module(module), cls)
        out = node.execute(m, **kw)
        return out.result[0] if hasattr(out, "result") else out[0]      # HyperTile returns a plain tuple
    return apply


def _have_atedm() -> bool:
    try:
        from comfyui_freespeed.nodes import atedm  # noqa: F401
        return hasattr(atedm, "apply_atedm")
    except Exception:
        return False


def technique_rows() -> list[Row]:
    rows = [
        Row("baseline", "baseline", "baseline", lambda m: m.clone()),
        Row("todo", "FreeSpeed ToDo", "freespeed", _todo, ("freespeed.todo",)),
        Row("tgate", "FreeSpeed T-GATE", "freespeed", _tgate, ("freespeed.tgate",)),
        Row("encprop", "FreeSpeed Encoder Propagation", "freespeed", _encprop, ("freespeed.encoder_propagation",)),
        Row("mapreuse", "FreeSpeed Attention Map Reuse", "freespeed", _mapreuse, ("freespeed.mapreuse",)),
    ]
    if _have_atedm():
        rows.append(Row("atedm", "FreeSpeed AT-EDM", "freespeed", _atedm, ("freespeed.atedm",)))
    rows += [
        Row("stacked", "stacked: ToDo + T-GATE + Encoder Propagation", "stacked", _stacked,
            ("freespeed.todo", "freespeed.tgate", "freespeed.encoder_propagation")),
        Row("tome", "ComfyUI TomePatchModel (0.3)", "peer", _peer("comfy_extras.nodes_tomesd", "TomePatchModel",
                                                                  ratio=0.3)),
        Row("hypertile", "ComfyUI HyperTile (defaults)", "peer",
            _peer("comfy_extras.nodes_hypertile", "HyperTile", tile_size=256, swap_size=2, max_depth=0,
                  scale_depth=False)),
        Row("easycache", "ComfyUI EasyCache (defaults)", "peer",
            _peer("comfy_extras.nodes_easycache", "EasyCacheNode", reuse_threshold=0.2, start_percent=0.15,
                  end_percent=0.95, verbose=False)),
    ]
    return rows


def select_rows(names: Optional[list[str]], steps: int, fewer: Optional[list[int]]) -> list[Row]:
    rows = technique_rows()
    known = {r.name: r for r in rows}
    if names:
        bad = [n for n in names if n not in known]
        if bad:
            raise ValueError(f"unknown row(s) {', '.join(bad)}; known: {', '.join(known)}")
        rows = [known["baseline"]] + [known[n] for n in names if n != "baseline"]
    from comfyui_freespeed.core.measure import fewer_steps_counts
    counts = fewer_steps_counts(steps) if fewer is None else sorted({int(s) for s in fewer if 0 < int(s) < steps})
    rows += [Row(f"steps{s}", f"baseline, {s} steps", "fewer_steps", lambda m: m.clone(), (), s) for s in counts]
    return rows


# ------------------------------------------------------------------------------------------------
# the subject model
# ------------------------------------------------------------------------------------------------
@dataclass
class Subject:
    """The model under test and how to condition it."""
    name: str
    label: str
    patcher: Any
    positive: list
    negative: list
    latent: Any                      # the empty latent (KSampler input space)
    to_image: Callable[[Any], Any]   # sampled latent -> the tensor fidelity is measured on
    fidelity_meaningful: bool
    params_m: float
    notes: list = field(default_factory=list)


def build_subject(model: str, width: int, height: int, batch: int, device, dtype) -> Subject:
    import torch

    import comfy.sample
    if model == "fixture":
        from . import fixture as fx
        patcher, table = fx.load(device=device)
        prompts = [FIXTURE_PROMPTS[i % len(FIXTURE_PROMPTS)] for i in range(batch)]
        pos = [[fx.encode(prompts, table), {}]]
        neg = [[fx.encode([""] * batch, table), {}]]
        latent = torch.zeros(batch, 4, height // 8, width // 8)
        params = sum(p.numel() for p in patcher.model.diffusion_model.parameters()) / 1e6
        return Subject("fixture", "FreeSpeed fixture (trained SD1.x-family UNet)", patcher, pos, neg, latent,
                       lambda x: fx.model_space(patcher, x), True, round(params, 2),
                       [f"prompts: {', '.join(repr(p) for p in prompts)}"])
    if os.path.isfile(model):
        import comfy.sd
        out = comfy.sd.load_checkpoint_guess_config(model, output_vae=False, output_clip=True)
        patcher, clip = out[0], out[1]
        if clip is None:
            raise ValueError(f"{model}: the checkpoint has no text encoder; the bench needs one to encode prompts")
        prompts = [REAL_PROMPTS[i % len(REAL_PROMPTS)] for i in range(batch)]

        def enc(texts):
            conds = [clip.encode_from_tokens_scheduled(clip.tokenize(t)) for t in texts]
            ctx = torch.cat([c[0][0] for c in conds])
            extra = dict(conds[0][0][1])
            if "pooled_output" in extra:
                extra["pooled_output"] = torch.cat([c[0][1]["pooled_output"] for c in conds])
            return [[ctx, extra]]
        latent = comfy.sample.fix_empty_latent_channels(patcher, torch.zeros(batch, 4, height // 8, width // 8))
        params = sum(p.numel() for p in patcher.model.diffusion_model.parameters()) / 1e6
        return Subject(os.path.basename(model), f"checkpoint {os.path.basename(model)}", patcher, enc(prompts),
                       enc([""] * batch), latent, lambda x: x, True, round(params, 1),
                       ["fidelity on the sampled latents (no VAE decode)"])
    from .models import build
    bm = build(model, device=device, dtype=dtype)
    pos, neg = bm.cond(1, batch, width, height), bm.cond(2, batch, width, height)
    return Subject(model, bm.spec.label + " (random weights)", bm.patcher, pos, neg, bm.latent(width, height, batch),
                   lambda x: x, False, round(bm.params / 1e6, 1), [])


# ------------------------------------------------------------------------------------------------
# the run
# ------------------------------------------------------------------------------------------------
@dataclass
class SuiteOptions:
    model: str = "fixture"
    width: int = 0                   # 0: the model's default (fixture 128, sd15 512, sdxl 1024)
    height: int = 0
    batch: int = 0                   # 0: the model's default (fixture 4 = one sample per prompt, others 1)
    steps: int = 20
    sampler: str = "euler"
    scheduler: str = "normal"
    cfg: float = 0.0                 # 0: the model's default (fixture 5, others 7)
    rows: Optional[list] = None      # row names (baseline always included); None = all
    fewer_steps: Optional[list] = None
    repeats: int = 0                 # 0: as many rounds as fit budget_s (at least 1, at most max_repeats)
    max_repeats: int = 5
    budget_s: float = 360.0
    device: str = "auto"
    dtype: str = "auto"
    attention: str = "default"       # "default" (ComfyUI's choice) or "pytorch" (set before the host loads)
    seed: int = 0
    warmup_steps: int = 2            # the warm-up round samples every row with this many steps (not timed)


DEFAULT_SIZE = {"fixture": 128, "sd15": 512, "sdxl": 1024}


def resolve(opts: SuiteOptions) -> SuiteOptions:
    size = DEFAULT_SIZE.get(opts.model, 512)
    w = opts.width or size
    h = opts.height or size
    cfg = opts.cfg or (5.0 if opts.model == "fixture" else 7.0)
    batch = opts.batch or (len(FIXTURE_PROMPTS) if opts.model == "fixture" else 1)
    return SuiteOptions(**{**opts.__dict__, "width": w, "height": h, "cfg": cfg, "batch": batch})


def row_stats(model, keys: tuple) -> tuple[dict, str]:
    """The FreeSpeed stats of a row's MODEL after a run, and their readout line(s)."""
    from comfyui_freespeed.nodes.readout import readout

    from .instrument import find_technique
    stats, lines = {}, []
    for key in keys:
        tech = find_technique(model, key)
        if tech is None or not tech.last_stats:
            continue
        stats[key] = dict(tech.last_stats)
        try:
            lines.append(readout(tech.last_stats))
        except Exception:
            lines.append(tech.name)
    return stats, " | ".join(lines)


def run_suite(opts: SuiteOptions, t_start: Optional[float] = None, subject: Optional[Subject] = None) -> dict:
    """Run the benchmark; returns the result document (see :mod:`bench.suite_report`)."""
    import torch

    import comfy.sample
    from comfyui_freespeed.core import measure

    from .speed import environment, resolve_device
    from .models import resolve_dtype

    t_start = t_start or time.perf_counter()
    opts = resolve(opts)
    device = resolve_device(opts.device)
    dtype = resolve_dtype(opts.dtype, device)
    sub = subject or build_subject(opts.model, opts.width, opts.height, opts.batch, device, dtype)
    rows = select_rows(opts.rows, opts.steps, opts.fewer_steps)
    models = {}
    for r in rows:
        try:
            models[r.name] = r.apply(sub.patcher)
        except Exception as e:  # a technique that refuses the model: a row with the reason, not a crash
            log.warning("row %s: %s", r.name, e)
            models[r.name] = e
    noise = comfy.sample.prepare_noise(sub.latent, opts.seed)
    cuda = device.type == "cuda"

    def sample(r: Row, steps: Optional[int] = None):
        m = models[r.name]
        steps = steps or r.steps or opts.steps
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        with torch.inference_mode():
            out = comfy.sample.sample(m, noise, steps, opts.cfg, opts.sampler, opts.scheduler, sub.positive,
                                      sub.negative, sub.latent, denoise=1.0, seed=opts.seed, disable_pbar=True)
        if cuda:
            torch.cuda.synchronize()
        secs = time.perf_counter() - t0
        peak = torch.cuda.max_memory_allocated() / 2 ** 20 if cuda else None
        return out, secs, peak

    live = [r for r in rows if not isinstance(models[r.name], Exception)]
    times: dict[str, list[float]] = {r.name: [] for r in rows}
    outputs, peaks, stats, readouts = {}, {}, {}, {}

    def fail(r: Row, e: Exception) -> None:   # a row that raises: reported with the reason, the others go on
        log.warning("row %s failed: %s", r.name, e)
        models[r.name] = e

    # short warm-up round (loads the model, fills allocator caches); not timed
    t_round = time.perf_counter()
    for r in live:
        try:
            sample(r, steps=max(1, min(opts.warmup_steps, r.steps or opts.steps)))
        except Exception as e:
            fail(r, e)
    live = [r for r in live if not isinstance(models[r.name], Exception)]
    log.info("warm-up round (%d steps): %d rows in %.1f s", opts.warmup_steps, len(live), time.perf_counter() - t_round)
    rounds, round_s = 0, 0.0
    while live:
        if opts.repeats:
            if rounds >= opts.repeats:
                break
        else:
            elapsed = time.perf_counter() - t_start
            if rounds >= 1 and (rounds >= opts.max_repeats or elapsed + round_s > opts.budget_s):
                break
        t_round = time.perf_counter()
        order = live[rounds % len(live):] + live[:rounds % len(live)]      # rotate: no row always first
        for r in order:
            try:
                out, secs, peak = sample(r)
            except Exception as e:
                fail(r, e)
                continue
            times[r.name].append(secs)
            if r.name not in outputs:     # the first timed run gives the fidelity output, peak and stats
                outputs[r.name] = out.float().cpu()  # (FreeSpeed's runs are deterministic from the seed;
                #  ToMe's merge uses the global RNG, so its PSNR varies between runs)
                peaks[r.name] = peak
                stats[r.name], readouts[r.name] = row_stats(models[r.name], r.keys)
        live = [r for r in live if not isinstance(models[r.name], Exception)]
        round_s = time.perf_counter() - t_round
        rounds += 1
        log.info("round %d: %.1f s", rounds, round_s)
    if "baseline" not in outputs:
        raise RuntimeError(f"the baseline row failed: {models['baseline']}")

    ref = sub.to_image(outputs["baseline"])
    base_med = measure.median(times["baseline"])
    doc_rows = []
    for r in rows:
        e = models[r.name]
        rec: dict[str, Any] = {"name": r.name, "label": r.label, "kind": r.kind, "steps": r.steps or opts.steps}
        if isinstance(e, Exception):
            rec["error"] = str(e)
            doc_rows.append(rec)
            continue
        img = sub.to_image(outputs[r.name])
        med = measure.median(times[r.name])
        rec.update({
            "times_s": [round(t, 4) for t in times[r.name]], "median_s": round(med, 4),
            "ratio": round(base_med / med, 3),
            "psnr_db": measure.psnr(img, ref), "ssim": round(measure.ssim(img, ref), 4),
            "peak_mem_mb": None if peaks.get(r.name) is None else round(peaks[r.name], 1),
            "readout": readouts.get(r.name, ""), "stats": stats.get(r.name, {}),
        })
        if math.isfinite(rec["psnr_db"]):
            rec["psnr_db"] = round(rec["psnr_db"], 2)
        doc_rows.append(rec)
    compare_with_fewer_steps(doc_rows)
    return {
        "kind": "freespeed-bench-suite", "version": 1,
        "environment": {**environment(device), "torch_threads": torch.get_num_threads(),
                        "cpu": platform.processor() or platform.machine()},
        "config": {"model": sub.name, "model_label": sub.label, "params_m": sub.params_m, "width": opts.width,
                   "height": opts.height, "latent": list(sub.latent.shape), "batch": opts.batch, "steps": opts.steps,
                   "sampler": opts.sampler, "scheduler": opts.scheduler, "cfg": opts.cfg, "seed": opts.seed,
                   "attention": opts.attention, "dtype": str(dtype).replace("torch.", ""), "rounds": rounds,
                   "fidelity_meaningful": sub.fidelity_meaningful},
        "notes": list(sub.notes),
        "rows": doc_rows,
        "wall_s": round(time.perf_counter() - t_start, 1),
    }


def compare_with_fewer_steps(rows: list[dict]) -> None:
    """Add to every accelerated row the fewer-steps run it must beat (same or lower wall time) and
    whether its PSNR is higher (``beats_fewer_steps``); pure, on a list of row records."""
    from comfyui_freespeed.core import measure
    # the baseline itself is the top of the curve: a row slower than it is compared with it
    fewer = [r for r in rows if r.get("kind") in ("fewer_steps", "baseline") and "median_s" in r]
    step_times = {r["steps"]: r["median_s"] for r in fewer}
    by_steps = {r["steps"]: r for r in fewer}
    for r in rows:
        if r.get("kind") in ("baseline", "fewer_steps") or "median_s" not in r or len(fewer) < 2:
            continue
        s = measure.match_fewer_steps(step_times, r["median_s"])
        if s is None:
            r["fewer_steps_match"] = None
            r["beats_fewer_steps"] = None             # faster than every fewer-steps run measured
            continue
        m = by_steps[s]
        r["fewer_steps_match"] = {"steps": s, "median_s": m["median_s"], "psnr_db": m["psnr_db"],
                                  "baseline": m["kind"] == "baseline"}
        r["beats_fewer_steps"] = bool(r["psnr_db"] > m["psnr_db"]) if m["kind"] == "fewer_steps" else False


__all__ = ["Row", "SuiteOptions", "technique_rows", "select_rows", "run_suite",
           "compare_with_fewer_steps", "build_subject"]
