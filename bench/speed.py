"""Speed of a technique against the unpatched model, per attention kernel, in one process.

What is measured
----------------
For each attention kernel (``pytorch`` = ComfyUI's SDPA path, ``--use-pytorch-cross-attention``;
``sub_quad`` = ComfyUI's CPU default), two clones of one randomly initialised model are sampled
with ``comfy.sample.sample`` (what KSampler runs): the *base* clone and the clone the technique's
node code patched.  The default is one sampling step with CFG > 1, i.e. exactly **one model
evaluation = one UNet forward of batch 2** (cond + uncond); ``--steps`` measures whole runs.
Sampling (rather than calling the UNet) is what makes the technique's hooks fire: ToDo's
OUTER_SAMPLE wrapper creates its run state, its attn1 patch does nothing outside a run.

* **model time** — the time inside the UNet forward(s) of a run (a DIFFUSION_MODEL wrapper; device
  synchronised on CUDA).  The *measured ratio* is ``median(base) / median(patched)`` over
  interleaved runs (base, patched, base, patched, …) after a warm-up; the end-to-end sampling wall
  time ratio is reported beside it.
* **attention share** — the time of the attention kernel calls inside the base forward, over the
  forward time: of *all* attention calls, and of the calls the technique touches (ToDo: the
  self-attention calls at its attention level; SD1.5 level 1 = input 1, 2 and output 9, 10, 11).
* **ideal ratio** — ``T / (T − A_sel + A_sel / f²)``: what the ratio would be if the touched calls
  became ``f²`` times cheaper (attention cost ∝ Nq·Nk) and nothing else changed; the measured ratio
  is also given as a fraction of it.

Checks made on every run (a failed check stops the bench): every attention call of every forward
ran through the chosen kernel, the patched run really applied the technique (ToDo: its
``downsampled_calls`` > 0), and the UNet batch is noted (cond/uncond may be split by ComfyUI when
memory is short).
"""
from __future__ import annotations

import logging
import os
import platform
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable, Optional

import torch

from comfyui_freespeed.core import measure

from . import timing
from .instrument import Instrument, count_attention_modules
from .models import SPECS, BenchModel, build, resolve_dtype
from .results import KERNEL_LABELS, document, summarize_kernel

logger = logging.getLogger("FreeSpeed.bench")

KERNELS = ("pytorch", "sub_quad")
WARMUP_RESOLUTION = 128       # pixels, for warmup="small" (first-call costs, not shape-specific tuning)


class BenchError(RuntimeError):
    """A check failed: the measurement would not mean what it says."""


# ------------------------------------------------------------------------------------------------
# what the kernel measurement knows of a technique (ToDo only: it shrinks K/V of chosen calls)
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TechniqueOptions:
    factor: float = 2.0          # ToDo: K/V downsampling factor per side
    level: int = 1               # ToDo: attention level it is applied at (1 = highest resolution)
    method: str = "nearest"      # ToDo: downsampling method


def todo_factors(level: int, factor: float) -> tuple:
    """ToDoConfig.factors with ``factor`` at attention ``level`` and 1 (off) at the other levels."""
    if level < 1:
        raise ValueError("level must be >= 1")
    return tuple(float(factor) if i == level - 1 else 1.0 for i in range(max(level, 2)))


@dataclass(frozen=True)
class SpeedSpec:
    key: str                                        # core.techniques key
    describe: Callable[[TechniqueOptions], str]
    settings: Callable[[TechniqueOptions], dict]    # options -> the technique's config fields
    # (ModelInfo, options) -> predicate on instrument.AttnCall: the calls the technique shrinks
    selector: Callable[[Any, TechniqueOptions], Callable[[Any], bool]]
    factor: Callable[[TechniqueOptions], float]     # per-side K/V reduction f (cost ∝ Nq·Nk: at best f² cheaper)
    check: Callable[[dict], Optional[str]]          # stats -> a problem if the run shows it did nothing

    def apply(self, model, opts: TechniqueOptions):
        from comfyui_freespeed.nodes import registry
        return registry.apply(self.key, model, registry.config(self.key, **self.settings(opts)))


def _todo_check(stats: dict) -> Optional[str]:
    if not stats:
        return "ToDo recorded no run (its OUTER_SAMPLE wrapper did not fire)"
    if not stats.get("downsampled_calls"):
        return f"ToDo downsampled no self-attention call (stats: {stats})"
    return None


SPEED_SPECS: dict[str, SpeedSpec] = {
    "todo": SpeedSpec(
        "todo", describe=lambda o: f"ToDo factor {o.factor:g} at attention level {o.level} ({o.method})",
        settings=lambda o: {"factors": todo_factors(o.level, o.factor), "method": o.method},
        selector=lambda info, o: (lambda call: call.kind == "self" and call.block is not None
                                  and info.attention_level(call.block) == o.level),
        factor=lambda o: float(o.factor), check=_todo_check),
}


