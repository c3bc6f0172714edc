"""The technique base every FreeSpeed node installs: typed per-run state, one resolution of each model
evaluation, stats and publishing; and the node base class.

* A :class:`Technique` is one installation on one cloned MODEL.  Its OUTER_SAMPLE wrapper creates a
  fresh run state (``new_run(RunContext)``: a dataclass per technique) at the start of every sampling
  run, so re-queueing a cached MODEL behaves like a first run, and in ``finally`` logs one summary line,
  publishes the stats (``core.stats``) and drops the state, caches included.
* Its PREDICT_NOISE wrapper resolves each model evaluation once (:class:`Evaluation`: step, percent,
  extra evaluation, the guider) before anything else of that evaluation runs; hooks read
  ``run.eval`` and never synchronise with the device themselves.
* ``model.clone()`` deep-copies ``model_options``: a Technique returns itself from ``__deepcopy__``, so
  every clone of the patched MODEL shares one state, exactly like the hooks that point to it.
"""
from __future__ import annotations

import inspect
import logging
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Generic, Optional, TypeVar

import torch

import comfy.patcher_extension as pe
from comfy_api.v0_0_2 import io

from ..core.schedule import RunSchedule, StepInfo
from ..core.stats import RunStats
from .sites import ModelInfo

logger = logging.getLogger("FreeSpeed")

CATEGORY = "model_patches/freespeed"

# stats of the last run of every node, by the node's unique id (read by the web extension)
LAST_STATS: dict[str, dict[str, Any]] = {}


def sigma_of(t) -> float:
    return float(t.max()) if torch.is_tensor(t) else float(t)


@dataclass
class RunContext:
    """What a sampling run gives a technique (OUTER_SAMPLE's arguments)."""
    schedule: RunSchedule
    sigmas: Optional[torch.Tensor] = None
    noise: Optional[torch.Tensor] = None
    mask: Optional[torch.Tensor] = None
    model_sampling: Any = None


@dataclass
class Evaluation:
    """One model evaluation (one PREDICT_NOISE call), resolved once."""
    info: StepInfo
    index: int                       # 1-based, in the run
    guider: Any = None
    main_started: bool = False       # its first calc_cond_batch (the guider's own pass) has begun


StatsT = TypeVar("StatsT", bound=RunStats)


@dataclass
class Run(Generic[StatsT]):
    """State of one sampling run of one technique; techniques subclass it with their own fields."""
    ctx: RunContext
    stats: StatsT
    eval: Optional[Evaluation] = None
    steps_seen: set = field(default_factory=set)
    t0: float = field(default_factory=time.perf_counter)
    _info_memo: dict = field(default_factory=dict, repr=False)
    _window_memo: dict = field(default_factory=dict, repr=False)

    @property
    def schedule(self) -> RunSchedule:
        return self.ctx.schedule

    @property
    def current(self) -> Optional[StepInfo]:
        return self.eval.info if self.eval is not None else None

    def begin_eval(self, sigma: float, guider=None) -> Evaluation:
        info = self._info_memo.get(sigma)
        if info is None:
            info = self._info_memo[sigma] = self.schedule.info(sigma)
        self.stats.evaluations += 1
        if info.extra:
            self.stats.extra_evaluations += 1
        else:
            self.steps_seen.add(info.step)
        self.eval = Evaluation(info, self.stats.evaluations, guider)
        return self.eval

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


RunT = TypeVar("RunT", bound=Run)


