"""FreeSpeed Auto's trials on the user's model: sample each candidate on every seed exactly as KSampler would
(``comfy.sample.sample``), measure its cost (wall seconds or counted FLOPs) and its closeness to the full
run, and hand the decisions to ``core.auto``.  Every candidate is a clone: the input MODEL is never patched.
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from typing import Any, Callable, Optional

import numpy as np
import torch

import comfy.model_management as mm
import comfy.sample
import comfy.utils

from ...core import auto as A
from ...core import charts, measure
from ...core.flops import count_flops
from ...core.techniques import TECHNIQUES
from .. import registry
from ..builtins import apply_builtin
from ..hooks import logger, prepare_sampling
from ..sites import detect_model

CANDIDATES = ("FreeSpeed + ComfyUI built-ins", "FreeSpeed only")
COSTS = ("time", "flops")
RETIME_ROUNDS = measure.MIN_TIMED_ROUNDS


@dataclass
class Job:
    """What KSampler takes, plus the search's own inputs."""
    model: Any
    positive: Any
    negative: Any
    latent: dict
    seed: int
    steps: int
    cfg: float
    sampler_name: str
    scheduler: str
    denoise: float = 1.0
    target: float = A.DEFAULT_TARGET_DB
    vae: Any = None
    seeds: int = 2
    budget: int = A.DEFAULT_BUDGET
    candidates: str = CANDIDATES[0]
    cost: str = "time"


def apply_parts(model, parts: tuple):
    """``model`` with each (key, settings) installed in order (FreeSpeed through the registry, ComfyUI's
    built-ins through their node classes); ``()`` is the original MODEL itself."""
    for key, settings in parts:
        if key in A.BUILTINS:
            model = apply_builtin(key, model, **settings)
        else:
            model = registry.apply(key, model, registry.config(key, **settings))
    return model


def accepted_keys(model, candidates: str) -> tuple[list[str], dict]:
    """The ladders that accept this MODEL (their first rung installs) and why the others were skipped."""
    info = detect_model(model)
    keys = [t.key for t in TECHNIQUES] + (list(A.BUILTINS) if candidates == CANDIDATES[0] else [])
    ok, skipped = [], {}
    for key in keys:
        if key in A.UNET_ONLY and not info.is_unet:
            skipped[key] = f"UNet models only (this is {info.label})"
            continue
        try:
            apply_parts(model, ((key, dict(A.LADDERS[key][0].settings)),))
            ok.append(key)
        except Exception as e:         # a technique that does not accept the model says why
            skipped[key] = f"{type(e).__name__}: {e}"
    return ok, skipped


def timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    dev = mm.get_torch_device()
    cuda = getattr(dev, "type", "") == "cuda"
    if cuda:
        torch.cuda.synchronize(dev)
    t0 = time.perf_counter()
    out = fn()
    if cuda:
        torch.cuda.synchronize(dev)
    return out, time.perf_counter() - t0