@dataclass
class SpeedOptions:
    model: str = "sd15"
    width: int = 1024
    height: int = 1024
    batch: int = 1                 # latent batch; the UNet batch is 2x with CFG
    steps: int = 1
    sampler: str = "euler"
    scheduler: str = "normal"
    cfg: float = 7.0
    technique: str = "todo"
    factor: float = 2.0
    level: int = 1
    method: str = "nearest"
    kernels: tuple = KERNELS
    repeats: int = 0               # interleaved rounds; 0 = as many as fit in budget_s (1..max_repeats)
    max_repeats: int = 5
    budget_s: Optional[float] = 420.0
    warmup: str = "auto"           # "full" | "small" | "none" | "auto" (full on CUDA, small on CPU)
    device: str = "auto"
    dtype: str = "auto"
    seed: int = 0

    def technique_options(self) -> TechniqueOptions:
        return TechniqueOptions(factor=self.factor, level=self.level, method=self.method)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def resolve_warmup(name: str, device: torch.device) -> str:
    if name == "auto":
        return "full" if device.type == "cuda" else "small"
    if name not in ("full", "small", "none"):
        raise ValueError(f"unknown warm-up mode {name!r}")
    return name


def expected_unet_batch(batch: int, cfg: float) -> int:
    """UNet batch of one evaluation when ComfyUI batches cond and uncond together."""
    return batch * (2 if cfg != 1.0 else 1)


# ------------------------------------------------------------------------------------------------
# one run
# ------------------------------------------------------------------------------------------------
def sample_once(bm: BenchModel, model, opts: SpeedOptions, width: int, height: int) -> float:
    """Sample ``model`` once like KSampler does; returns the wall time in seconds."""
    import comfy.sample
    latent = bm.latent(width, height, opts.batch)
    latent = comfy.sample.fix_empty_latent_channels(model, latent)
    noise = comfy.sample.prepare_noise(latent, opts.seed)
    pos = bm.cond(1, width=width, height=height)
    neg = bm.cond(2, width=width, height=height)
    sync = timing.device_sync(bm.device)
    with torch.inference_mode():
        if sync:
            sync()
        t0 = time.perf_counter()
        comfy.sample.sample(model, noise, opts.steps, opts.cfg, opts.sampler, opts.scheduler, pos, neg, latent,
                            denoise=1.0, seed=opts.seed, disable_pbar=True)
        if sync:
            sync()
        return time.perf_counter() - t0


def summarize_forwards(forwards, select) -> dict[str, Any]:
    """Model time, attention time and touched-attention time of one run's forwards."""
    model_s = sum(f.seconds for f in forwards)
    attn_s = sum(f.attention_s for f in forwards)
    sel_s = sum(f.selected_s(select) for f in forwards)
    calls = [c for f in forwards for c in f.calls]
    return {"model_s": model_s, "forwards": len(forwards),
            "unet_batch": sorted({f.batch for f in forwards}),
            "attention_s": attn_s, "selected_s": sel_s,
            "attention_share": timing.share(attn_s, model_s), "selected_share": timing.share(sel_s, model_s),
            "attention_calls": len(calls), "selected_calls": sum(1 for c in calls if select(c)),
            "selected_kv_tokens": sorted({(c.q_tokens, c.k_tokens) for c in calls if select(c)})}


def check_run(rec: dict, inst: Instrument, n_attn: int, kernel: str) -> None:
    from .instrument import kernel_function
    want = kernel_function(kernel).__name__
    ran = inst.kernel_calls
    if set(ran) != {want} or ran[want] != n_attn * rec["forwards"]:
        raise BenchError(f"{rec['label']} run: attention kernels {ran}, expected {want} x "
                         f"{n_attn * rec['forwards']} ({n_attn} calls per forward)")
    if rec["forwards"] < 1:
        raise BenchError(f"{rec['label']} run: the UNet was never evaluated")


