"""T-GATE on joint-attention DiTs (Flux/Chroma, SD3, Qwen-Image; issue 15): there is no cross-attention to
cache, the text tokens take part in every block's joint attention.  The analogue of T-GATE's frozen
cross-attention is a frozen *text stream*: at the cache step every block's text keys/values (what the image
queries attend to) are kept as the mean of the cond and uncond branches; after the gate each block runs its
image stream with a one-token stand-in for the text stream, and the attention override puts the cached text
keys/values back in front of the image keys/values.  The text tokens' projections, MLPs and query rows are
skipped; CFG is dropped after the gate exactly as on UNets (``nodes/tgate/``'s CALC_COND_BATCH).

Hooks: a chained ``dit`` block replace per block (marks the call and strips the text stream) and the chained
attention override (captures / swaps the text keys/values).  All-or-nothing per model call: a call where any
block has no cache (or that carries an attention mask) computes in full.  Notes: docs/tgate.md.
"""
from __future__ import annotations

from typing import Optional

import torch

from ...core.gating import CACHE, COMPUTE, REUSE, branch_mean
from ..dit import block_of, layout_of, parse_attention, role_of, tag_blocks, tagged_args, with_layout
from ..hooks import logger
from ..sites import ModelInfo, add_attention_override, add_block_replace, block_sites
from .config import Call, TGateConfig, TGateRun
from .unet import TGate


MARK = "freespeed.tgate"


def pe_token_dim(pe: torch.Tensor, n: int) -> Optional[int]:
    """The token dimension of a rotary table (Flux ``[B, 1, L, ...]``: 2; Qwen-Image ``[B, L, 1, ...]``: 1)."""
    for d in (1, 2):
        if pe.ndim > d and pe.shape[d] == n:
            return d
    return None


def text_mean(parts: dict) -> torch.Tensor:
    """The frozen text: the branch mean, or, when the branches' texts differ in length (Redux image tokens on the
    positive prompt only), the positive branch's own text (the branch evaluated after the gate)."""
    if len({tuple(t.shape) for t, _ in parts.values()}) > 1 and "cond" in parts:
        t, n = parts["cond"]
        return t / n if n != 1 else t.clone()
    return branch_mean(parts)