class Technique(Generic[RunT]):
    """One installed technique: config + hooks + per-run state.  Subclasses set ``name``/``key``/
    ``stats_type``/``run_type``, build a richer run in ``new_run`` if they need one and add hooks in
    ``install``."""

    name = "technique"            # shown in logs: "FreeSpeed <name>"
    key = "freespeed"             # wrapper key
    stats_type: type = RunStats
    run_type: type = Run

    def __init__(self, config: Any, info: ModelInfo, node_id: Optional[str] = None):
        self.config = config      # the node's frozen config
        self.info = info
        self.node_id = node_id
        self.run: Optional[RunT] = None
        self.last_stats: dict[str, Any] = {}
        self.runs = 0

    def __deepcopy__(self, memo):
        return self

    # -- overridables -----------------------------------------------------------------------------
    def new_run(self, ctx: RunContext) -> RunT:
        return self.run_type(ctx, self.stats_type())          # type: ignore[return-value]

    def finish_stats(self, run: RunT) -> None:
        """Fill the run's summary fields (counters are filled while it runs)."""

    def evaluate(self, run: RunT, ev: Evaluation, executor, *args, **kwargs):
        """The model evaluation (PREDICT_NOISE), after it was resolved."""
        return executor(*args, **kwargs)

    # -- installation -----------------------------------------------------------------------------
    def patched_clone(self, model):
        """A clone of ``model`` with this technique installed (the input MODEL is never modified)."""
        m = model.clone()
        self.install(m)
        return m

    def replace_earlier(self, model) -> None:
        """Applied twice to one MODEL, the later node replaces the earlier: the earlier installation's wrappers
        are removed, so it never gets a run and its other hooks pass through (one warning)."""
        if not installed(model, self.key):
            return
        for kind in list(model.wrappers):
            model.remove_wrappers_with_key(kind, self.key)
        logger.warning("FreeSpeed %s: applied twice to the same MODEL; the later node's settings replace the "
                       "earlier's", self.name)

    def install(self, model) -> None:
        """Add the run wrappers to a (cloned) ModelPatcher; subclasses add their hooks after this."""
        model.add_wrapper_with_key(pe.WrappersMP.OUTER_SAMPLE, self.key, self._outer_sample)
        model.add_wrapper_with_key(pe.WrappersMP.PREDICT_NOISE, self.key, self._predict_noise)

    def _outer_sample(self, executor, *args, **kwargs):
        if self.run is not None:          # nested sampling inside our own run: keep the outer state
            return executor(*args, **kwargs)
        guider = executor.class_obj
        noise, sigmas = args[0], args[3]
        mask = args[4] if len(args) > 4 else kwargs.get("denoise_mask")
        ms = p2s = None
        try:
            ms = guider.model_patcher.get_model_object("model_sampling")
            p2s = ms.percent_to_sigma
        except Exception:  # a model without model_sampling: percent along the run's own steps
            logger.warning("FreeSpeed %s: model has no model_sampling; percents follow the run's steps", self.name)
        schedule = RunSchedule(sigmas.detach().float().cpu(), p2s)
        self.run = run = self.new_run(RunContext(schedule, sigmas.detach().float(), noise, mask, ms))
        try:
            return executor(*args, **kwargs)
        finally:
            self.runs += 1
            try:
                self._finish(run)
            finally:
                self.run = None

    def _predict_noise(self, executor, x, timestep, *args, **kwargs):
        run = self.run
        if run is None:
            return executor(x, timestep, *args, **kwargs)
        ev = run.begin_eval(sigma_of(timestep), executor.class_obj)
        return self.evaluate(run, ev, executor, x, timestep, *args, **kwargs)

    def _finish(self, run: RunT) -> None:
        s = run.stats
        s.model = s.model or self.info.label
        s.steps = run.schedule.total_steps
        s.wall_s = round(time.perf_counter() - run.t0, 3)
        self.finish_stats(run)
        stats = s.as_dict()
        self.last_stats = stats
        logger.info("FreeSpeed %s: %s", self.name, s.summary())
        if self.node_id is not None:
            LAST_STATS[str(self.node_id)] = stats
            publish(str(self.node_id), stats)


def installed(model, key: Optional[str] = None) -> list[Technique]:
    """The FreeSpeed techniques installed on a patched MODEL (with wrapper ``key``: only those)."""
    out = []
    for k, fns in (model.wrappers.get(pe.WrappersMP.OUTER_SAMPLE) or {}).items():
        if not str(k).startswith("freespeed") or (key is not None and k != key):
            continue
        for fn in fns:
            owner = getattr(fn, "__self__", None)
            if isinstance(owner, Technique) and owner not in out:
                out.append(owner)
    return out


