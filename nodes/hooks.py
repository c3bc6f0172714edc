"""The shared hook layer every FreeSpeed node is built on.

* :func:`detect_model` -- the model family (SD1.x/SD2.x UNet, SDXL UNet, Flux, SD3, other) and, for
  UNets, the resolution level and *attention level* of every block (attention level 1 is the
  highest-resolution level that has attention at all: the 64x64 tokens of SD1.5 at 512² and of
  SDXL at 1024², since SDXL has no attention at its full latent resolution).
* :class:`Technique` -- one installation of one technique on one cloned MODEL.  It owns the
  per-run state: an OUTER_SAMPLE wrapper creates a fresh :class:`RunState` at the start of every
  sampling run (so re-queueing a cached MODEL behaves like a first run) and, in ``finally``, logs
  one summary line, keeps the stats for the UI and drops the state (caches included).  An
  APPLY_MODEL wrapper resolves each model evaluation's sigma once (step, percent, extra
  evaluation) so that attention hooks never synchronise with the device themselves.
* :class:`BatchLayout` -- which conditioning branch each chunk of a batched call is, read from
  ``cond_or_uncond`` (ComfyUI batches uncond first in the standard call, but no code here assumes
  an order).

A Technique is referenced from closures and wrappers; ``model.clone()`` deep-copies
``model_options``, so it returns itself from ``__deepcopy__`` and every clone of the patched MODEL
shares one state, exactly like the hooks that point to it.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any, Optional

import torch

import comfy.patcher_extension as pe

from ..core.schedule import RunSchedule, StepInfo

logger = logging.getLogger("FreeSpeed")

CATEGORY = "model_patches/freespeed"

# stats of the last run of every node, by the node's unique id (read by the web extension)
LAST_STATS: dict[str, dict[str, Any]] = {}


# ------------------------------------------------------------------------------------------------
# model family and block levels
# ------------------------------------------------------------------------------------------------
FAMILY_LABELS = {"sd1": "SD1.x/SD2.x", "sdxl": "SDXL", "flux": "Flux", "sd3": "SD3", "other": "other"}


@dataclass(frozen=True)
class ModelInfo:
    family: str                                   # "sd1" | "sdxl" | "flux" | "sd3" | "other"
    model_class: str                              # e.g. "comfy.model_base.SDXL"
    diffusion_class: str                          # e.g. "UNetModel"
    block_level: dict = field(default_factory=dict)       # block -> resolution level (1 = full latent)
    block_depth: dict = field(default_factory=dict)       # block -> transformer depth
    attention_levels: tuple = ()                  # resolution levels that hold attention, ascending

    @property
    def label(self) -> str:
        return FAMILY_LABELS[self.family]

    @property
    def is_unet(self) -> bool:
        return self.family in ("sd1", "sdxl")

    def attention_level(self, block) -> Optional[int]:
        """Attention level (1 = highest-resolution attention) of a ("input", i)-style block key."""
        lvl = self.block_level.get(tuple(block[:2])) if block is not None else None
        if lvl is None or lvl not in self.attention_levels:
            return None
        return self.attention_levels.index(lvl) + 1

    def resolution_of_attention_level(self, level: int) -> Optional[int]:
        return self.attention_levels[level - 1] if 1 <= level <= len(self.attention_levels) else None


def _mro_names(obj) -> list[str]:
    return [c.__name__ for c in type(obj).__mro__]


def _unet_layout(dm) -> tuple[dict, dict]:
    """Resolution level and transformer depth of each UNet block that holds a SpatialTransformer."""
    levels: dict = {}
    depth: dict = {}

    def transformers(block):
        return [m for m in block.modules() if "SpatialTransformer" in _mro_names(m)]

    def has(block, name):
        return any(type(m).__name__ == name for m in block.modules())

    lvl = 1
    for i, block in enumerate(dm.input_blocks):
        ts = transformers(block)
        if ts:
            levels[("input", i)] = lvl
            depth[("input", i)] = len(ts[0].transformer_blocks)
        if has(block, "Downsample"):      # a Downsample layer, or a ResBlock(down=True)'s h_upd
            lvl += 1
    mid = getattr(dm, "middle_block", None)
    if mid is not None:
        ts = transformers(mid)
        if ts:
            levels[("middle", 0)] = lvl
            depth[("middle", 0)] = len(ts[0].transformer_blocks)
    for i, block in enumerate(dm.output_blocks):
        ts = transformers(block)
        if ts:
            levels[("output", i)] = lvl
            depth[("output", i)] = len(ts[0].transformer_blocks)
        if has(block, "Upsample"):
            lvl -= 1
    return levels, depth


def detect_model(model) -> ModelInfo:
    """Family and block layout of a ModelPatcher's model."""
    base = model.model
    dm = base.diffusion_model
    names = _mro_names(base)
    model_class = f"{type(base).__module__}.{type(base).__name__}"
    dm_class = type(dm).__name__
    if dm_class == "UNetModel" and hasattr(dm, "input_blocks"):
        temporal = getattr(dm, "use_temporal_resblocks", False) or any(
            "Video" in type(m).__name__ for m in dm.modules())
        if temporal:
            family = "other"
        elif any(n.startswith("SDXL") for n in names) or getattr(dm, "adm_in_channels", None) in (2816, 2560):
            family = "sdxl"
        else:
            family = "sd1"
        levels, depth = _unet_layout(dm)
        return ModelInfo(family, model_class, dm_class, levels, depth, tuple(sorted(set(levels.values()))))
    if "Flux" in names:
        return ModelInfo("flux", model_class, dm_class)
    if "SD3" in names:
        return ModelInfo("sd3", model_class, dm_class)
    return ModelInfo("other", model_class, dm_class)