# ------------------------------------------------------------------------------------------------
# the benchmark
# ------------------------------------------------------------------------------------------------
def run_speed(opts: SpeedOptions, t_start: Optional[float] = None, bm: Optional[BenchModel] = None) -> dict:
    """Run the speed comparison; returns the result document (see :mod:`bench.report`)."""
    from comfyui_freespeed.core.techniques import get
    from comfyui_freespeed.nodes.hooks import find
    from comfyui_freespeed.nodes.sites import detect_model

    t_start = time.perf_counter() if t_start is None else t_start
    tech = SPEED_SPECS[opts.technique]
    topts = opts.technique_options()
    device = resolve_device(opts.device) if bm is None else bm.device
    dtype = resolve_dtype(opts.dtype, device) if bm is None else bm.dtype
    warmup = resolve_warmup(opts.warmup, device)
    sync = timing.device_sync(device)
    record_in_timed = device.type == "cpu"     # on CUDA per-call syncs would perturb the timed runs

    if bm is None:
        t0 = time.perf_counter()
        logger.info("building %s (random weights, %s, %s)", SPECS[opts.model].label, str(dtype).replace("torch.", ""),
                    device)
        bm = build(opts.model, device=device, dtype=dtype, seed=opts.seed)
        logger.info("built %.0f M parameters in %.1f s", bm.params / 1e6, time.perf_counter() - t0)
    info = detect_model(bm.patcher)
    select = tech.selector(info, topts)
    f = tech.factor(topts)
    n_attn = count_attention_modules(bm.patcher.model.diffusion_model)
    want_batch = expected_unet_batch(opts.batch, opts.cfg)
    wu_w, wu_h = (opts.width, opts.height) if warmup == "full" else (WARMUP_RESOLUTION, WARMUP_RESOLUTION)

    results = []
    for ki, kernel in enumerate(opts.kernels):
        base = bm.patcher.clone()
        b_inst = Instrument(kernel, sync, record_attention=record_in_timed)
        b_inst.install(base)
        patched = tech.apply(bm.patcher, topts)
        p_inst = Instrument(kernel, sync, record_attention=record_in_timed)
        p_inst.install(patched)
        technique = find(patched, get(tech.key).wrapper_key)
        sides = {measure.BASE: (base, b_inst), measure.PATCHED: (patched, p_inst)}
        label = KERNEL_LABELS.get(kernel, kernel)

        def one(lbl: str, width: int, height: int, warm: bool, profile: bool = False) -> dict:
            model, inst = sides[lbl]
            inst.reset()
            inst.record_attention = record_in_timed or profile
            wall = sample_once(bm, model, opts, width, height)
            rec = {"label": lbl, "warmup": warm, "profile": profile, "wall_s": wall,
                   **summarize_forwards(inst.forwards, select), "kernel_calls": dict(inst.kernel_calls)}
            check_run(rec, inst, n_attn, kernel)
            if lbl == measure.PATCHED:
                stats = dict(getattr(technique, "last_stats", {}) or {})
                problem = tech.check(stats)
                if problem:
                    raise BenchError(f"{label}: {problem}")
                rec["technique_stats"] = stats
            kind = "warm-up" if warm else ("profile" if profile else "timed")
            logger.info("  %-13s %-7s %-7s model %7.2f s, wall %7.2f s%s", label, lbl, kind, rec["model_s"], wall,
                        f", attention {100 * rec['attention_share']:.0f}% (touched {100 * rec['selected_share']:.0f}%)"
                        if rec["attention_calls"] else "")
            return rec

        runs: list[dict] = []
        if warmup != "none":
            logger.info("%s: warm-up at %dx%d", label, wu_w, wu_h)
        logger.info("%s: timed runs at %dx%d (latent %dx%d, batch %d, %d step(s), cfg %g)", label, opts.width,
                    opts.height, opts.width // 8, opts.height // 8, opts.batch, opts.steps, opts.cfg)

        def run(lbl: str, warm: bool):
            rec = one(lbl, wu_w, wu_h, warm=True) if warm else one(lbl, opts.width, opts.height, warm=False)
            runs.append(rec)
            return rec, rec["wall_s"]

        left = len(opts.kernels) - ki - 1
        reserve = (lambda round_s, warm_s: left * (warm_s + round_s) + (0 if record_in_timed else 2 * round_s))
        measure.timed_rounds((measure.BASE, measure.PATCHED), run, repeats=opts.repeats, max_rounds=opts.max_repeats,
                             budget_s=opts.budget_s, t_start=t_start, reserve_s=reserve, warmup=warmup != "none")
        if not record_in_timed:
            logger.info("%s: profiling runs (attention calls timed one by one)", label)
            for lbl in (measure.BASE, measure.PATCHED):
                runs.append(one(lbl, opts.width, opts.height, warm=False, profile=True))
        results.append(summarize_kernel(kernel, runs, f, want_batch))
        del base, patched, sides

    return document(tech.key, tech.describe(topts), environment(device), config_dict(opts, bm, warmup, want_batch),
                    results, time.perf_counter() - t_start)


def config_dict(opts: SpeedOptions, bm: BenchModel, warmup: str, want_batch: int) -> dict:
    d = asdict(opts)
    d["kernels"] = list(opts.kernels)
    d.update({"warmup": warmup, "device": str(bm.device), "dtype": str(bm.dtype).replace("torch.", ""),
              "latent": [opts.height // 8, opts.width // 8], "unet_batch": want_batch,
              "model_label": bm.spec.label, "params": bm.params})
    return d


def environment(device: torch.device) -> dict:
    env: dict[str, Any] = {"python": platform.python_version(), "torch": torch.__version__,
                           "threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
                           "platform": platform.platform(), "device": str(device)}
    try:
        import comfyui_version
        env["comfyui"] = comfyui_version.__version__
    except Exception:
        env["comfyui"] = None
    try:
        with open("/proc/cpuinfo") as fh:
            env["cpu"] = next((ln.split(":", 1)[1].strip() for ln in fh if ln.startswith("model name")), None)
    except OSError:
        env["cpu"] = platform.processor() or None
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
    return env
