"""The benchmark's main job: every FreeSpeed node, a stacked preset, fewer-steps runs and ComfyUI's
built-in peers, timed side by side and judged on two axes against the full run.

1. The subject: a fixture trained here (``fixture``, ``fixture-sdxl``, ``fixture-flux``,
   ``fixture-pixart``: :mod:`bench.fixtures`; its bench set of prompts x seeds, per-sample noise),
   a full-size architecture with random weights (``sd15``, ``sdxl``: speed only) or a checkpoint.
2. One MODEL per row through the pack's own node code (or the peer node's ``execute``): ``baseline``,
   each FreeSpeed node at its defaults, ``stacked``, the baseline with fewer steps (the fair
   comparison), peers (TomePatchModel, HyperTile, EasyCache).
3. :func:`measure`: a counted pass (each row's whole sampling run under ``core.flops.count_flops``:
   FLOPs per sample, and the outputs closeness and quality are measured on), then the pack's rounds
   engine (``core.measure.timed_rounds``): a 1-step warm-up and interleaved timed rounds (3 by default)
   of ``timing_batch`` samples.
4. Per row: counted FLOPs and wall time against the baseline (with the range of the per-round paired
   ratios), closeness (PSNR/SSIM against the full run), quality where the subject has ground truth
   (prompt accuracy and fixture FD, :mod:`bench.fixtures.quality`), and the fewer-steps run of equal cost
   with the verdict on both metrics (:func:`verdicts`): at equal counted FLOPs (deterministic) and, when
   the timing passes its self-check (``core.measure.timing_check``), at equal wall time ("inconclusive"
   otherwise).  Every row has the same keys (:data:`ROW_KEYS`).  Fixtures also report their realism
   figures (``fixture_checks``) and the report says first what the subject can judge (:func:`scope`).
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
    per_sample: bool = False                    # sampled one sample at a time (a peer that fails at batch > 1)


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
    # EasyCache fails at batch > 1 with CFG on the fixture (upstream: its cached residual keeps one
    # batch's shape): it runs one sample at a time, so it is in the table
    Row("easycache", "ComfyUI EasyCache (defaults, one sample at a time)", "peer",
        _peer("comfy_extras.nodes_easycache", "EasyCacheNode", reuse_threshold=0.2, start_percent=0.15,
              end_percent=0.95, verbose=False), per_sample=True),
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
                                 "width": fx.size * 8, "height": fx.size * 8, "timing_batch": FIXTURE_TIMING_BATCH})
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
    repeats: int = 3                 # 0: as many rounds as fit budget_s (at least 1, at most max_repeats)
    max_repeats: int = 5
    timing_batch: int = 0            # samples per timed run (0: the model's default: fixtures 1, others the batch)
    budget_s: float = 240.0
    device: str = "auto"
    dtype: str = "auto"
    attention: str = "default"       # "default" (ComfyUI's choice) or "pytorch" (set before the host loads)
    seed: int = 0
    warmup_steps: int = 1            # the warm-up round samples every row with this many steps (not timed)


DEFAULT_SIZE = {"sd15": 512, "sdxl": 1024}
FIXTURE_BATCH = 8       # fixtures: 8 bench prompts x 1 seed (``--batch 64``: the whole bench set, 16 prompts x 4 seeds)
FIXTURE_TIMING_BATCH = 1     # fixtures: samples per timed run (closeness and quality use the whole batch)


def resolve(opts: SuiteOptions, sub: Optional[Subject] = None) -> SuiteOptions:
    d = dict(sub.defaults) if sub is not None else {}
    size = DEFAULT_SIZE.get(opts.model, 512)
    return SuiteOptions(**{**opts.__dict__,
                           "width": d.get("width") or opts.width or size, "height": d.get("height") or opts.height or size,
                           "steps": opts.steps or d.get("steps", 20), "cfg": opts.cfg or d.get("cfg", 7.0),
                           "sampler": opts.sampler or d.get("sampler", "euler"),
                           "scheduler": opts.scheduler or d.get("scheduler", "normal"),
                           "batch": int(sub.latent.shape[0]) if sub is not None else (opts.batch or 1),
                           "timing_batch": opts.timing_batch or d.get("timing_batch", 0)})


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
ROW_KEYS = ("name", "label", "kind", "steps", "flops", "flops_ratio", "times_s", "median_s", "time_ratio",
            "time_ratio_range", "psnr", "ssim", "prompt_accuracy", "fd", "fd_spread", "peak_mem_mb", "match_flops",
            "match_time", "verdict_flops", "verdict_time", "beats_fewer_steps", "beats_fewer_steps_quality",
            "beats_fewer_steps_time", "beats_fewer_steps_quality_time", "readout", "stats", "error")
"""One schema for every row of ``suite.json`` (FreeSpeed, peers, baseline, fewer steps); a value that does
not apply is null.  ``flops``: counted FLOPs per sample over the whole sampling run; ``*_ratio``: baseline /
row (> 1: cheaper); ``beats_fewer_steps`` / ``_quality``: at equal counted FLOPs (deterministic);
``*_time``: at equal wall time (null when the timing is inconclusive)."""


def _cond_part(cond: list, i: int, n: int, batch: int) -> list:
    """Samples i..i+n-1 of a batched CONDITIONING (tensors whose first dimension is the batch are sliced)."""
    import torch

    def cut(v):
        return v[i:i + n] if torch.is_tensor(v) and v.ndim and v.shape[0] == batch else v
    return [[cut(c), {k: cut(v) for k, v in extra.items()}] for c, extra in cond]


def measure(sub: Subject, rows: list[Row], opts: SuiteOptions, t_start: Optional[float] = None) -> tuple[list, int]:
    """Count, judge and time ``rows`` on ``sub`` (options resolved); returns (row records, rounds).

    1. The counted pass (untimed): each row samples the whole batch once under
       :func:`comfyui_freespeed.core.flops.count_flops` -- its FLOPs per sample (every sample counted:
       no assumption that a technique costs the same on every prompt) and the outputs closeness and
       quality are measured on; the FreeSpeed stats come from this run.
    2. The timed rounds (``core.measure.timed_rounds``): a 1-step warm-up, then interleaved rounds of the
       first ``opts.timing_batch`` samples (the counter slows execution, so timing is a separate pass).
    """
    import torch

    import comfy.sample
    from comfyui_freespeed.core import measure as M
    from comfyui_freespeed.core.flops import count_flops

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
    batch = int(sub.latent.shape[0])
    tb = max(1, min(opts.timing_batch or batch, batch))
    cuda = resolve_device(opts.device).type == "cuda"

    def one(model, steps: int, i: int, n: int):
        """One sampling run of samples i..i+n-1; the global RNG is seeded first so that a peer drawing
        random numbers (ToMe's merge) is deterministic."""
        torch.manual_seed(opts.seed)
        pos, neg = _cond_part(sub.positive, i, n, batch), _cond_part(sub.negative, i, n, batch)
        return comfy.sample.sample(model, noise[i:i + n], steps, opts.cfg, opts.sampler, opts.scheduler, pos, neg,
                                   sub.latent[i:i + n], denoise=1.0, seed=opts.seed, disable_pbar=True)

    def sample(r: Row, steps: int, n: int):
        """The first ``n`` samples (a per-sample row: one run per sample)."""
        with torch.inference_mode():
            if r.per_sample and n > 1:
                return torch.cat([one(models[r.name], steps, i, 1) for i in range(n)])
            return one(models[r.name], steps, 0, n)

    live = {r.name: r for r in rows if not isinstance(models[r.name], Exception)}

    counted: dict[str, tuple] = {}
    t0 = time.perf_counter()
    for name, r in list(live.items()):
        try:
            if cuda:
                torch.cuda.reset_peak_memory_stats()
            out, flops = count_flops(sample, r, r.steps or opts.steps, batch)
        except Exception as e:      # a row that raises: reported with the reason, the others go on
            log.warning("row %s failed: %s", name, e)
            models[name] = e
            live.pop(name)
            continue
        peak = torch.cuda.max_memory_allocated() / 2 ** 20 if cuda else None
        counted[name] = (out.float().cpu(), flops / batch, peak, *row_stats(models[name], r.keys))
    log.info("counted pass (%d samples per row): %.1f s", batch, time.perf_counter() - t0)
    if "baseline" not in counted:
        raise RuntimeError(f"the baseline row failed: {models['baseline']}")

    def run(name: str, warm: bool):
        r = live[name]
        steps = r.steps or opts.steps
        if cuda:
            torch.cuda.synchronize()
        t = time.perf_counter()
        sample(r, max(1, min(opts.warmup_steps, steps)) if warm else steps, tb)
        if cuda:
            torch.cuda.synchronize()
        return None, time.perf_counter() - t

    res = M.timed_rounds(list(live), run, repeats=opts.repeats, max_rounds=opts.max_repeats, budget_s=opts.budget_s,
                         t_start=t_start, catch=True, on_round=lambda i, secs: log.info("round %d: %.1f s", i, secs))
    for name, e in res.failed.items():
        log.warning("row %s failed while timed: %s", name, e)
    log.info("%d interleaved rounds of %d sample(s) after a %.1f s warm-up", res.rounds, tb, res.warmup_s)

    ref = sub.to_image(counted["baseline"][0])
    base_times = res.times.get("baseline") or []
    base_med = M.median(base_times) if base_times else None
    base_flops = counted["baseline"][1]
    out_rows = []
    for r in rows:
        rec: dict[str, Any] = dict.fromkeys(ROW_KEYS)
        rec.update({"name": r.name, "label": r.label, "kind": r.kind, "steps": r.steps or opts.steps})
        if isinstance(models[r.name], Exception):
            rec["error"] = str(models[r.name])
            out_rows.append(rec)
            continue
        out, f, peak, stats, line = counted[r.name]
        img = sub.to_image(out)
        p = M.psnr(img, ref)
        rec.update({"flops": int(round(f)), "flops_ratio": round(base_flops / f, 3) if f else None,
                    "psnr": round(p, 2) if math.isfinite(p) else p,
                    "ssim": round(M.ssim(_frames(img), _frames(ref)), 4),
                    "peak_mem_mb": None if peak is None else round(peak, 1), "readout": line, "stats": stats})
        times = res.times.get(r.name) or []
        if r.name in res.failed:
            rec["error"] = f"failed while timed: {res.failed[r.name]}"
        elif times and base_med:
            med = M.median(times)
            paired = [b / t for b, t in zip(base_times, times)]        # per interleaved round
            rec.update({"times_s": [round(t, 4) for t in times], "median_s": round(med, 4),
                        "time_ratio": round(base_med / med, 3),
                        "time_ratio_range": [round(min(paired), 3), round(max(paired), 3)] if len(paired) > 1 else None})
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


AXES = (("flops", "flops", ""), ("time", "median_s", "_time"))     # (axis, cost key, verdict-key suffix)


def verdicts(rows: list[dict], timing_ok: bool = True) -> None:
    """Each accelerated row against the fewer-steps run of equal cost (the one rule of
    ``core.measure.compare_with_fewer_steps``: the largest step count not costlier than the row), on two
    cost axes -- counted FLOPs (``match_flops``, ``beats_fewer_steps*``: the same on any machine) and wall
    time (``match_time``, ``beats_fewer_steps*_time``; only when ``timing_ok``) -- and two metrics:

    * closeness (``beats_fewer_steps``): higher PSNR against the full run;
    * quality (``beats_fewer_steps_quality``): lower fixture FD by more than the larger of the two FD
      spreads, with prompt accuracy no more than ``ACCURACY_SLACK`` below the fewer-steps run's.

    ``verdict_flops`` / ``verdict_time`` say it in words (``verdict_time``: ``"inconclusive"`` when the
    timing failed its self-check)."""
    from comfyui_freespeed.core import measure as M
    for axis, cost, sfx in AXES:
        if axis == "time" and not timing_ok:
            continue
        match = f"match_{axis}"
        M.compare_with_fewer_steps(rows, metric="psnr", verdict_key="beats_fewer_steps" + sfx, cost_key=cost,
                                   match_key=match)
        if not any(r.get("fd") is not None for r in rows):
            continue
        qkey = "beats_fewer_steps_quality" + sfx
        M.compare_with_fewer_steps(rows, metric="fd", verdict_key=qkey, higher_is_better=False, cost_key=cost,
                                   match_key=match)
        by_steps = {r["steps"]: r for r in rows if r.get("kind") in M.CURVE_KINDS and r.get("fd") is not None}
        for r in rows:
            m = r.get(match)
            if r.get(qkey) is None or not m:
                continue
            other = by_steps.get(m["steps"])
            m["prompt_accuracy"], m["fd_spread"] = other.get("prompt_accuracy"), other.get("fd_spread")
            if r[qkey]:
                margin = max(r.get("fd_spread") or 0.0, other.get("fd_spread") or 0.0)
                r[qkey] = bool(r["fd"] + margin < other["fd"]
                               and (r.get("prompt_accuracy") or 0.0) >= (other.get("prompt_accuracy") or 0.0) - ACCURACY_SLACK)
    curve = {axis: sum(1 for r in rows if r.get("kind") in M.CURVE_KINDS and r.get(cost) is not None) >= 2
             for axis, cost, _ in AXES}
    for r in rows:
        if r.get("kind") in M.CURVE_KINDS or r.get("error"):
            continue
        r["verdict_flops"] = verdict_text(r, "flops") if curve["flops"] else "no fewer-steps runs to compare with"
        r["verdict_time"] = ("inconclusive" if not timing_ok else
                             verdict_text(r, "time") if curve["time"] else "no fewer-steps runs to compare with")


def verdict_text(r: dict, axis: str) -> str:
    """A row's verdict on one cost axis in words (the same words in the JSON, the tables and the README)."""
    m, sfx = r.get(f"match_{axis}"), dict((a, x) for a, _, x in AXES)[axis]
    if m is None:
        return "cheaper than every fewer-steps run"
    if m.get("baseline"):
        return "not cheaper than the full run"
    word = {True: "better", False: "worse", None: "?"}
    text = f"vs {m['steps']} steps: closeness {word[r.get('beats_fewer_steps' + sfx)]}"
    q = r.get("beats_fewer_steps_quality" + sfx)
    if q is not None:
        text += f", quality {'better' if q else 'not better'}"
    return text


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
    if len(set(sub.prompts)) < len(sub.prompts):      # seed diversity needs a prompt with two seeds
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


def scope(sub: Subject, checks: Optional[dict]) -> list[str]:
    """What this run can and cannot judge (the report's first lines)."""
    if sub.fixture is not None:
        met = (checks or {}).get("targets_met", {})
        missed = [k for k, ok in met.items() if not ok]
        if missed or not met:
            return [f"This fixture misses {len(missed)} of the {len(met)} realism targets measured ({', '.join(missed)}): its "
                    "verdicts against fewer steps are statements about this toy model, not about SD1.5, SDXL or Flux.",
                    "To measure a real model, run the FreeSpeed Benchmark node on your checkpoint in ComfyUI "
                    "(next: FreeSpeed Auto).",
                    "It can judge: counted FLOPs (exact, any machine), that a node runs and what it changes, and "
                    "closeness to the full run on this toy."]
        return ["This fixture meets its realism targets; its verdicts are still about this small model: confirm "
                "on a real checkpoint with the FreeSpeed Benchmark node."]
    if not sub.fidelity_meaningful:
        return ["Random weights: counted FLOPs and wall time only; closeness and quality are not meaningful "
                "(use a fixture or a checkpoint)."]
    return [f"A real checkpoint ({sub.label}): the verdicts are about it at these settings and on this device."]


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
    from comfyui_freespeed.core.measure import timing_check
    timing_ok, why = timing_check(doc_rows)
    if not timing_ok:
        log.warning("timing inconclusive: %s", why)
    verdicts(doc_rows, timing_ok)
    checks = fixture_checks(sub, doc_rows, opts)
    for r in doc_rows:
        r.pop("_image", None)
    return {
        "kind": "freespeed-bench-suite", "version": 3,
        "scope": scope(sub, checks),
        "timing": {"ok": timing_ok, "why": why, "rounds": rounds, "batch": max(1, min(opts.timing_batch or opts.batch,
                                                                                      opts.batch))},
        "environment": {**environment(device), "torch_threads": torch.get_num_threads(),
                        "cpu": platform.processor() or platform.machine()},
        "config": {"model": sub.name, "model_label": sub.label, "params_m": sub.params_m, "width": opts.width,
                   "height": opts.height, "latent": list(sub.latent.shape), "batch": opts.batch, "steps": opts.steps,
                   "sampler": opts.sampler, "scheduler": opts.scheduler, "cfg": opts.cfg, "seed": opts.seed,
                   "attention": opts.attention, "dtype": str(dtype).replace("torch.", ""), "rounds": rounds,
                   "timing_batch": max(1, min(opts.timing_batch or opts.batch, opts.batch)),
                   "fidelity_meaningful": sub.fidelity_meaningful, "quality": sub.prompts is not None},
        "fixture_checks": checks,
        "notes": list(sub.notes),
        "rows": doc_rows,
        "wall_s": round(time.perf_counter() - t_start, 1),
    }


__all__ = ["ROW_KEYS", "scope", "Row", "SuiteOptions", "technique_rows", "row_names", "select_rows", "fewer_steps_rows", "measure",
           "verdicts", "fixture_checks", "run_suite", "build_subject", "technique", "is_fixture"]