class UnsupportedModelError(ValueError):
    """Raised at node execution for a model a technique cannot work on."""


def require_unet(info: ModelInfo, technique: str, why: str) -> None:
    if not info.is_unet:
        raise UnsupportedModelError(
            f"FreeSpeed {technique}: {info.model_class} ({info.label}, diffusion model {info.diffusion_class}) is not "
            f"supported. {why} Supported: SD1.x/SD2.x and SDXL UNets.")


# ------------------------------------------------------------------------------------------------
# batch layout
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class BatchLayout:
    """How one batched model call is made of conditioning branches.

    ``cond_or_uncond[i]`` is the index, in the call's cond list, of chunk i (standard CFG call:
    0 = positive, 1 = negative; extra passes by SAG/PAG/PerpNeg use their own lists).
    """
    cond_or_uncond: tuple
    per_chunk: int

    @classmethod
    def from_options(cls, transformer_options: dict, batch: int) -> "BatchLayout":
        cu = tuple(transformer_options.get("cond_or_uncond") or (0,))
        per = batch // len(cu) if len(cu) and batch % len(cu) == 0 else batch
        if per * len(cu) != batch:
            cu = (0,)
            per = batch
        return cls(cu, per)

    def slice_of(self, branch: int) -> Optional[slice]:
        if branch not in self.cond_or_uncond:
            return None
        i = self.cond_or_uncond.index(branch)
        return slice(i * self.per_chunk, (i + 1) * self.per_chunk)

    @property
    def key(self) -> tuple:
        return self.cond_or_uncond


# ------------------------------------------------------------------------------------------------
# per-run state and the technique base
# ------------------------------------------------------------------------------------------------
class RunState:
    """State of one sampling run of one technique: schedule, current evaluation, counters."""

    def __init__(self, schedule: RunSchedule, noise: Optional[torch.Tensor] = None):
        self.schedule = schedule
        self.noise = noise
        self.current: Optional[StepInfo] = None
        self.counts: dict[str, int] = {}
        self.evals = 0
        self.extra_evals = 0
        self.steps_seen: set[int] = set()
        self.t0 = time.perf_counter()
        self.wall = 0.0
        self._info_memo: dict[float, StepInfo] = {}
        self._window_memo: dict[tuple, bool] = {}

    def count(self, name: str, n: int = 1) -> None:
        self.counts[name] = self.counts.get(name, 0) + n

    def begin_eval(self, sigma: float) -> StepInfo:
        info = self._info_memo.get(sigma)
        if info is None:
            info = self.schedule.info(sigma)
            self._info_memo[sigma] = info
        self.current = info
        self.evals += 1
        if info.extra:
            self.extra_evals += 1
        else:
            self.steps_seen.add(info.step)
        return info

    def in_window(self, start: float, end: float) -> bool:
        """Whether the current evaluation lies in [start, end] percent of denoising (memoised)."""
        info = self.current
        if info is None:
            return False
        key = (info.sigma, start, end)
        hit = self._window_memo.get(key)
        if hit is None:
            hit = self._window_memo[key] = self.schedule.in_window(info.sigma, start, end)
        return hit


