"""The UNet's decoder half on kept encoder features (Faster Diffusion's decoder-only pass, arXiv 2312.09608
Sec. 3.2), built from the UNet's own submodules and openaimodel's ``forward_timestep_embed``; and the
capture buffer the key-step pass fills through an ``output_block_patch``."""
from __future__ import annotations

from typing import Optional

import torch

from comfy.ldm.modules.diffusionmodules.openaimodel import forward_timestep_embed
from comfy.ldm.modules.diffusionmodules.util import timestep_embedding

from ...core.propagation import repeat_batch
from ..hooks import logger


class Capture:
    """Capture buffer of one key-step call (lives in that call's transformer_options only): the middle
    output, every skip tensor (decoder inputs, pop order) and the transformer index after the middle."""

    def __init__(self, takeover: bool = False, ctrl_mid=None, ctrl_out=None):
        self.mid: Optional[torch.Tensor] = None
        self.skips: list = []
        self.tindex = None
        self.takeover = takeover          # ControlNet "skip" mode: the patch applies the residuals itself
        self.ctrl_mid = ctrl_mid or []
        self.ctrl_out = ctrl_out or []

    def __deepcopy__(self, memo):
        return self

    def take(self, h, hsp, transformer_options):
        """The output_block_patch body: copy what the block is about to concatenate (before any other patch)."""
        block = transformer_options.get("block") or ("output", len(self.skips))
        if block[1] == 0:
            self.tindex = transformer_options.get("transformer_index")
            self.mid = h.clone()
            if self.takeover:
                h = apply_residual(h, self.ctrl_mid)
        self.skips.append(hsp.clone())
        if self.takeover:
            hsp = apply_residual(hsp, self.ctrl_out)
        return h, hsp


def apply_residual(t: torch.Tensor, residuals: list) -> torch.Tensor:
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


def decoder_pass(dm, mid: torch.Tensor, skips: list, tindex, timesteps: torch.Tensor, context, y,
                 transformer_options: dict, dtype: torch.dtype, x_shape, kwargs: dict,
                 output_patches: list) -> torch.Tensor:
    """The decoder half of ``UNetModel._forward`` on given middle output and skip tensors.

    ``skips[i]`` is what output block ``i`` concatenates, ``mid`` what block 0 receives.  Mirrors the
    host's decoder: time embedding (+ ``emb_patch``es, + ``label_emb(y)`` for SDXL), block labels, the
    transformer index continuing from the encoder's count, ``output_patches`` (the other nodes'
    ``output_block_patch``es), ``forward_timestep_embed`` with the next skip's shape, ``out``.  The
    kept tensors are never modified (copied before any patch sees them).
    """
    to = transformer_options
    to["original_shape"] = list(x_shape)
    if tindex is not None:
        to["transformer_index"] = tindex
    num_video_frames = kwargs.get("num_video_frames", getattr(dm, "default_num_video_frames", None))
    image_only_indicator = kwargs.get("image_only_indicator", None)
    time_context = kwargs.get("time_context", None)

    t_emb = timestep_embedding(timesteps, dm.model_channels, repeat_only=False).to(dtype)
    emb = dm.time_embed(t_emb)
    for p in to.get("patches", {}).get("emb_patch", []):
        emb = p(emb, dm.model_channels, to)
    if dm.num_classes is not None:
        emb = emb + dm.label_emb(y)

    h = mid
    n = len(dm.output_blocks)
    for i, module in enumerate(dm.output_blocks):
        to["block"] = ("output", i)
        hsp = skips[i]
        if output_patches:
            if i == 0:
                h = h.clone()
            hsp = hsp.clone()
            for p in output_patches:
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


def decode_steps(decode, dm, mid, skips, tindex, timesteps: list, context, y, to: dict, branches: list, dtype,
                 x_shape, kwargs) -> tuple[list, int]:
    """Decoder-only passes of several steps in one batch (Faster Diffusion Sec. 3.3): the kept features,
    context and y repeated step-major, each step with its own timesteps.  ``decode`` is
    :func:`decoder_pass` bound to the call's output patches.  Returns (one output per step, batch bytes)."""
    k, b = len(timesteps), x_shape[0]
    to_k = dict(to)
    to_k["cond_or_uncond"] = list(to.get("cond_or_uncond") or []) * k
    to_k["uuids"] = list(branches) * k
    mid_k, skips_k = repeat_batch(mid, k), [repeat_batch(s_, k) for s_ in skips]
    ctx_k, y_k = repeat_batch(context, k), repeat_batch(y, k)
    batch_bytes = sum(t.numel() * t.element_size() for t in [mid_k] + skips_k + ([ctx_k] if ctx_k is not None else []))
    out = decode(dm, mid_k, skips_k, tindex, torch.cat(timesteps, dim=0), ctx_k, y_k, to_k, dtype,
                 [k * b] + list(x_shape[1:]), kwargs)
    for key in ("block", "transformer_index", "original_shape"):
        if key in to_k:
            to[key] = to_k[key]
    return list(out.chunk(k, dim=0)), batch_bytes


__all__ = ["Capture", "apply_residual", "decoder_pass", "decode_steps"]
