"""FreeSpeed Encoder Propagation (Faster Diffusion, Li et al., arXiv 2312.09608): the whole UNet runs at key
steps (its decoder inputs are kept), the other steps run the decoder only (``unet_decoder.decoder_pass``),
several in one batch; prior noise injection in the second half.  Schedules and caches are in
``core/propagation.py``; design notes (hooks, ControlNet, multi-stage samplers): docs/encoder_propagation.md.
"""
from __future__ import annotations


import torch

import comfy.patcher_extension as pe

from ...core.batch import BatchLayout
from ...core.propagation import (Features, control_branches, injection_active, injection_delta, key_steps,
    plan_parallel, without_control)
from ...core.stats import EncoderPropagationStats
from ..hooks import Evaluation, RunContext, Technique, logger
from .config import EncPropRun, EncoderPropagationConfig, injection_strength
from .unet_decoder import Capture, decode_steps, decoder_pass


class EncoderPropagation(Technique[EncPropRun]):
    name = "Encoder Propagation"
    key = "freespeed.encoder_propagation"
    stats_type = EncoderPropagationStats

    config: EncoderPropagationConfig

    def install(self, model) -> None:
        # a second Encoder Propagation on the same MODEL replaces the first
        for t in (pe.WrappersMP.OUTER_SAMPLE, pe.WrappersMP.DIFFUSION_MODEL, pe.WrappersMP.CALC_COND_BATCH,
                  pe.WrappersMP.PREDICT_NOISE):
            model.remove_wrappers_with_key(t, self.key)
        super().install(model)
        model.add_wrapper_with_key(pe.WrappersMP.DIFFUSION_MODEL, self.key, self._diffusion_model)
        model.add_wrapper_with_key(pe.WrappersMP.CALC_COND_BATCH, self.key, self._calc_cond_batch)
        # the capture patch goes first: it must see the decoder's inputs before any other output patch
        patches = model.model_options.setdefault("transformer_options", {}).setdefault("patches", {})
        rest = [p for p in patches.get("output_block_patch", []) if not _is_capture_patch(p)]
        patches["output_block_patch"] = [self.output_block_patch] + rest

    def new_run(self, ctx: RunContext) -> EncPropRun:
        cfg = self.config
        keys = set(key_steps(ctx.schedule, cfg.schedule, cfg.every_k, cfg.key_percents))
        propagate = any(s not in keys for s in range(ctx.schedule.total_steps))
        strength = injection_strength(cfg, ctx.model_sampling, propagate)
        return EncPropRun(ctx, EncoderPropagationStats(schedule=cfg.schedule_label, max_parallel=cfg.max_parallel,
                                                       noise_injection=strength, controlnet=cfg.controlnet),
                          keys=keys, propagate=propagate, strength=strength)

    # -- prior noise injection (PREDICT_NOISE) ------------------------------------------------------
    def evaluate(self, run: EncPropRun, ev: Evaluation, executor, x, timestep, *args, **kwargs):
        if run.strength > 0:
            self._inject(run, ev, x)
        return executor(x, timestep, *args, **kwargs)

    def _inject(self, run: EncPropRun, ev: Evaluation, x: torch.Tensor) -> None:
        """Shift the sampler's latent in place by strength * z_T (scaled to sampler space), once per step
        from ``injection_start`` on (``core.propagation.InjectionSteps`` picks the evaluation)."""
        info, st = ev.info, run.stats
        if info.extra or not run.injection.wants(
                info.step, injection_active(run.schedule, info.sigma, self.config.injection_start)):
            return
        z = run.ctx.noise
        if run.ctx.mask is not None:
            st.injection_skipped_mask += 1
        elif z is None or tuple(z.shape) != tuple(x.shape):
            st.injection_skipped_shape += 1
        else:
            if run.z is None or run.z.device != x.device or run.z.dtype != x.dtype:
                run.z = z.to(device=x.device, dtype=x.dtype)
            ms = run.ctx.model_sampling
            scale = 1.0 if ms is None else float(
                ms.calculate_input(torch.tensor([info.sigma]), torch.ones(1, 1, 1, 1)).flatten()[0])
            x.add_(injection_delta(run.z, run.strength, scale))
            run.injection.done(info.step)

    # -- ControlNet: skip it at evaluations that will be served decoder-only ------------------------
    def _calc_cond_batch(self, executor, model, conds, x_in, timestep, model_options, *args, **kwargs):
        run = self.run
        if run is not None and run.propagate and not run.neighbours_checked:
            run.neighbours_checked = True
            self._check_easycache(model_options)
        if run is not None and run.propagate and run.eval is not None:
            conds = self._strip_control(run, conds, x_in)
        return executor(model, conds, x_in, timestep, model_options, *args, **kwargs)

    def _check_easycache(self, model_options) -> None:
        """EasyCache added after this node sits inside its DIFFUSION_MODEL wrapper: decoder-only steps never
        reach it, so it can only skip key steps (say so once per run)."""
        to = (model_options or {}).get("transformer_options") or {}
        if type(to.get("easycache")).__name__ != "EasyCacheHolder":
            return
        order = list(((to.get("wrappers") or {}).get(pe.WrappersMP.DIFFUSION_MODEL) or {}).keys())
        if self.key in order and "easycache" in order and order.index(self.key) < order.index("easycache"):
            logger.warning("FreeSpeed Encoder Propagation: EasyCache comes after Encoder Propagation, so decoder-only "
                           "steps never reach it and it can only skip key steps; put EasyCache before Encoder "
                           "Propagation (closer to the model loader) to let it skip any step")

    def _strip_control(self, run: EncPropRun, conds, x_in):
        info = run.eval.info
        branches = None if info.extra or info.step in run.keys else control_branches(conds)
        if branches is None or not (run.features.covers(branches, x_in.shape[0], x_in.shape)
                                    or run.outputs.has(info.step, branches)):
            return conds
        run.stats.controlnet_skipped_evaluations += 1
        return without_control(conds)

    # -- the UNet call ----------------------------------------------------------------------------
    def output_block_patch(self, h, hsp, transformer_options):
        """Copy the decoder's inputs at key steps (first output patch; a no-op on other calls)."""
        buf = transformer_options.get(self.key)
        return (h, hsp) if buf is None else buf.take(h, hsp, transformer_options)

    def _diffusion_model(self, executor, x, timesteps=None, context=None, y=None, control=None,
                         transformer_options=None, **kwargs):
        run = self.run
        to = transformer_options
        if run is None or not run.propagate or to is None or run.eval is None:
            return executor(x, timesteps, context, y, control, transformer_options, **kwargs)
        info, st = run.eval.info, run.stats
        if info.extra:
            st.full_extra_evaluations += 1
            return executor(x, timesteps, context, y, control, transformer_options, **kwargs)
        layout = BatchLayout.from_options(to, x.shape[0])
        if not layout.keyed:
            st.full_unkeyed_calls += 1
            return executor(x, timesteps, context, y, control, transformer_options, **kwargs)
        branches, per, step = list(layout.uuids), layout.per, info.step
        call = (executor, x, timesteps, context, y, control, to, branches, per, kwargs)
        if step in run.keys:
            return self.key_forward(run, step, *call)
        run.outputs.drop_before(step)
        out = run.outputs.get(step, branches, per)
        if out is not None:
            run.decoder_steps.add(step)
            st.served_parallel_calls += 1
            return out
        found = run.features.lookup(branches, per, x.shape)
        if found is None:
            st.miss_full_calls += 1
            return self.key_forward(run, step, *call)
        done = [s for s in run.outputs.steps() if run.outputs.has(s, branches)]
        plan = plan_parallel(step, run.keys, run.schedule.total_steps, self.config.max_parallel, skip=done)
        if len(plan) > 1 and run.ctx.model_sampling is None:
            plan = plan[:1]
        outs = self._decode(run, executor.class_obj, found, plan, x, timesteps, context, y, to, branches, kwargs)
        run.decoder_steps.add(step)
        st.decoder_only_calls += 1
        for s, o in zip(plan[1:], outs[1:]):
            run.outputs.put(s, branches, per, o)
            run.parallel_steps.add(s)
        return outs[0]

    def key_forward(self, run, step, executor, x, timesteps, context, y, control, to, branches, per, kwargs):
        run.full_steps.add(step)
        ev = run.eval.index
        if all((b, step, ev) in run.captured for b in branches):
            # an extra pass of the same model evaluation (SAG/PAG re-run the model at the same sigma on a
            # modified input or with modified patches): run it, keep the main pass's features
            run.stats.full_uncaptured_calls += 1
            return executor(x, timesteps, context, y, control, to, **kwargs)
        ctrl, buf = control, Capture()
        if self.config.controlnet == "skip" and control is not None and (control.get("middle") or control.get("output")):
            buf = Capture(True, list(control.get("middle") or []), list(control.get("output") or []))
            ctrl = dict(control)
            ctrl["middle"] = []
            ctrl["output"] = []
        to[self.key] = buf
        try:
            out = executor(x, timesteps, context, y, ctrl, to, **kwargs)
        finally:
            to.pop(self.key, None)
        if buf.mid is None or len(buf.skips) != len(executor.class_obj.output_blocks):
            run.stats.capture_incomplete += 1
            return out
        run.outputs.invalidate(branches)
        run.features.put(Features(tuple(branches), per, buf.mid, buf.skips, step,
                                  meta={"tindex": buf.tindex, "x_shape": tuple(x.shape)}))
        run.captured.update((b, step, ev) for b in branches)
        return out

    @staticmethod
    def decode(dm, mid, skips, tindex, timesteps, context, y, to: dict, dtype, x_shape, kwargs) -> torch.Tensor:
        """The decoder-only pass with the call's other output patches (not the capture patch)."""
        others = [p for p in to.get("patches", {}).get("output_block_patch", []) if not _is_capture_patch(p)]
        return decoder_pass(dm, mid, skips, tindex, timesteps, context, y, to, dtype, x_shape, kwargs, others)

    def _decode(self, run, dm, found, plan, x, timesteps, context, y, to, branches, kwargs) -> list:
        mid, skips, meta = found
        if len(plan) == 1:
            return [self.decode(dm, mid, skips, meta.get("tindex"), timesteps, context, y, to, x.dtype, x.shape,
                                kwargs)]
        ms, b = run.ctx.model_sampling, x.shape[0]
        ts = [timesteps] + [ms.timestep(run.ctx.sigmas[s:s + 1].to(device=timesteps.device, dtype=torch.float32))
                            .float().to(timesteps.dtype).expand(b) for s in plan[1:]]
        outs, batch_bytes = decode_steps(self.decode, dm, mid, skips, meta.get("tindex"), ts, context, y, to, branches,
                                         x.dtype, x.shape, kwargs)
        run.parallel_peak_bytes = max(run.parallel_peak_bytes, batch_bytes)
        run.largest_batch = max(run.largest_batch, len(plan))
        return outs

    def schedule_stats(self, run: EncPropRun):
        """The run's stats with what the UNet and DiT paths share filled in: key and decoder-only steps, noise
        injection."""
        s = run.stats
        full = run.full_steps if run.propagate else set(run.steps_seen)
        s.planned_key_steps = sorted(run.keys)
        s.key_steps = len(full)
        s.decoder_only_steps = len(run.decoder_steps - full)
        s.injected_steps = len(run.injection.injected)
        s.injection_into_predictor = run.injection.moved_from_predictor
        return s

    def finish_stats(self, run: EncPropRun) -> None:
        s = self.schedule_stats(run)
        s.parallel_steps = len(run.parallel_steps & run.decoder_steps)
        s.largest_parallel_batch = run.largest_batch
        s.feature_cache_peak_mb = round(run.features.peak_bytes / 2 ** 20, 2)
        s.parallel_batch_peak_mb = round(run.parallel_peak_bytes / 2 ** 20, 2)
        s.parallel_outputs_peak_mb = round(run.outputs.peak_bytes / 2 ** 20, 2)


def _is_capture_patch(p) -> bool:
    return getattr(p, "__func__", None) is EncoderPropagation.output_block_patch