class Trials:
    """One sampling set-up per seed (latent, noise, mask as KSampler prepares them), the reference outputs,
    and :meth:`evaluate` for ``core.auto``'s search."""

    def __init__(self, job: Job, tick: Callable[[], None] = lambda: None):
        self.job, self.tick = job, tick
        self.setups = [prepare_sampling(job.model, job.latent, job.seed + i) for i in range(job.seeds)]
        self.refs: list[torch.Tensor] = []
        self.measure = count_flops if job.cost == "flops" else timed

    def sample(self, model, steps: int, i: int) -> torch.Tensor:
        j = self.job
        image, noise, mask = self.setups[i]
        mm.throw_exception_if_processing_interrupted()
        with torch.inference_mode():
            return comfy.sample.sample(model, noise, steps, j.cfg, j.sampler_name, j.scheduler, j.positive, j.negative,
                                       image, denoise=j.denoise, noise_mask=mask, seed=j.seed + i, disable_pbar=True)

    def seen(self, out: torch.Tensor) -> torch.Tensor:
        """What closeness is measured on: the decoded images with a VAE, else the latents."""
        if self.job.vae is None:
            return out.float().cpu()
        with torch.inference_mode():
            return self.job.vae.decode(out).float().cpu()

    def closeness(self, out: torch.Tensor, i: int) -> float:
        return measure.psnr(self.seen(out), self.refs[i], peak=1.0 if self.job.vae is not None else None)

    def reference(self) -> A.Candidate:
        ref = A.Candidate("reference", (), self.job.steps, "the full run")
        costs = []
        for i in range(self.job.seeds):
            out, cost = self.measure(lambda: self.sample(self.job.model, self.job.steps, i))
            self.refs.append(self.seen(out))
            costs.append(cost)
            ref.closeness.append(math.inf)
            self.tick()
        ref.cost, ref.passed, ref.ratio = sum(costs) / len(costs), True, 1.0
        return ref

    def evaluate(self, c: A.Candidate) -> A.Candidate:
        costs = []
        try:
            model = apply_parts(self.job.model, c.parts)
            for i in range(self.job.seeds):
                out, cost = self.measure(lambda: self.sample(model, c.steps, i))
                costs.append(cost)
                c.closeness.append(self.closeness(out, i))
                if c.closeness[-1] < self.job.target:
                    break                    # failed on this seed: the others cannot save it
        except mm.InterruptProcessingException:
            raise
        except Exception as e:               # a candidate that cannot run on this model/input is a failed trial
            c.error = f"{type(e).__name__}: {e}"
            logger.debug("FreeSpeed Auto: %s failed", c.name, exc_info=True)
        finally:
            self.tick()
        c.cost = sum(costs) / len(costs) if costs else None
        c.passed = c.error is None and A.holds(c.closeness, self.job.target, self.job.seeds)
        return c

    def retime(self, ref: A.Candidate, finals: list[A.Candidate]) -> tuple[int, bool, str]:
        """Interleaved rounds (the benchmark's rounds engine) of the reference and the finalists on the first
        seed: their costs become the medians, the ratio spread the range over rounds; the step-count curve
        among them (the full run and a fewer-steps run) is the timing's self-check (``measure.timing_check``)."""
        rows = [ref] + finals
        models = [apply_parts(self.job.model, c.parts) for c in rows]

        def run(i: int, warm: bool):
            _, secs = timed(lambda: self.sample(models[i], min(2, rows[i].steps) if warm else rows[i].steps, 0))
            self.tick()
            return None, secs

        res = measure.timed_rounds(list(range(len(rows))), run, repeats=RETIME_ROUNDS)
        for i, c in enumerate(rows):
            c.times = [round(t, 4) for t in res.times[i]]
            c.cost = measure.median(res.times[i])
        for c in finals:
            per_round = [b / t for b, t in zip(ref.times, c.times)]
            c.ratio_spread = (min(per_round), max(per_round))
        ok, why = measure.timing_check([{"kind": "baseline" if c is ref else c.kind, "steps": c.steps,
                                         "times_s": c.times} for c in rows])
        return res.rounds, ok, why


def report_image(ref: A.Candidate, log: A.SearchLog, winner: A.Candidate, title: str, notes: list) -> torch.Tensor:
    """Speed vs closeness of every candidate (the fewer-steps curve drawn through, the winner marked) above
    the table, as a ComfyUI IMAGE (1, H, W, 3)."""
    header, rows = A.table(ref, log.candidates, winner)
    table = charts.text_table(header, rows, title=title, notes=notes)
    shown = [c for c in log.candidates if c.kind != "fewer_steps" and c.ratio is not None and c.closeness]
    pts = [{"label": ("★ WINNER: " if c is winner else "") + c.name[:40], "x": c.ratio, "y": min(c.closeness)}
           for c in shown]
    curve = [(c.ratio, min(c.closeness), f"{c.steps} st") for c in [ref] + log.candidates
             if c.kind in ("fewer_steps", "reference") and c.ratio is not None and c.closeness]
    if winner.kind == "fewer_steps":
        pts.append({"label": f"★ WINNER: {winner.steps} steps", "x": winner.ratio, "y": min(winner.closeness)})
    plot = charts.speed_fidelity_plot(pts, curve, size=(max(table.width, 760), 440),
                                      x_label="cost ratio vs the full run (×, higher is cheaper)",
                                      y_label="PSNR vs the full run, worst seed (dB)")
    arr = np.asarray(charts.stack_images([plot, table]), dtype=np.float32) / 255.0
    return torch.from_numpy(arr)[None]


