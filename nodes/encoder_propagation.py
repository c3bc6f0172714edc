"""FreeSpeed Encoder Propagation -- Faster Diffusion (Li et al., arXiv 2312.09608), for SD1.x/SD2.x/SDXL.

The UNet encoder's features change little between adjacent steps (paper Sec. 3.1-3.2).  At *key*
steps the whole UNet runs and the features the decoder consumes are kept; at the other steps only
the decoder runs, on the kept features, with the current timestep embedding (and, for SDXL, the
current label embedding).  Decoder-only passes do not depend on the current latent, so the passes
of several following non-key steps run as one batch (Sec. 3.3).  Prior noise injection (Sec. 3.4)
adds ``strength * z_T`` to the latent in the second half of denoising.

How it sits on ComfyUI's hooks (no class is patched globally; everything is on the cloned MODEL):

* ``DIFFUSION_MODEL`` wrapper (class_obj = the UNetModel) decides per call.  Key step: the real
  forward runs (``executor``) with a capture buffer in the call's ``transformer_options``; an
  ``output_block_patch`` installed *first* in the patch list copies what each output block is about
  to concatenate -- the middle-block output at block 0 and every skip tensor -- i.e. exactly the
  decoder's inputs, after ControlNet residuals and before any other output patch (FreeU...).
  Non-key step at a schedule sigma: the decoder-only pass (:func:`decoder_pass`, written from the
  module's own submodules: ``time_embed``, ``label_emb``, ``output_blocks`` through openaimodel's
  ``forward_timestep_embed``, ``out``) runs on the kept features, honouring block labels, the
  transformer index reached after the middle block, ``emb_patch`` and the other
  ``output_block_patch``es.  It returns the raw model output; ComfyUI's ``calculate_denoised``
  then uses this evaluation's own sigma and x.
* Features are kept per conditioning branch (cond uuid): a call is served when every branch it
  batches has features from a batch of the same per-branch size and spatial size, in whatever
  order or split ComfyUI batches them this time.
* Parallel decoding: when a decoder-only pass is needed at step j, the following non-key steps up
  to the next key step (at most ``max_parallel`` steps in all) are decoded in the same batch
  (features, context and y repeated step-major, each step with the timestep
  ``model_sampling.timestep(sigma)`` of its own schedule sigma); their outputs are kept per
  (step, branch) and served when those evaluations arrive.  The batch is built at the first
  decoder-only step after a key step, so a run that stops early decodes nothing in vain.
* Multi-evaluation samplers: evaluations at sigmas not in the schedule (dpm_2/dpmpp_2s midpoints,
  dpmpp_sde substeps) run the full UNet and cache nothing.  Heun's corrector lands on the next
  schedule sigma and is treated as that step's evaluation (the decoder-only output does not
  depend on x, so both visits get the same, correct, value).
* ControlNet: residuals are computed in ``calc_cond_batch`` before the model runs.  A
  ``CALC_COND_BATCH`` wrapper removes the ControlNet from the conds of an evaluation that will be
  served decoder-only, so the ControlNet model runs at key steps only (the paper's ControlNet
  speed-up).  ``controlnet = reuse`` (default): the kept features include the key step's residuals,
  so decoder-only steps reuse them -- what the official code does (it saves the skip features
  after adding the ControlNet residuals and runs the ControlNet only at key steps).
  ``controlnet = skip``: decoder-only steps decode features without ControlNet residuals (key
  steps still apply them; the patch applies the middle/output residuals itself, after copying the
  clean features, which is bit-identical to ComfyUI's own in-place add).  T2I-Adapter residuals
  enter inside the encoder and stay in the features in both modes.
* Prior noise injection (``PREDICT_NOISE`` wrapper): at the first evaluation of every schedule step
  from ``injection_start`` (default 50%, the paper's t/1000 < 0.5) on, the sampler's latent is
  shifted *in place* -- persistently, as the paper's ``latents = latents + 0.003 * init_latents``
  before the UNet call -- by ``strength * z_T / input_scale`` where ``input_scale =
  1/sqrt(sigma^2+1)`` converts the paper's VP latent to ComfyUI's sampler space and ``z_T`` is the
  run's own initial noise.  With heun-type samplers (two evaluations at each schedule sigma, the
  first a predictor point) the shift goes to the second one, which is the sampler's state.  With a
  noise mask (inpainting) the sampler's latent is not what the model sees, so nothing is injected.
  0 = off exactly.

Interactions: guidance passes that re-run the model at the same sigma (SAG, PAG) get the
decoder-only output at decoder-only steps; anything that must see the encoder every step
(IP-Adapter/regional patches in input blocks) only acts at key steps.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch

import comfy.patcher_extension as pe
from comfy.ldm.modules.diffusionmodules.openaimodel import forward_timestep_embed
from comfy.ldm.modules.diffusionmodules.util import timestep_embedding
from comfy_api.v0_0_2 import io

from ..core.propagation import (PAPER_INJECTION, PAPER_INJECTION_START, SCHEDULES, FeatureCache, Features,
                                OutputCache, injection_active, injection_delta, key_steps, plan_parallel,
                                repeat_batch)
from ..core.schedule import parse_percent_list
from .hooks import CATEGORY, ModelInfo, RunState, Technique, detect_model, logger, require_unet

CONTROLNET_MODES = ("reuse", "skip")
SCHEDULE_LABELS = {"paper 50ls": "50ls", "every k steps": "every_k", "custom percents": "custom"}


@dataclass(frozen=True)
class EncoderPropagationConfig:
    schedule: str = "50ls"                 # "50ls" | "every_k" | "custom"
    every_k: int = 4
    key_percents: tuple = ()               # custom schedule, fractions 0..1
    max_parallel: int = 4                  # steps decoded in one batch (1 = sequential)
    noise_injection: float = PAPER_INJECTION
    injection_start: float = PAPER_INJECTION_START
    controlnet: str = "reuse"              # "reuse" | "skip"

    def __post_init__(self):
        if self.schedule not in SCHEDULES:
            raise ValueError(f"FreeSpeed Encoder Propagation: unknown schedule {self.schedule!r}; expected one of "
                             f"{', '.join(SCHEDULES)}")
        if self.schedule == "every_k" and self.every_k < 1:
            raise ValueError("FreeSpeed Encoder Propagation: every k steps needs k >= 1")
        if self.schedule == "custom" and not self.key_percents:
            raise ValueError("FreeSpeed Encoder Propagation: the custom schedule needs at least one key percent")
        if self.max_parallel < 1:
            raise ValueError("FreeSpeed Encoder Propagation: max parallel steps must be >= 1")
        if self.noise_injection < 0:
            raise ValueError("FreeSpeed Encoder Propagation: noise injection must be >= 0 (0 = off)")
        if self.controlnet not in CONTROLNET_MODES:
            raise ValueError(f"FreeSpeed Encoder Propagation: unknown ControlNet mode {self.controlnet!r}; expected "
                             f"one of {', '.join(CONTROLNET_MODES)}")

    @property
    def schedule_label(self) -> str:
        if self.schedule == "every_k":
            return f"every {self.every_k} steps"
        if self.schedule == "custom":
            return "custom " + ", ".join(f"{100 * p:g}" for p in self.key_percents) + "%"
        return "paper 50ls"


class _Capture:
    """Capture buffer of one key-step call (lives in that call's transformer_options only)."""

    def __init__(self, owner, takeover: bool = False, ctrl_mid=None, ctrl_out=None):
        self.owner = owner
        self.mid: Optional[torch.Tensor] = None
        self.skips: list = []
        self.tindex = None
        self.takeover = takeover          # skip mode with ControlNet: the patch applies the residuals
        self.ctrl_mid = ctrl_mid or []
        self.ctrl_out = ctrl_out or []

    def __deepcopy__(self, memo):
        return self


def _apply_residual(t: torch.Tensor, residuals: list) -> torch.Tensor:
    """openaimodel.apply_control for one tensor: pop the last residual and add it in place."""
    if len(residuals) > 0:
        r = residuals.pop()
        if r is not None:
            try:
                t += r
            except Exception:
                logger.warning("FreeSpeed Encoder Propagation: control could not be applied %s %s",
                               tuple(t.shape), tuple(r.shape))
    return t


def _is_capture_patch(p) -> bool:
    return getattr(p, "__func__", None) is EncoderPropagation.output_block_patch


def decoder_pass(dm, mid: torch.Tensor, skips: list, tindex, timesteps: torch.Tensor, context, y,
                 transformer_options: dict, dtype: torch.dtype, x_shape, kwargs: dict) -> torch.Tensor:
    """The decoder half of ``UNetModel._forward`` on given middle output and skip tensors.

    ``skips[i]`` is what output block ``i`` concatenates (pop order), ``mid`` what block 0 receives.
    Mirrors the host's decoder: time embedding (+ ``emb_patch``es, + ``label_emb(y)`` for SDXL),
    block labels, the transformer index continuing from the encoder's count, the other
    ``output_block_patch``es, ``forward_timestep_embed`` with the next skip's shape, ``out``.
    The cached tensors are never modified (they are copied before any other patch sees them).
    """
    to = transformer_options
    to["original_shape"] = list(x_shape)
    if tindex is not None:
        to["transformer_index"] = tindex
    patches = to.get("patches", {})
    num_video_frames = kwargs.get("num_video_frames", getattr(dm, "default_num_video_frames", None))
    image_only_indicator = kwargs.get("image_only_indicator", None)
    time_context = kwargs.get("time_context", None)

    t_emb = timestep_embedding(timesteps, dm.model_channels, repeat_only=False).to(dtype)
    emb = dm.time_embed(t_emb)
    for p in patches.get("emb_patch", []):
        emb = p(emb, dm.model_channels, to)
    if dm.num_classes is not None:
        emb = emb + dm.label_emb(y)

    others = [p for p in patches.get("output_block_patch", []) if not _is_capture_patch(p)]
    h = mid
    n = len(dm.output_blocks)
    for i, module in enumerate(dm.output_blocks):
        to["block"] = ("output", i)
        hsp = skips[i]
        if others:
            if i == 0:
                h = h.clone()
            hsp = hsp.clone()
            for p in others:
                h, hsp = p(h, hsp, to)
        h = torch.cat([h, hsp], dim=1)
        del hsp
        output_shape = skips[i + 1].shape if i + 1 < n else None
        h = forward_timestep_embed(module, h, emb, context, to, output_shape, time_context=time_context,
                                   num_video_frames=num_video_frames, image_only_indicator=image_only_indicator)
    h = h.type(dtype)
    if getattr(dm, "predict_codebook_ids", False):
        return dm.id_predictor(h)
    return dm.out(h)


class EncoderPropagation(Technique):
    name = "Encoder Propagation"
    key = "freespeed.encoder_propagation"

    def __init__(self, config: EncoderPropagationConfig, info: ModelInfo, node_id: Optional[str] = None):
        super().__init__(info, node_id)
        self.config = config
        self._pending = (None, None)

    # -- installation -----------------------------------------------------------------------------
    def install(self, model) -> None:
        # a second Encoder Propagation on the same MODEL replaces the first
        for t in (pe.WrappersMP.OUTER_SAMPLE, pe.WrappersMP.APPLY_MODEL, pe.WrappersMP.DIFFUSION_MODEL,
                  pe.WrappersMP.CALC_COND_BATCH, pe.WrappersMP.PREDICT_NOISE):
            model.remove_wrappers_with_key(t, self.key)
        super().install(model)
        model.add_wrapper_with_key(pe.WrappersMP.DIFFUSION_MODEL, self.key, self._diffusion_model)
        model.add_wrapper_with_key(pe.WrappersMP.CALC_COND_BATCH, self.key, self._calc_cond_batch)
        model.add_wrapper_with_key(pe.WrappersMP.PREDICT_NOISE, self.key, self._predict_noise)
        # the capture patch goes first: it must see the decoder's inputs before any other output patch
        to = model.model_options.setdefault("transformer_options", {})
        patches = to.setdefault("patches", {})
        rest = [p for p in patches.get("output_block_patch", []) if not _is_capture_patch(p)]
        patches["output_block_patch"] = [self.output_block_patch] + rest

    # -- per run ----------------------------------------------------------------------------------
    def _outer_sample(self, executor, *args, **kwargs):
        if self.run is None:
            mask = args[4] if len(args) > 4 else kwargs.get("denoise_mask")
            self._pending = (args[3] if len(args) > 3 else kwargs.get("sigmas"), mask)
        try:
            return super()._outer_sample(executor, *args, **kwargs)
        finally:
            self._pending = (None, None)

    def new_run(self, schedule, noise) -> RunState:
        run = super().new_run(schedule, noise)
        cfg = self.config
        sigmas, mask = self._pending
        run.sigmas = sigmas.detach().float() if torch.is_tensor(sigmas) else torch.tensor(schedule.sigmas)
        run.keys = set(key_steps(schedule, cfg.schedule, cfg.every_k, cfg.key_percents))
        run.propagate = any(s not in run.keys for s in range(schedule.total_steps))
        run.features = FeatureCache()
        run.outputs = OutputCache()
        run.captured = set()              # (branch, step, evaluation): one capture per model evaluation
        run.pn_evals = 0                  # model evaluations (PREDICT_NOISE calls) so far
        run.full_steps = set()            # steps that ran the whole UNet
        run.decoder_steps = set()         # steps served by a decoder-only pass
        run.parallel_steps = set()        # steps decoded ahead in a batch with an earlier step
        run.largest_batch = 1
        run.parallel_peak_bytes = 0
        run.base = None
        run.has_mask = mask is not None
        run.injected = set()
        run.pn_last_step = None
        run.multistage = False
        run.z = None
        return run

    def _apply_model(self, executor, x, t, *args, **kwargs):
        run = self.run
        if run is not None and run.base is None:
            run.base = executor.class_obj
        return super()._apply_model(executor, x, t, *args, **kwargs)

    # -- prior noise injection --------------------------------------------------------------------
    def _predict_noise(self, executor, x, timestep, *args, **kwargs):
        run = self.run
        if run is not None:
            run.pn_evals += 1
            if self.config.noise_injection > 0:
                self._inject(run, executor.class_obj, x, timestep)
        return executor(x, timestep, *args, **kwargs)

    def _inject(self, run: RunState, guider, x: torch.Tensor, timestep) -> None:
        cfg = self.config
        sigma = float(timestep.max()) if torch.is_tensor(timestep) else float(timestep)
        step, extra = run.schedule.step_of(sigma)
        if extra:
            return
        second_visit = run.pn_last_step == step
        run.pn_last_step = step
        if second_visit and not run.multistage:
            # heun-type sampler: the first visit of this sigma was a predictor point; the state is now
            run.multistage = True
            if step in run.injected:
                run.injected.discard(step)
                run.count("injection_into_predictor")
        if run.multistage and not second_visit:
            return
        if step in run.injected or not injection_active(run.schedule, sigma, cfg.injection_start):
            return
        if run.has_mask:
            run.count("injection_skipped_mask")
            return
        z = run.noise
        if z is None or tuple(z.shape) != tuple(x.shape):
            run.count("injection_skipped_shape")
            return
        if run.z is None or run.z.device != x.device or run.z.dtype != x.dtype:
            run.z = z.to(device=x.device, dtype=x.dtype)
        ms = getattr(getattr(guider, "inner_model", None), "model_sampling", None)
        if ms is None and run.base is not None:
            ms = run.base.model_sampling
        scale = 1.0
        if ms is not None:
            scale = float(ms.calculate_input(torch.tensor([sigma]), torch.ones(1, 1, 1, 1)).flatten()[0])
        x.add_(injection_delta(run.z, cfg.noise_injection, scale))
        run.injected.add(step)

    # -- ControlNet: skip it at evaluations that will be served decoder-only ------------------------
    def _calc_cond_batch(self, executor, model, conds, x_in, timestep, model_options, *args, **kwargs):
        run = self.run
        if run is not None and run.propagate:
            conds = self._strip_control(run, conds, x_in, timestep)
        return executor(model, conds, x_in, timestep, model_options, *args, **kwargs)

    def _strip_control(self, run: RunState, conds, x_in, timestep):
        dicts = [d for c in conds if c is not None for d in c]
        if not any(d.get("control") is not None for d in dicts):
            return conds
        step, extra = run.schedule.step_of(float(timestep.max()))
        if extra or step in run.keys:
            return conds
        if any("area" in d or "default" in d or "uuid" not in d for d in dicts):
            return conds
        branches = [d["uuid"] for d in dicts]
        per = x_in.shape[0]
        if not (run.features.covers(branches, per, x_in.shape) or run.outputs.has(step, branches)):
            return conds
        run.count("controlnet_skipped_evaluations")
        return [None if c is None else [{k: v for k, v in d.items() if k != "control"} for d in c] for c in conds]

    # -- the UNet call ----------------------------------------------------------------------------
    def output_block_patch(self, h, hsp, transformer_options):
        """Copy the decoder's inputs at key steps (first output patch; a no-op on other calls)."""
        buf = transformer_options.get(self.key)
        if buf is None or buf.owner is not self:
            return h, hsp
        block = transformer_options.get("block") or ("output", len(buf.skips))
        if block[1] == 0:
            buf.tindex = transformer_options.get("transformer_index")
            buf.mid = h.clone()
            if buf.takeover:
                h = _apply_residual(h, buf.ctrl_mid)
        if buf.takeover:
            buf.skips.append(hsp.clone())
            hsp = _apply_residual(hsp, buf.ctrl_out)
        else:
            buf.skips.append(hsp.clone())
        return h, hsp

    def _diffusion_model(self, executor, x, timesteps=None, context=None, y=None, control=None,
                         transformer_options=None, **kwargs):
        run = self.run
        to = transformer_options

        def full(ctrl=control):
            return executor(x, timesteps, context, y, ctrl, transformer_options, **kwargs)

        if run is None or not run.propagate or to is None:
            return full()
        info = run.current
        if info is None or info.extra:
            run.count("full_extra_evaluations")
            return full()
        branches = list(to.get("uuids") or ())
        n = len(branches)
        if n == 0 or len(set(branches)) != n or x.shape[0] % n:
            run.count("full_unkeyed_calls")
            return full()
        per = x.shape[0] // n
        step = info.step
        if step in run.keys:
            return self._key_forward(run, step, executor, x, timesteps, context, y, control, to, branches, per,
                                     kwargs)
        run.outputs.drop_before(step)
        out = run.outputs.get(step, branches, per)
        if out is not None:
            run.decoder_steps.add(step)
            run.count("served_parallel_calls")
            return out
        found = run.features.lookup(branches, per, x.shape)
        if found is None:
            run.count("miss_full_calls")
            return self._key_forward(run, step, executor, x, timesteps, context, y, control, to, branches, per,
                                     kwargs)
        done = [s for s in run.outputs.steps() if run.outputs.has(s, branches)]
        plan = plan_parallel(step, run.keys, run.schedule.total_steps, self.config.max_parallel, skip=done)
        if len(plan) > 1 and run.base is None:
            plan = plan[:1]
        outs = self._decode(run, executor.class_obj, found, plan, x, timesteps, context, y, to, branches, per,
                            kwargs)
        run.decoder_steps.add(step)
        run.count("decoder_only_calls")
        for s, o in zip(plan[1:], outs[1:]):
            run.outputs.put(s, branches, per, o)
            run.parallel_steps.add(s)
        return outs[0]

    def _key_forward(self, run, step, executor, x, timesteps, context, y, control, to, branches, per, kwargs):
        run.full_steps.add(step)
        if all((b, step, run.pn_evals) in run.captured for b in branches):
            # an extra pass of the same model evaluation (SAG/PAG re-run the model at the same sigma on a
            # modified input or with modified patches): run it, keep the main pass's features
            run.count("full_uncaptured_calls")
            return executor(x, timesteps, context, y, control, to, **kwargs)
        ctrl = control
        buf = _Capture(self)
        if self.config.controlnet == "skip" and control is not None and (control.get("middle") or control.get("output")):
            buf = _Capture(self, True, list(control.get("middle") or []), list(control.get("output") or []))
            ctrl = dict(control)
            ctrl["middle"] = []
            ctrl["output"] = []
        to[self.key] = buf
        try:
            out = executor(x, timesteps, context, y, ctrl, to, **kwargs)
        finally:
            to.pop(self.key, None)
        dm = executor.class_obj
        if buf.mid is None or len(buf.skips) != len(dm.output_blocks):
            run.count("capture_incomplete")
            return out
        feats = Features(tuple(branches), per, buf.mid, buf.skips, step,
                         meta={"tindex": buf.tindex, "x_shape": tuple(x.shape)})
        run.outputs.invalidate(branches)
        run.features.put(feats)
        run.captured.update((b, step, run.pn_evals) for b in branches)
        return out

    def _decode(self, run, dm, found, plan, x, timesteps, context, y, to, branches, per, kwargs) -> list:
        mid, skips, meta = found
        k = len(plan)
        if k == 1:
            out = decoder_pass(dm, mid, skips, meta.get("tindex"), timesteps, context, y, to, x.dtype, x.shape, kwargs)
            return [out]
        b = x.shape[0]
        ms = run.base.model_sampling
        ts = [timesteps]
        for s in plan[1:]:
            sig = run.sigmas[s:s + 1].to(device=timesteps.device, dtype=torch.float32)
            ts.append(ms.timestep(sig).float().to(timesteps.dtype).expand(b))
        t = torch.cat(ts, dim=0)
        to_k = dict(to)
        to_k["cond_or_uncond"] = list(to.get("cond_or_uncond") or []) * k
        to_k["uuids"] = list(branches) * k
        mid_k = repeat_batch(mid, k)
        skips_k = [repeat_batch(s_, k) for s_ in skips]
        ctx_k = repeat_batch(context, k)
        y_k = repeat_batch(y, k)
        batch_bytes = sum(tt.numel() * tt.element_size() for tt in [mid_k] + skips_k)
        if ctx_k is not None:
            batch_bytes += ctx_k.numel() * ctx_k.element_size()
        run.parallel_peak_bytes = max(run.parallel_peak_bytes, batch_bytes)
        run.largest_batch = max(run.largest_batch, k)
        out = decoder_pass(dm, mid_k, skips_k, meta.get("tindex"), t, ctx_k, y_k, to_k, x.dtype,
                           [k * b] + list(x.shape[1:]), kwargs)
        for key_ in ("block", "transformer_index", "original_shape"):
            if key_ in to_k:
                to[key_] = to_k[key_]
        return list(out.chunk(k, dim=0))

    # -- stats ------------------------------------------------------------------------------------
    def stats(self, run: RunState) -> dict[str, Any]:
        s = super().stats(run)
        cfg = self.config
        total = run.schedule.total_steps
        full = run.full_steps if run.propagate else set(run.steps_seen)
        s["schedule"] = cfg.schedule_label
        s["planned_key_steps"] = sorted(run.keys)
        s["key_steps"] = len(full)
        s["decoder_only_steps"] = len(run.decoder_steps - full)
        s["parallel_steps"] = len(run.parallel_steps & run.decoder_steps)
        s["max_parallel"] = cfg.max_parallel
        s["largest_parallel_batch"] = run.largest_batch
        s["feature_cache_peak_mb"] = round(run.features.peak_bytes / 2 ** 20, 2)
        s["parallel_batch_peak_mb"] = round(run.parallel_peak_bytes / 2 ** 20, 2)
        s["parallel_outputs_peak_mb"] = round(run.outputs.peak_bytes / 2 ** 20, 2)
        s["noise_injection"] = cfg.noise_injection
        s["injected_steps"] = len(run.injected)
        s["controlnet"] = cfg.controlnet
        s["steps"] = total
        return s

    def summary(self, s: dict[str, Any]) -> str:
        inj = (f"prior noise {s['noise_injection']:g}·z_T at {s['injected_steps']} steps"
               if s["noise_injection"] > 0 else "no noise injection")
        extra = s.get("full_extra_evaluations", 0) + s.get("miss_full_calls", 0) + s.get("full_unkeyed_calls", 0)
        cn = s.get("controlnet_skipped_evaluations", 0)
        return (f"{s['steps']} steps ({s['schedule']}): {s['key_steps']} key steps (full UNet), "
                f"{s['decoder_only_steps']} decoder-only ({s['parallel_steps']} decoded in parallel, batches up to "
                f"{s['largest_parallel_batch']} steps), {extra} other full evaluations, "
                f"{'ControlNet skipped at ' + str(cn) + ' evaluations, ' if cn else ''}{inj}; "
                f"features {s['feature_cache_peak_mb']:g} MB, parallel batch {s['parallel_batch_peak_mb']:g} MB, "
                f"{s['wall_s']:.2f} s")


def apply_encoder_propagation(model, config: EncoderPropagationConfig, node_id: Optional[str] = None):
    """Clone ``model`` and install encoder propagation on the clone (the input MODEL is untouched)."""
    info = detect_model(model)
    require_unet(info, "Encoder Propagation",
                 "Encoder propagation reuses the encoder (input + middle blocks) of a UNet between steps; "
                 "this model has no UNet encoder/decoder split.")
    dm = model.model.diffusion_model
    if not all(hasattr(dm, a) for a in ("input_blocks", "output_blocks", "time_embed", "out")):
        raise ValueError(f"FreeSpeed Encoder Propagation: {info.model_class} has an unexpected UNet layout")
    m = model.clone()
    EncoderPropagation(config, info, node_id).install(m)
    return m


class EncoderPropagationNode(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="FreeSpeedEncoderPropagation",
            display_name="FreeSpeed Encoder Propagation",
            category=CATEGORY,
            description=("Faster Diffusion (arXiv 2312.09608): the UNet encoder runs only at key steps; the other steps "
                         "run the decoder on the key step's encoder features, several of them in one batch. "
                         "SD1.x, SD2.x and SDXL. Paper: ~1.7x on SD1.5 (DDIM 50), ~2x with ControlNet."),
            inputs=[
                io.Model.Input("model"),
                io.Combo.Input("schedule", options=list(SCHEDULE_LABELS), default="paper 50ls",
                               tooltip="Which steps run the whole UNet (key steps). paper 50ls: the paper's DDIM-50 "
                                       "key steps 0,1,2,3,5,10,15,25,35 as percents of denoising (0,2,4,6,10,20,30,50,"
                                       "70%), so other step counts hit the same points. every k steps: steps 0, k, "
                                       "2k... custom percents: the list below. The first step is always a key step."),
                io.Int.Input("every_k", default=4, min=1, max=50,
                             tooltip="For 'every k steps': a key step every k steps (1 = every step, nothing skipped)."),
                io.String.Input("key_percents", default="0, 2, 4, 6, 10, 20, 30, 50, 70",
                                tooltip="For 'custom percents': key steps as percents of denoising; each maps to the "
                                        "first step of the run at or past it."),
                io.Int.Input("max_parallel_steps", default=4, min=1, max=16,
                             tooltip="How many decoder-only steps are decoded in one batch (1 = one at a time). "
                                     "More is faster on a GPU with spare capacity and costs memory: the decoder's "
                                     "activations grow with the batch (reported in the stats)."),
                io.Float.Input("noise_injection", default=PAPER_INJECTION, min=0.0, max=0.1, step=0.001,
                               tooltip="Prior noise injection: adds this multiple of the run's initial noise to the "
                                       "latent at each step from 'injection_start' on (paper: 0.003 in the second "
                                       "half), restoring texture. 0 = off."),
                io.Float.Input("injection_start", default=PAPER_INJECTION_START, min=0.0, max=1.0, step=0.01,
                               tooltip="Where noise injection starts, in percent of denoising (paper: 0.5)."),
                io.Combo.Input("controlnet", options=list(CONTROLNET_MODES), default="reuse",
                               tooltip="The ControlNet runs only at key steps. reuse: decoder-only steps keep the key "
                                       "step's ControlNet residuals (as the official code does). skip: decoder-only "
                                       "steps decode without ControlNet residuals."),
            ],
            outputs=[io.Model.Output()],
            hidden=[io.Hidden.unique_id],
        )

    @classmethod
    def validate_inputs(cls, schedule=None, controlnet=None):
        # ComfyUI 0.3.64 compares V1 list combos with their options, never a V3 Combo: check them here
        if schedule is not None and schedule not in SCHEDULE_LABELS:
            return f"schedule must be one of {', '.join(SCHEDULE_LABELS)}, got {schedule!r}"
        if controlnet is not None and controlnet not in CONTROLNET_MODES:
            return f"controlnet must be one of {', '.join(CONTROLNET_MODES)}, got {controlnet!r}"
        return True

    @classmethod
    def execute(cls, model, schedule, every_k, key_percents, max_parallel_steps, noise_injection, injection_start,
                controlnet) -> io.NodeOutput:
        mode = SCHEDULE_LABELS.get(schedule, schedule)
        percents = tuple(parse_percent_list(key_percents)) if mode == "custom" else ()
        config = EncoderPropagationConfig(mode, int(every_k), percents, int(max_parallel_steps), float(noise_injection),
                                          float(injection_start), controlnet)
        node_id = cls.hidden.unique_id if cls.hidden else None
        return io.NodeOutput(apply_encoder_propagation(model, config, node_id=node_id))
