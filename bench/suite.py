"""The benchmark's main job: every FreeSpeed node, a stacked preset, fewer-steps runs and ComfyUI's
built-in peers, timed side by side and judged on two axes against the full run.

1. The subject: a fixture trained here (``fixture``, ``fixture-sdxl``, ``fixture-flux``,
   ``fixture-pixart``: :mod:`bench.fixtures`; its bench set of prompts x seeds, per-sample noise),
   a full-size architecture with random weights (``sd15``, ``sdxl``: speed only) or a checkpoint.
2. One MODEL per row through the pack's own node code (or the peer node's ``execute``): ``baseline``,
   each FreeSpeed node at its defaults, ``stacked``, the baseline with fewer steps (the fair
   comparison), peers (TomePatchModel, HyperTile, EasyCache).
3. :func:`measure`: the pack's rounds engine (``core.measure.timed_rounds``): a warm-up round, then
   interleaved rounds fitted to ``budget_s``; the first timed round gives the outputs (runs are
   deterministic from the noise).
4. Per row: ratio against the baseline (with the range of the per-round paired ratios), closeness
   (PSNR/SSIM against the full run), quality where the subject has ground truth (prompt accuracy and
   fixture FD, :mod:`bench.fixtures.quality`), and the fewer-steps run of equal wall time with the
   verdict on both axes (:func:`verdicts`).  Fixtures also report their realism figures
   (``fixture_checks``).
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

REAL_PROMPTS = ("a photo of a red fox in the snow, detailed fur", "a watercolor landscape with mountains and a lake",
                "a portrait of an old fisherman, studio lighting", "a bowl of fruit on a wooden table")
ACCURACY_SLACK = 0.02        # a quality verdict allows this much lower prompt accuracy than the fewer-steps run


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


def technique(key: str, **settings):
    """The row function of technique ``key`` (its node's defaults, ``settings`` overriding them)."""
    def apply(m):
        from comfyui_freespeed.nodes import registry
        return registry.apply(key, m, registry.config(key, **settings) if settings else None)
    return apply


STACKED = ("todo", "tgate", "encprop")        # the stacked preset: ToDo + T-GATE + Encoder Propagation


def _stacked(m):
    for key in STACKED:
        m = technique(key)(m)
    return m


def _peer(module: str, cls: str, **kw):
    def apply(m):
        from comfyui_freespeed.nodes.builtins import run_model_node
        return run_model_node(module, cls, m, **kw)
    return apply


PEERS = (
    Row("tome", "ComfyUI TomePatchModel (0.3)", "peer", _peer("comfy_extras.nodes_tomesd", "TomePatchModel", ratio=0.3)),
    Row("hypertile", "ComfyUI HyperTile (defaults)", "peer",
        _peer("comfy_extras.nodes_hypertile", "HyperTile", tile_size=256, swap_size=2, max_depth=0, scale_depth=False)),
    Row("easycache", "ComfyUI EasyCache (defaults)", "peer",
        _peer("comfy_extras.nodes_easycache", "EasyCacheNode", reuse_threshold=0.2, start_percent=0.15,
              end_percent=0.95, verbose=False)),
)


def technique_rows() -> list[Row]:
    from comfyui_freespeed.core.techniques import BY_KEY, TECHNIQUES
    rows = [Row("baseline", "baseline", "baseline", lambda m: m.clone())]
    rows += [Row(t.key, t.label, "freespeed", technique(t.key), (t.wrapper_key,)) for t in TECHNIQUES]
    rows.append(Row("stacked", "stacked: " + " + ".join(BY_KEY[k].label.replace("FreeSpeed ", "") for k in STACKED),
                    "stacked", _stacked, tuple(BY_KEY[k].wrapper_key for k in STACKED)))
    return rows + list(PEERS)


def row_names() -> list[str]:
    return [r.name for r in technique_rows() if r.name != "baseline"]


def fewer_steps_rows(steps: int, counts: Optional[list] = None) -> list[Row]:
    """The fewer-steps curve: 6 counts from steps/4 to steps-1, plus half the steps (a realism figure)."""
    from comfyui_freespeed.core.measure import fewer_steps_counts
    if counts is None:
        counts = sorted(set(fewer_steps_counts(steps)) | ({steps // 2} if steps >= 4 else set()))
    counts = sorted({int(s) for s in counts if 0 < int(s) < steps})
    return [Row(f"steps{s}", f"baseline, {s} steps", "fewer_steps", lambda m: m.clone(), (), s) for s in counts]


def select_rows(names: Optional[list[str]], steps: int, fewer: Optional[list[int]]) -> list[Row]:
    rows = technique_rows()
    known = {r.name: r for r in rows}
    if names:
        bad = [n for n in names if n not in known]
        if bad:
            raise ValueError(f"unknown row(s) {', '.join(bad)}; known: {', '.join(known)}")
        rows = [known["baseline"]] + [known[n] for n in names if n != "baseline"]
    return rows + fewer_steps_rows(steps, fewer)


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
    noise: Any = None                # per-sample noise (fixtures); None: prepare_noise(latent, seed)
    prompts: Optional[list] = None   # the prompt of each sample (fixtures: quality metrics)
    fixture: Any = None              # bench.fixtures.families.Fixture
    defaults: dict = field(default_factory=dict)     # steps / cfg / sampler / scheduler of this subject


def is_fixture(model: str) -> bool:
    from .fixtures.families import FIXTURES
    return model in FIXTURES


def build_subject(model: str, width: int, height: int, batch: int, device, dtype) -> Subject:
    import torch

    import comfy.sample
    if is_fixture(model):
        from .fixtures.families import load_fixture
        fx = load_fixture(model, device=device)
        prompts, seeds = fx.bench_set()
        batch = batch or FIXTURE_BATCH
        if batch < len(prompts):      # every prompt's first seeds first: all prompts stay covered
            spp = prompts.count(prompts[0])
            keep = sorted(sorted(range(len(prompts)), key=lambda i: (i % spp, i // spp))[:batch])
            prompts, seeds = [prompts[i] for i in keep], [seeds[i] for i in keep]
        n = len(prompts)
        return Subject(fx.name, fx.label, fx.patcher, fx.conditioning(prompts), fx.negative(n), fx.empty_latent(n),
                       fx.to_image, True, fx.params_m,
                       [f"{n} samples: {len(set(prompts))} bench prompts x {n // max(1, len(set(prompts)))} seeds"],
                       noise=fx.noise(seeds), prompts=list(prompts), fixture=fx,
                       defaults={"steps": fx.steps, "cfg": fx.cfg, "sampler": fx.sampler, "scheduler": fx.scheduler,
                                 "width": fx.size * 8, "height": fx.size * 8})
    batch = batch or 1
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
# options
# ------------------------------------------------------------------------------------------------
@dataclass
class SuiteOptions:
    model: str = "fixture"
    width: int = 0                   # 0: the model's default (fixtures: their own size, sd15 512, sdxl 1024)
    height: int = 0
    batch: int = 0                   # 0: the model's default (fixtures: FIXTURE_BATCH, others 1)
    steps: int = 0                   # 0: the model's default (20)
    sampler: str = ""                # "": the model's default (euler)
    scheduler: str = ""              # "": the model's default (normal)
    cfg: float = 0.0                 # 0: the model's default (fixtures: their own, others 7)
    rows: Optional[list] = None      # row names (baseline always included); None = all
    fewer_steps: Optional[list] = None
    repeats: int = 0                 # 0: as many rounds as fit budget_s (at least 1, at most max_repeats)
    max_repeats: int = 5
    budget_s: float = 480.0
    device: str = "auto"
    dtype: str = "auto"
    attention: str = "default"       # "default" (ComfyUI's choice) or "pytorch" (set before the host loads)
    seed: int = 0
    warmup_steps: int = 2            # the warm-up round samples every row with this many steps (not timed)


DEFAULT_SIZE = {"sd15": 512, "sdxl": 1024}
FIXTURE_BATCH = 32      # fixtures: 16 bench prompts x 2 seeds (``--batch 64``: the whole bench set, 4 seeds)


def resolve(opts: SuiteOptions, sub: Optional[Subject] = None) -> SuiteOptions:
    d = dict(sub.defaults) if sub is not None else {}
    size = DEFAULT_SIZE.get(opts.model, 512)
    return SuiteOptions(**{**opts.__dict__,
                           "width": d.get("width") or opts.width or size, "height": d.get("height") or opts.height or size,
                           "steps": opts.steps or d.get("steps", 20), "cfg": opts.cfg or d.get("cfg", 7.0),
                           "sampler": opts.sampler or d.get("sampler", "euler"),
                           "scheduler": opts.scheduler or d.get("scheduler", "normal"),
                           "batch": int(sub.latent.shape[0]) if sub is not None else (opts.batch or 1)})


def row_stats(model, keys: tuple) -> tuple[dict, str]:
    """The FreeSpeed stats of a row's MODEL after a run, and their readout line(s)."""
    from comfyui_freespeed.core.readout import readout
    from comfyui_freespeed.nodes.hooks import find
    stats, lines = {}, []
    for key in keys:
        tech = find(model, key)
        if tech is None or not tech.last_stats:
            continue
        stats[key] = dict(tech.last_stats)
        try:
            lines.append(readout(tech.last_stats))
        except Exception:
            lines.append(tech.name)
    return stats, " | ".join(lines)


# ------------------------------------------------------------------------------------------------
# measuring rows
# ------------------------------------------------------------------------------------------------
def measure(sub: Subject, rows: list[Row], opts: SuiteOptions, t_start: Optional[float] = None) -> tuple[list, int]:
    """Time and judge ``rows`` on ``sub`` (options resolved); returns (row records, rounds)."""
    import torch

    import comfy.sample
    from comfyui_freespeed.core import measure as M

    from .speed import resolve_device

    t_start = t_start or time.perf_counter()
    models = {}
    for r in rows:
        try:
            models[r.name] = r.apply(sub.patcher)
        except Exception as e:  # a technique that refuses the model: a row with the reason, not a crash
            log.warning("row %s: %s", r.name, e)
            models[r.name] = e
    noise = sub.noise if sub.noise is not None else comfy.sample.prepare_noise(sub.latent, opts.seed)
    cuda = resolve_device(opts.device).type == "cuda"

    def sample(r: Row, steps: int):
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        with torch.inference_mode():
            out = comfy.sample.sample(models[r.name], noise, steps, opts.cfg, opts.sampler, opts.scheduler,
                                      sub.positive, sub.negative, sub.latent, denoise=1.0, seed=opts.seed,
                                      disable_pbar=True)
        if cuda:
            torch.cuda.synchronize()
        return out, time.perf_counter() - t0, (torch.cuda.max_memory_allocated() / 2 ** 20 if cuda else None)

    live = {r.name: r for r in rows if not isinstance(models[r.name], Exception)}

    def run(name: str, warm: bool):
        r = live[name]
        steps = r.steps or opts.steps
        out, secs, peak = sample(r, max(1, min(opts.warmup_steps, steps)) if warm else steps)
        if warm:
            return None, secs
        stats, line = row_stats(models[name], r.keys)
        return (out.float().cpu(), peak, stats, line), secs

    res = M.timed_rounds(list(live), run, repeats=opts.repeats, max_rounds=opts.max_repeats, budget_s=opts.budget_s,
                         t_start=t_start, catch=True, on_round=lambda i, secs: log.info("round %d: %.1f s", i, secs))
    for name, e in res.failed.items():       # a row that raises: reported with the reason, the others go on
        log.warning("row %s failed: %s", name, e)
        models[name] = e
    log.info("%d interleaved rounds after a %.1f s warm-up", res.rounds, res.warmup_s)
    if "baseline" not in res.first:
        raise RuntimeError(f"the baseline row failed: {models['baseline']}")

    ref = sub.to_image(res.first["baseline"][0])
    base_times = res.times["baseline"]
    base_med = M.median(base_times)
    out_rows = []
    for r in rows:
        rec: dict[str, Any] = {"name": r.name, "label": r.label, "kind": r.kind, "steps": r.steps or opts.steps}
        if isinstance(models[r.name], Exception):
            rec["error"] = str(models[r.name])
            out_rows.append(rec)
            continue
        out, peak, stats, line = res.first[r.name]
        img = sub.to_image(out)
        times = res.times[r.name]
        med = M.median(times)
        paired = [b / t for b, t in zip(base_times, times)]        # per interleaved round
        p = M.psnr(img, ref)
        rec.update({"times_s": [round(t, 4) for t in times], "median_s": round(med, 4),
                    "ratio": round(base_med / med, 3),
                    "ratio_range": [round(min(paired), 3), round(max(paired), 3)] if len(paired) > 1 else None,
                    "psnr_db": round(p, 2) if math.isfinite(p) else p,
                    "ssim": round(M.ssim(_frames(img), _frames(ref)), 4),
                    "peak_mem_mb": None if peak is None else round(peak, 1), "readout": line, "stats": stats})
        if sub.prompts is not None:
            rec.update(quality(img, sub.prompts))
        rec["_image"] = img
        out_rows.append(rec)
    return out_rows, res.rounds


def _frames(x):
    """(B, C, T, H, W) video latents as (B*T, C, H, W) frames for SSIM; images unchanged."""
    return x.movedim(2, 1).flatten(0, 1) if x.ndim == 5 else x


def quality(images, prompts) -> dict:
    """Prompt accuracy and fixture FD (with its bootstrap spread) of one row's samples."""
    from .fixtures import quality as Q
    acc = Q.prompt_accuracy(images, prompts)
    fd = Q.fd(images, prompts)
    return {"prompt_accuracy": round(acc["accuracy"], 4), "fd": round(fd["fd"], 3), "fd_spread": round(fd["spread"], 3)}


def verdicts(rows: list[dict]) -> None:
    """Each accelerated row against the fewer-steps run of equal wall time (the one rule of
    ``core.measure.compare_with_fewer_steps``), on both axes:

    * ``beats_fewer_steps`` (closeness): higher PSNR against the full run;
    * ``beats_fewer_steps_quality``: lower fixture FD by more than the larger of the two FD spreads,
      with prompt accuracy no more than ``ACCURACY_SLACK`` below the fewer-steps run's.
    """
    from comfyui_freespeed.core import measure as M
    M.compare_with_fewer_steps(rows)
    if not any("fd" in r for r in rows):
        return
    M.compare_with_fewer_steps(rows, metric="fd", verdict_key="beats_fewer_steps_quality", higher_is_better=False)
    by_steps = {r["steps"]: r for r in rows if r.get("kind") in ("fewer_steps", "baseline") and "fd" in r}
    for r in rows:
        m = r.get("fewer_steps_match")
        if r.get("beats_fewer_steps_quality") is None or not m:
            continue
        other = by_steps.get(m["steps"])
        m["prompt_accuracy"], m["fd_spread"] = other.get("prompt_accuracy"), other.get("fd_spread")
        if r["beats_fewer_steps_quality"]:
            margin = max(r.get("fd_spread") or 0.0, other.get("fd_spread") or 0.0)
            r["beats_fewer_steps_quality"] = bool(
                r["fd"] + margin < other["fd"]
                and r.get("prompt_accuracy", 0.0) >= other.get("prompt_accuracy", 0.0) - ACCURACY_SLACK)


def fixture_checks(sub: Subject, rows: list[dict], opts: SuiteOptions) -> Optional[dict]:
    """The realism figures of a fixture subject, from the rows already sampled (the full and the
    half-steps run) plus one short self-attention entropy run."""
    if sub.fixture is None:
        return None
    from comfyui_freespeed.core import measure as M

    from .fixtures import realism
    by = {r["name"]: r for r in rows if "_image" in r}
    full, half = by.get("baseline"), by.get(f"steps{opts.steps // 2}")
    out = {"fixture": sub.name, "steps": opts.steps, "sampler": opts.sampler, "n_samples": len(sub.prompts)}
    if half is not None:
        out["half_steps_psnr_db"] = round(M.psnr(half["_image"], full["_image"]), 2)
    out["seed_diversity_psnr_db"] = round(realism.seed_diversity(full["_image"], sub.prompts), 2)
    out["prompt_accuracy"] = full.get("prompt_accuracy")
    try:
        firsts = sorted(set(sub.prompts), key=sub.prompts.index)[:4]
        out["self_attention_entropy"] = round(realism.self_attention_entropy(sub.fixture, firsts,
                                                                             list(range(len(firsts))), opts.steps), 4)
    except Exception as e:       # a figure that cannot be measured is reported missing, never a crash
        log.warning("self-attention entropy: %s", e)
    out["targets"] = {k: f"{op} {v:g}" for k, (op, v) in realism.TARGETS.items()}
    out["targets_met"] = {k: (out[k] <= v if op == "<=" else out[k] >= v)
                          for k, (op, v) in realism.TARGETS.items() if out.get(k) is not None}
    return out


# ------------------------------------------------------------------------------------------------
# the run
# ------------------------------------------------------------------------------------------------
def run_suite(opts: SuiteOptions, t_start: Optional[float] = None, subject: Optional[Subject] = None) -> dict:
    """Run the benchmark; returns the result document (see :mod:`bench.suite_report`)."""
    import torch

    from .models import resolve_dtype
    from .speed import environment, resolve_device

    t_start = t_start or time.perf_counter()
    device = resolve_device(opts.device)
    dtype = resolve_dtype(opts.dtype, device)
    pre = resolve(opts)
    sub = subject or build_subject(opts.model, pre.width, pre.height, opts.batch, device, dtype)
    opts = resolve(opts, sub)
    rows = select_rows(opts.rows, opts.steps, opts.fewer_steps)
    doc_rows, rounds = measure(sub, rows, opts, t_start)
    verdicts(doc_rows)
    checks = fixture_checks(sub, doc_rows, opts)
    for r in doc_rows:
        r.pop("_image", None)
    return {
        "kind": "freespeed-bench-suite", "version": 2,
        "environment": {**environment(device), "torch_threads": torch.get_num_threads(),
                        "cpu": platform.processor() or platform.machine()},
        "config": {"model": sub.name, "model_label": sub.label, "params_m": sub.params_m, "width": opts.width,
                   "height": opts.height, "latent": list(sub.latent.shape), "batch": opts.batch, "steps": opts.steps,
                   "sampler": opts.sampler, "scheduler": opts.scheduler, "cfg": opts.cfg, "seed": opts.seed,
                   "attention": opts.attention, "dtype": str(dtype).replace("torch.", ""), "rounds": rounds,
                   "fidelity_meaningful": sub.fidelity_meaningful, "quality": sub.prompts is not None},
        "fixture_checks": checks,
        "notes": list(sub.notes),
        "rows": doc_rows,
        "wall_s": round(time.perf_counter() - t_start, 1),
    }


__all__ = ["Row", "SuiteOptions", "technique_rows", "row_names", "select_rows", "fewer_steps_rows", "measure",
           "verdicts", "fixture_checks", "run_suite", "build_subject", "technique", "is_fixture"]