class TGateJoint(TGate):
    """T-GATE with a frozen text stream (same key, config and stats as T-GATE)."""

    def __init__(self, config: TGateConfig, info: ModelInfo, node_id: Optional[str] = None):
        super().__init__(config, info, [], node_id)
        self.blocks = []
        self.dm = None

    def install(self, model) -> None:
        super().install(model)                 # run wrappers, CALC_COND_BATCH (CFG drop), APPLY_MODEL (decisions)
        self.dm = model.model.diffusion_model
        self.blocks = [b for b in block_sites(model, self.info) if b.replace_key is not None]
        if self.config.off:
            return
        for site in self.blocks:
            add_block_replace(model, site, lambda args, extra, s=site: self._block(s, args, extra))
        tag_blocks(model, self.info)             # the role of each kernel call: only the joint attention is swapped
        add_attention_override(model, self._override)

    # -- the call's decision ---------------------------------------------------------------------------
    def _apply_model(self, executor, x, t, *args, **kwargs):
        run = self.run
        if run is not None and run.eval is not None:
            args, kwargs, _ = with_layout(self.info, self.dm, x, args, kwargs)
        return super()._apply_model(executor, x, t, *args, **kwargs)

    def adjust_call(self, run: TGateRun, ctx: Call, to: dict, kwargs: dict) -> Call:
        layout = layout_of(to)
        ok = (layout is not None and layout.txt > 0 and layout.txt_first and kwargs.get("attention_mask") is None
              and self.blocks)
        attn2 = ctx.attn2
        if attn2 != COMPUTE and not ok:
            attn2 = COMPUTE
            run.stats.attn2_calls_computed_shape_mismatch += 1
        elif attn2 == REUSE and not all(run.attn2.has(self._key(b, "k")) and run.attn2.has(self._key(b, "v"))
                                        for b in self.blocks):
            attn2 = COMPUTE
            run.stats.attn2_calls_computed_no_cache += 1
        run.tokens = layout
        return Call(attn2, ctx.attn1, ctx.roles, ctx.layout, ctx.round_id)

    @staticmethod
    def _key(site, part: str) -> tuple:
        return (site.kind, site.index, part)

    # -- the block replace: mark the call, strip the text stream after the gate -------------------------
    def _block(self, site, args: dict, extra: dict):
        """Marks the block's joint attention (and, after the gate, runs it with a one-token stand-in for the text
        stream).  The block's text stream is handed on unchanged, so the sequence layout between blocks is the
        model's own whatever other nodes do around this block (image tokens may be fewer: AT-EDM)."""
        run = self.run
        ctx = run.call if run is not None else None
        layout = run.tokens if run is not None else None
        if ctx is None or ctx.attn2 == COMPUTE or layout is None:
            if run is not None:
                run.stats.attn2_calls_computed += 1
            return extra["original_block"](args)
        single = site.kind == "single"
        n_img = args["img"].shape[1] - (layout.txt if single else 0)
        if ctx.attn2 == CACHE:
            run.stats.attn2_calls_computed += 1
            return extra["original_block"](tagged_args(args, site, **{MARK: (CACHE, layout.txt + n_img)}))
        new = dict(args)
        if single:
            full = args["img"]
            new["img"] = torch.cat((full[:, :1], full[:, layout.txt:]), dim=1)
        else:
            txt_in = args["txt"]
            new["txt"] = txt_in[:, :1].clone()
        pe = args.get("pe")
        if torch.is_tensor(pe):
            d = pe_token_dim(pe, layout.txt + n_img)
            if d is not None:
                keep = torch.cat((torch.zeros(1, dtype=torch.long), torch.arange(layout.txt, layout.txt + n_img)))
                new["pe"] = pe.index_select(d, keep.to(pe.device))
        run.stats.attn2_calls_skipped += 1
        out = dict(extra["original_block"](tagged_args(new, site, **{MARK: (REUSE, 1 + n_img)})))
        if single:
            out["img"] = torch.cat((args["img"][:, :layout.txt], out["img"][:, 1:]), dim=1)
        else:
            out["txt"] = txt_in
        return out

    # -- the attention override: capture / swap the text keys and values --------------------------------
    def _override(self, call_next, func, *args, **kwargs):
        run = self.run
        ctx = run.call if run is not None else None
        if ctx is None or ctx.attn2 == COMPUTE:
            return call_next(func, *args, **kwargs)
        call = parse_attention(args, kwargs)
        to = call.transformer_options if call is not None else {}
        mark, site, layout = to.get(MARK), block_of(to), run.tokens
        if mark is None or site is None or layout is None or role_of(call) != "joint":
            return call_next(func, *args, **kwargs)       # e.g. SD3.5's image-only second attention
        if not call.n_q == call.n_k == mark[1]:
            run.stats.attn2_capture_skipped_layout += 1   # someone changed the sequence (K/V downsampled before us)
            return call_next(func, *args, **kwargs)
        d, txt = call.tdim, layout.txt
        if mark[0] == CACHE:
            if call.k.shape[0] != ctx.layout.size:
                run.stats.attn2_capture_skipped_layout += 1
                return call_next(func, *args, **kwargs)
            for part, t in (("k", call.k), ("v", call.v)):
                chunks = [(role, t.narrow(d, 0, txt)[c.rows]) for c, role in zip(ctx.layout.chunks(), ctx.roles)
                          if role is not None]
                run.attn2.add(self._key(site, part), ctx.round_id, chunks)
            return call_next(func, *args, **kwargs)
        per = ctx.layout.per
        kv = []
        for part, t in (("k", call.k), ("v", call.v)):
            cached = run.attn2.mean(self._key(site, part), t.device, reduce=text_mean)
            if cached is None or cached.shape[0] != per:
                raise RuntimeError(f"FreeSpeed T-GATE: no text {part} cached for {site.path}")
            cached = cached.to(t.dtype).repeat(t.shape[0] // per, *([1] * (cached.ndim - 1)))
            kv.append(torch.cat((cached, t.narrow(d, 1, call.n_k - 1)), dim=d))
        args, kwargs = call.rebuilt(k=kv[0], v=kv[1])
        return call_next(func, *args, **kwargs)

    def finish_stats(self, run: TGateRun) -> None:
        super().finish_stats(run)
        s = run.stats
        s.mode = "text stream"
        s.text_tokens_frozen = run.tokens.txt if run.tokens is not None else 0
        if not s.uncond_evaluations and not s.uncond_evaluations_skipped and s.steps_after_gate:
            logger.warning("FreeSpeed T-GATE: this run had no CFG (cfg 1, e.g. guidance-distilled Flux-dev): after the "
                           "gate only the frozen text stream saves work (the text tokens' share of each block)")


__all__ = ["TGateJoint", "pe_token_dim", "MARK"]