def run_auto(job: Job, progress: Optional[Callable[[int, int], None]] = None) -> dict:
    """The whole search; returns {"model", "steps", "settings" (dict), "winner", "log", "reference"}."""
    t0 = time.perf_counter()
    if job.seeds < 1 or job.budget < 0 or job.steps < 1:
        raise ValueError("FreeSpeed Auto: seeds and steps must be >= 1, budget >= 0")
    if job.cost not in COSTS or job.candidates not in CANDIDATES:
        raise ValueError(f"FreeSpeed Auto: cost must be one of {COSTS}, candidates one of {CANDIDATES}")
    total = job.seeds + job.budget + (RETIME_ROUNDS + 1) * 4 if job.cost == "time" else job.seeds + job.budget
    pbar = comfy.utils.ProgressBar(total)
    done = [0]

    def tick():
        done[0] += 1
        pbar.update_absolute(min(done[0], total), total)
        if progress is not None:
            progress(done[0], total)

    keys, skipped = accepted_keys(job.model, job.candidates)
    quiet = logger.level
    logger.setLevel(max(logging.WARNING, quiet))      # one summary line for the whole search, not one per trial
    try:
        trials = Trials(job, tick)
        if job.cost == "time":                        # untimed warm-up: loads the model, fills allocator caches
            trials.sample(job.model, min(2, job.steps), 0)
        ref = trials.reference()
        log = A.run_search(ref, keys, trials.evaluate, job.budget)
        log.skipped = skipped
        timing, finals = None, log.candidates
        if job.cost == "time":                        # the winner comes from the re-timed finalists
            finals = A.finalists(ref, log.candidates)
            if finals:
                rounds, ok, why = trials.retime(ref, finals)
                timing = {"rounds": rounds, "self_check_ok": ok, "self_check": why}
        A.set_ratios(ref, log.candidates)
    finally:
        logger.setLevel(quiet)
    winner = A.pick_winner(ref, finals)
    settings = A.settings_doc(job_dict(job), detect_model(job.model).family, ref, log, winner,
                              wall_s=time.perf_counter() - t0, timing=timing)
    model = job.model if not winner.parts else apply_parts(job.model, winner.parts)
    logger.info("FreeSpeed Auto: %s (%d trials of %d, %.1f s)", settings["verdict"], log.trials, job.budget,
                settings["search"]["wall_s"])
    return {"model": model, "steps": winner.steps, "settings": settings, "winner": winner, "log": log,
            "reference": ref}


def job_dict(job: Job) -> dict:
    lat = job.latent["samples"]
    return {"seed": job.seed, "seeds": job.seeds, "steps": job.steps, "cfg": job.cfg, "sampler": job.sampler_name,
            "scheduler": job.scheduler, "denoise": job.denoise, "target_db": job.target, "budget": job.budget,
            "candidates": job.candidates, "cost": job.cost, "on": "decoded images" if job.vae is not None else "latents",
            "latent": list(lat.shape), "resolution": [int(lat.shape[-1]) * 8, int(lat.shape[-2]) * 8]}


__all__ = ["CANDIDATES", "COSTS", "Job", "apply_parts", "accepted_keys", "Trials", "report_image", "run_auto",
           "job_dict"]