def find(model, key: str) -> Optional[Technique]:
    """The last-installed technique with wrapper ``key`` on a patched MODEL, or None."""
    found = installed(model, key)
    return found[-1] if found else None


def publish(node_id: str, stats: dict[str, Any]) -> None:
    """Send a run's stats to the browser (the web extension shows them on the node)."""
    try:
        server = sys.modules.get("server")     # only a running ComfyUI has imported it (never import it here)
        inst = getattr(getattr(server, "PromptServer", None), "instance", None)
        if inst is not None:
            msg = {"node": node_id, "stats": stats}
            try:  # the canvas readout and schedule bar; never allowed to break sampling
                from ..core.readout import annotate
                msg.update(annotate(stats))
            except Exception:
                logger.debug("FreeSpeed: readout failed for node %s", node_id, exc_info=True)
            inst.send_sync("freespeed.stats", msg)
    except Exception:  # no server (tests, scripts): the stats stay in LAST_STATS
        pass


# ------------------------------------------------------------------------------------------------
# the node base
# ------------------------------------------------------------------------------------------------
class FreeSpeedNode(io.ComfyNode):
    """Base of every FreeSpeed node: the hidden node id (the canvas readout is keyed by it) and the check
    of its combo inputs (ComfyUI 0.3.64 does not check V3 combos).  Each subclass gets a
    ``validate_inputs`` whose signature names its combo inputs only, so ComfyUI passes just those and
    keeps its own min/max checks (and error placement) for the other inputs."""

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if "validate_inputs" in vars(cls) or "define_schema" not in vars(cls):
            return
        combos = {i.id: list(i.options) for i in cls.define_schema().inputs
                  if isinstance(i, io.Combo.Input) and i.options is not None}
        if not combos:
            return

        def validate_inputs(klass, **values):
            for name, v in values.items():
                options = combos.get(name)
                if v is not None and options is not None and v not in options:
                    listed = ", ".join(map(str, options)) if len(options) <= 20 else f"a list of {len(options)}"
                    return f"{name} must be one of {listed}, got {v!r}"
            return True

        P = inspect.Parameter
        validate_inputs.__signature__ = inspect.Signature(
            [P("klass", P.POSITIONAL_OR_KEYWORD)] + [P(n, P.POSITIONAL_OR_KEYWORD, default=None) for n in combos])
        cls.validate_inputs = classmethod(validate_inputs)

    @classmethod
    def schema(cls, node_id: str, display_name: str, description: str, inputs: list, outputs: Optional[list] = None,
               model_input: bool = True) -> io.Schema:
        """A FreeSpeed node's schema: the FreeSpeed category, the hidden node id, a MODEL input first
        (``model_input``) and one MODEL output unless ``outputs`` says otherwise."""
        return io.Schema(node_id=node_id, display_name=display_name, category=CATEGORY, description=description,
                         inputs=[io.Model.Input("model")] * model_input + list(inputs),
                         outputs=outputs if outputs is not None else [io.Model.Output()], hidden=[io.Hidden.unique_id])

    @classmethod
    def node_id(cls) -> Optional[str]:
        return cls.hidden.unique_id if cls.hidden else None


# ------------------------------------------------------------------------------------------------
# nodes that sample the model themselves (Map Reuse Search, Benchmark)
# ------------------------------------------------------------------------------------------------
def prepare_sampling(model, latent: dict, seed: int) -> tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """(latent image, noise, noise mask) from a LATENT input, as KSampler prepares them."""
    import comfy.sample
    image = comfy.sample.fix_empty_latent_channels(model, latent["samples"])
    noise = comfy.sample.prepare_noise(image, seed, latent.get("batch_index"))
    return image, noise, latent.get("noise_mask")


__all__ = ["CATEGORY", "LAST_STATS", "logger", "sigma_of", "RunContext", "Evaluation", "Run", "Technique", "installed",
           "find", "publish", "FreeSpeedNode", "prepare_sampling"]