class Technique:
    """One installed technique: config + hooks + per-run state.  Subclasses override the hooks."""

    name = "technique"            # shown in logs: "FreeSpeed <name>"
    key = "freespeed"             # wrapper key

    def __init__(self, info: ModelInfo, node_id: Optional[str] = None):
        self.info = info
        self.node_id = node_id
        self.run: Optional[RunState] = None
        self.last_stats: dict[str, Any] = {}
        self.runs = 0

    def __deepcopy__(self, memo):
        return self

    # -- overridables -----------------------------------------------------------------------------
    def new_run(self, schedule: RunSchedule, noise: Optional[torch.Tensor]) -> RunState:
        return RunState(schedule, noise)

    def stats(self, run: RunState) -> dict[str, Any]:
        """The run's stats (JSON-able); subclasses extend."""
        return {"technique": self.name, "model": self.info.label, "evaluations": run.evals,
                "extra_evaluations": run.extra_evals, "steps": run.schedule.total_steps,
                "wall_s": round(run.wall, 3), **run.counts}

    def summary(self, stats: dict[str, Any]) -> str:
        return ", ".join(f"{k} {v}" for k, v in stats.items() if k not in ("technique", "model"))

    # -- installation -----------------------------------------------------------------------------
    def install(self, model) -> None:
        """Add the run wrappers to a (cloned) ModelPatcher; subclasses add their hooks after this."""
        model.add_wrapper_with_key(pe.WrappersMP.OUTER_SAMPLE, self.key, self._outer_sample)
        model.add_wrapper_with_key(pe.WrappersMP.APPLY_MODEL, self.key, self._apply_model)

    def _outer_sample(self, executor, *args, **kwargs):
        if self.run is not None:          # nested sampling inside our own run: keep the outer state
            return executor(*args, **kwargs)
        guider = executor.class_obj
        noise, sigmas = args[0], args[3]
        p2s = None
        try:
            ms = guider.model_patcher.get_model_object("model_sampling")
            p2s = ms.percent_to_sigma
        except Exception:  # a model without model_sampling: percent along the run's own steps
            logger.warning("FreeSpeed %s: model has no model_sampling; percents follow the run's steps", self.name)
        self.run = run = self.new_run(RunSchedule(sigmas.detach().float().cpu(), p2s), noise)
        try:
            return executor(*args, **kwargs)
        finally:
            run.wall = time.perf_counter() - run.t0
            self.runs += 1
            try:
                self.finish(run)
            finally:
                self.run = None

    def _apply_model(self, executor, x, t, *args, **kwargs):
        run = self.run
        if run is not None:
            run.begin_eval(float(t.max()) if torch.is_tensor(t) else float(t))
        return executor(x, t, *args, **kwargs)

    def finish(self, run: RunState) -> None:
        stats = self.stats(run)
        self.last_stats = stats
        logger.info("FreeSpeed %s: %s", self.name, self.summary(stats))
        if self.node_id is not None:
            LAST_STATS[str(self.node_id)] = stats
            publish(str(self.node_id), stats)


# ------------------------------------------------------------------------------------------------
# nodes that sample the model themselves (Map Reuse Search, Benchmark)
# ------------------------------------------------------------------------------------------------
def check_sampler_and_scheduler(sampler_name: Optional[str] = None, scheduler: Optional[str] = None):
    """``validate_inputs`` answer for KSampler-like combos (ComfyUI 0.3.64 does not check V3 combos)."""
    import comfy.samplers
    if sampler_name is not None and sampler_name not in comfy.samplers.KSampler.SAMPLERS:
        return f"unknown sampler {sampler_name!r}"
    if scheduler is not None and scheduler not in comfy.samplers.KSampler.SCHEDULERS:
        return f"unknown scheduler {scheduler!r}"
    return True


def prepare_sampling(model, latent: dict, seed: int) -> tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """(latent image, noise, noise mask) from a LATENT input, as KSampler prepares them."""
    import comfy.sample
    image = comfy.sample.fix_empty_latent_channels(model, latent["samples"])
    noise = comfy.sample.prepare_noise(image, seed, latent.get("batch_index"))
    return image, noise, latent.get("noise_mask")


def publish(node_id: str, stats: dict[str, Any]) -> None:
    """Send a run's stats to the browser (the web extension shows them on the node)."""
    try:
        from server import PromptServer  # only present inside a running ComfyUI server
        inst = getattr(PromptServer, "instance", None)
        if inst is not None:
            msg = {"node": node_id, "stats": stats}
            try:  # the canvas readout and schedule bar (readout.py); never allowed to break sampling
                from .readout import annotate
                msg.update(annotate(stats))
            except Exception:
                logger.debug("FreeSpeed: readout failed for node %s", node_id, exc_info=True)
            inst.send_sync("freespeed.stats", msg)
    except Exception:  # no server (tests, scripts): the stats stay in LAST_STATS
        pass


__all__ = ["CATEGORY", "LAST_STATS", "ModelInfo", "detect_model", "UnsupportedModelError", "require_unet",
           "BatchLayout", "RunState", "Technique", "publish", "logger", "check_sampler_and_scheduler",
           "prepare_sampling"]
