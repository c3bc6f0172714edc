"""Encoder propagation on DiTs (issue 15; Faster Diffusion, arXiv 2312.09608 v2, whose DiT experiment takes the
first 18 of 28 blocks as the "encoder": -34% time).  A DiT has no encoder/decoder split and no skip features:
here the front blocks [0, split) are the encoder.  At key steps every block runs and the residual the front
range added is kept (output minus input, per stream: Flux double blocks and SD3/Qwen-Image blocks have an image
and a text stream, Flux single blocks see ``cat(txt, img)``, Wan and PixArt one image stream).  At the other
steps the front blocks are skipped: the last one returns *this step's* input plus the kept residual, so the
current latent still flows through, and only the rear blocks run.

Parallel rear passes (the UNet version's parallel decoding) are not possible: each step's rear blocks need
that step's own input.  ControlNet residuals of rear blocks are applied live; those of front blocks are part of
the key step's residual.  Hooks: chained ``dit`` block replaces (PixArt: object patches of ``blocks.N.forward``)
and an APPLY_MODEL wrapper deciding each call.  Notes: docs/encoder_propagation.md.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch

import comfy.patcher_extension as pe

from ...core.batch import BatchLayout
from ...core.propagation import DeltaCache, front_blocks, warmup_keys
from ..dit import apply_args, skipped_blocks
from ..hooks import RunContext, Technique, installed, logger
from ..sites import BlockSite, add_block_replace, block_sites, patch_forward
from .config import EncPropRun, injection_strength
from .unet import EncoderPropagation

FULL, KEY, PROPAGATE = "full", "key", "propagate"


@dataclass
class FrontCall:
    """One model call: what its front blocks do, the front input (``in0``) and the residual served."""
    mode: str
    layout: BatchLayout
    step: int
    in0: Optional[dict] = None
    delta: Optional[dict] = None
    first: int = 0                  # the first and last front blocks that run in this call (Chroma skip lists)
    last: int = -1


@dataclass
class EncPropDiTRun(EncPropRun):
    deltas: DeltaCache = field(default_factory=DeltaCache)
    call: Optional[FrontCall] = None


def two_streams(family: str, kind: str) -> bool:
    return kind in ("double", "joint") or (kind == "block" and family == "qwen")


class EncPropDiT(EncoderPropagation):
    """Front-block residual propagation on a DiT (same key, config and stats as Encoder Propagation)."""

    def __init__(self, config, info, node_id: Optional[str] = None):
        super().__init__(config, info, node_id)
        self.front: list[BlockSite] = []
        self.total = 0
        self.dm = None

    def install(self, model) -> None:
        self.replace_earlier(model)             # applied twice: the later node replaces the earlier
        Technique.install(self, model)          # run wrappers; PREDICT_NOISE: prior noise injection (evaluate)
        sites = block_sites(model, self.info)
        self.dm = model.model.diffusion_model
        self.total = len(sites)
        n_front = front_blocks(len(sites), self.config.dit_front)
        pruned = min((t.start for t in installed(model, "freespeed.atedm") if hasattr(t, "sites")), default=n_front)
        if pruned < n_front:                   # AT-EDM prunes from that block on: the front stops before it
            logger.warning("FreeSpeed %s: AT-EDM prunes from block %d on; the propagated front is blocks 0-%d "
                           "instead of 0-%d", self.name, pruned, pruned - 1, n_front - 1)
            n_front = pruned
        self.front = sites[:n_front]
        if not self.front:
            return
        model.add_wrapper_with_key(pe.WrappersMP.APPLY_MODEL, self.key, self._apply_model)
        for i, site in enumerate(self.front):
            if site.replace_key is None:         # PixArt: blocks.N.forward(x, y, t, mask=None, HW=None, **kw)
                patch_forward(model, site.path, lambda orig, s=site, i=i: self._pixart_block(s, i, orig))
            else:
                add_block_replace(model, site, lambda args, extra, s=site, i=i: self._block(s, i, args, extra))
        if self.config.max_parallel > 1:
            logger.debug("FreeSpeed %s: parallel passes do not apply to DiTs (each step needs its own input)",
                         self.name)

    def new_run(self, ctx: RunContext) -> EncPropDiTRun:
        base = super().new_run(ctx)
        cfg = self.config
        keys = base.keys | warmup_keys(ctx.schedule, cfg.dit_warmup, cfg.dit_every)    # DiT defaults: late only
        propagate = any(s not in keys for s in range(ctx.schedule.total_steps))
        strength = injection_strength(cfg, ctx.model_sampling, propagate)
        base.stats.max_parallel = 1
        base.stats.front_blocks = f"{len(self.front)}/{self.total}"
        base.stats.noise_injection = strength
        return EncPropDiTRun(base.ctx, base.stats, keys=keys, propagate=propagate, strength=strength)

    # -- the call's decision -------------------------------------------------------------------------------
    def _apply_model(self, executor, x, t, *args, **kwargs):
        run = self.run
        ev = run.eval if run is not None else None
        if ev is None or not run.propagate:
            return executor(x, t, *args, **kwargs)
        info, st = ev.info, run.stats
        layout = BatchLayout.from_options(apply_args(args, kwargs).get("transformer_options"), x.shape[0])
        if info.extra:
            mode = FULL
            st.full_extra_evaluations += 1
        elif not layout.keyed:
            mode = FULL
            st.full_unkeyed_calls += 1
        else:
            mode = KEY if info.step in run.keys else PROPAGATE
        gone = skipped_blocks(self.dm)
        running = [i for i, s in enumerate(self.front) if (s.kind, s.index) not in gone]
        if not running:
            mode = FULL
        call = FrontCall(mode, layout, info.step, first=running[0] if running else 0,
                         last=running[-1] if running else -1)
        prev, run.call = run.call, call
        try:
            return executor(x, t, *args, **kwargs)
        finally:
            run.call = prev
            if call.mode == PROPAGATE:
                run.decoder_steps.add(call.step)
                st.decoder_only_calls += 1
            elif call.mode == KEY:
                run.full_steps.add(call.step)

    # -- the front blocks ----------------------------------------------------------------------------------
    def _front(self, site: BlockSite, i: int, streams: dict, run_original):
        """The streams a front block returns (``run_original()`` runs the block itself)."""
        run = self.run
        call = run.call if run is not None else None
        if call is None or call.mode == FULL:
            return run_original()
        last = i == call.last
        if i == call.first:
            call.in0 = {k: v.clone() for k, v in streams.items() if torch.is_tensor(v)}
            if call.mode == PROPAGATE:
                base = self._as_kind(call.in0, self.front[call.last].kind)
                per = call.layout.per
                call.delta = run.deltas.get(call.layout.uuids, per,
                                            {k: (per,) + tuple(v.shape[1:]) for k, v in base.items()})
                if call.delta is None:
                    call.mode = KEY
                    run.stats.miss_full_calls += 1
        if call.mode == KEY:
            out = run_original()
            if last and call.in0 is not None:
                base = self._as_kind(call.in0, site.kind)
                delta = {k: out[k] - base[k] for k in base if torch.is_tensor(out.get(k))}
                run.deltas.put(call.layout.uuids, call.layout.per, delta, call.step)
            return out
        if not last:
            return streams                       # skipped: the input passes through
        base = self._as_kind(call.in0, site.kind)
        return {k: base[k] + call.delta[k].to(base[k].dtype) for k in base}

    def _as_kind(self, in0: dict, kind: str) -> dict:
        """The front input in the layout of a block kind (Flux: double ``img``/``txt`` -> single ``cat``)."""
        if kind == "single" and "cat" not in in0:
            return {"cat": torch.cat((in0["txt"], in0["img"]), dim=1)}
        return in0

    def _block(self, site: BlockSite, i: int, args: dict, extra: dict):
        fam = self.info.family
        if site.kind == "single":
            streams = {"cat": args["img"]}
        elif two_streams(fam, site.kind):
            streams = {"img": args["img"], "txt": args["txt"]}
        else:
            streams = {"img": args["img"]}

        def run_original():
            out = extra["original_block"](args)
            return {"cat": out["img"]} if site.kind == "single" else dict(out)

        out = self._front(site, i, streams, run_original)
        if site.kind == "single":
            return {"img": out["cat"]}
        return out

    def _pixart_block(self, site: BlockSite, i: int, orig):
        tech = self

        def forward(x, *args, **kwargs):
            out = tech._front(site, i, {"img": x}, lambda: {"img": orig(x, *args, **kwargs)})
            return out["img"]
        return forward

    # -- stats -------------------------------------------------------------------------------------------
    def finish_stats(self, run: EncPropDiTRun) -> None:
        s = self.schedule_stats(run)
        s.feature_cache_peak_mb = round(run.deltas.peak_bytes / 2 ** 20, 2)
        s.front_share = round(len(self.front) / self.total, 3) if self.total else 0.0
        run.deltas.clear()


__all__ = ["EncPropDiT", "FrontCall", "two_streams"]
