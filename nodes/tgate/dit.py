"""T-GATE on joint-attention DiTs (Flux/Chroma, SD3, Qwen-Image; issue 15): there is no cross-attention to
cache, the text tokens take part in every block's joint attention.  The analogue of T-GATE's frozen
cross-attention is a frozen *text stream*: at the cache step every block's text keys/values (what the image
queries attend to) are kept per conditioning: the positive branch's, since after the gate only the positive
branch runs (and the negative's too where it keeps running: keep_cfg, EasyCache).  Each prompt keeps its own
text, of its own length, whether ComfyUI batched cond and uncond or not.  After the gate each block runs its
image stream with a one-token stand-in for the text stream, and the attention override puts the cached text
keys/values back in front of the image keys/values.  The text tokens' projections, MLPs and query rows are
skipped; CFG is dropped after the gate exactly as on UNets (``nodes/tgate/``'s CALC_COND_BATCH).

Hooks: a chained ``dit`` block replace per block (marks the call and strips the text stream) and the chained
attention override (captures / swaps the text keys/values).  All-or-nothing per model call: a call where any
block has no cache for one of its prompts (or that carries an attention mask) computes in full, counted, with
one warning per run; nothing raises mid-sampling.  Notes: docs/tgate.md.
"""
from __future__ import annotations

from typing import Optional

import torch

from ...core.gating import CACHE, COMPUTE, REUSE, branch_mean
from ..dit import block_of, layout_of, parse_attention, role_of, tag_blocks, tagged_args, with_layout
from ..hooks import logger
from ..sites import ModelInfo, add_attention_override, add_block_replace, block_sites
from .config import COND, UNCOND, Call, TGateConfig, TGateRun
from .unet import TGate


MARK = "freespeed.tgate"


def pe_token_dim(pe: torch.Tensor, n: int) -> Optional[int]:
    """The token dimension of a rotary table (Flux ``[B, 1, L, ...]``: 2; Qwen-Image ``[B, L, 1, ...]``: 1)."""
    for d in (1, 2):
        if pe.ndim > d and pe.shape[d] == n:
            return d
    return None


class TGateJoint(TGate):
    """T-GATE with a frozen text stream (same key, config and stats as T-GATE)."""

    def __init__(self, config: TGateConfig, info: ModelInfo, node_id: Optional[str] = None):
        super().__init__(config, info, [], node_id)
        self.blocks = []
        self.dm = None
        self.mark = f"{MARK}.{id(self)}"             # this installation's mark (T-GATE applied twice: two marks)

    def install(self, model) -> None:
        super().install(model)                 # run wrappers, CALC_COND_BATCH (CFG drop), APPLY_MODEL (decisions)
        self.dm = model.model.diffusion_model
        self.blocks = [b for b in block_sites(model, self.info) if b.replace_key is not None]
        if self.gate >= 1.0:
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
        elif attn2 == REUSE and not all(self._has_text(run, role, c.uuid, layout.txt)
                                        for c, role in zip(ctx.layout.chunks(), ctx.roles)):
            attn2 = COMPUTE
            run.stats.attn2_calls_computed_no_cache += 1
            self._warn_once(run, "a call after the gate has no text stream cached at the gate for one of its prompts "
                                 "(a prompt that starts after the gate, an extra pass such as SAG/PAG): computed in "
                                 "full")
        run.tokens = layout
        return Call(attn2, ctx.attn1, ctx.roles, ctx.layout, ctx.round_id)

    @staticmethod
    def _key(site, part: str, role=None, uuid=None) -> tuple:
        return (site.kind, site.index, part, role, uuid)

    def _has_text(self, run: TGateRun, role, uuid, txt: int) -> bool:
        """Whether every block holds the frozen text stream of this conditioning (its own length)."""
        return (role is not None and run.texts.get((role, uuid)) == txt
                and all(run.attn2.has(self._key(b, p, role, uuid)) for b in self.blocks for p in ("k", "v")))

    def _captures(self, run: TGateRun, role) -> bool:
        """Which branches' text streams are frozen: the positive one (after the gate only it runs), and the
        negative one too where the negative branch keeps being evaluated (keep_cfg, EasyCache)."""
        return role == COND or (role == UNCOND and (self.config.keep_cfg or bool(run.keep_uncond)))

    @staticmethod
    def _warn_once(run: TGateRun, what: str) -> None:
        if not run.warned:
            run.warned = True
            logger.warning("FreeSpeed T-GATE: %s (counted in the stats; no more warnings this run)", what)

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
        if any(str(k).startswith(MARK) for k in (args.get("transformer_options") or {})):
            run.stats.attn2_calls_computed += 1       # T-GATE applied twice: the later one handles this block
            self._warn_once(run, "T-GATE is applied twice to this model: the later node does the work, this one "
                                 "passes its blocks through")
            return extra["original_block"](args)
        single = site.kind == "single"
        n_img = args["img"].shape[1] - (layout.txt if single else 0)
        if ctx.attn2 == CACHE:
            run.stats.attn2_calls_computed += 1
            return extra["original_block"](tagged_args(args, site, **{self.mark: (CACHE, layout.txt + n_img)}))
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
        cached = self._cached_text(run, site, ctx, args["img"].device)
        if cached is None:                       # a cache entry lost since the call's decision: this block in full
            run.stats.attn2_calls_computed_no_cache += 1
            self._warn_once(run, f"no text stream cached for {site.path}: the block is computed in full")
            return extra["original_block"](args)
        run.stats.attn2_calls_skipped += 1
        out = dict(extra["original_block"](tagged_args(new, site, **{self.mark: (REUSE, 1 + n_img, cached)})))
        if single:
            out["img"] = torch.cat((args["img"][:, :layout.txt], out["img"][:, 1:]), dim=1)
        else:
            out["txt"] = txt_in
        return out

    def _cached_text(self, run: TGateRun, site, ctx: Call, device) -> Optional[tuple]:
        """(text keys, text values) of this block for every chunk of the call, each chunk its own conditioning's,
        batched like the call; None when any is missing."""
        out = []
        for part in ("k", "v"):
            chunks = []
            for c, role in zip(ctx.layout.chunks(), ctx.roles):
                t = run.attn2.mean(self._key(site, part, role, c.uuid), device, reduce=branch_mean)
                if t is None or t.shape[0] != ctx.layout.per:
                    return None
                chunks.append(t)
            out.append(torch.cat(chunks) if len(chunks) > 1 else chunks[0])
        return out[0], out[1]

    # -- the attention override: capture / swap the text keys and values --------------------------------
    def _override(self, call_next, func, *args, **kwargs):
        run = self.run
        ctx = run.call if run is not None else None
        if ctx is None or ctx.attn2 == COMPUTE:
            return call_next(func, *args, **kwargs)
        call = parse_attention(args, kwargs)
        to = call.transformer_options if call is not None else {}
        mark, site, layout = to.get(self.mark), block_of(to), run.tokens
        if mark is None or site is None or layout is None or role_of(call) != "joint":
            return call_next(func, *args, **kwargs)       # e.g. SD3.5's image-only second attention
        if not call.n_q == call.n_k == mark[1]:
            run.stats.attn2_calls_computed_shape_mismatch += 1   # someone changed the sequence before us
            return call_next(func, *args, **kwargs)
        d, txt = call.tdim, layout.txt
        if mark[0] == CACHE:
            if call.k.shape[0] != ctx.layout.size:
                run.stats.attn2_capture_skipped_layout += 1
                return call_next(func, *args, **kwargs)
            for c, role in zip(ctx.layout.chunks(), ctx.roles):
                if not self._captures(run, role):
                    continue
                for part, t in (("k", call.k), ("v", call.v)):
                    run.attn2.add(self._key(site, part, role, c.uuid), ctx.round_id, [(role, t.narrow(d, 0, txt)[c.rows])])
                run.texts[(role, c.uuid)] = txt
            return call_next(func, *args, **kwargs)
        kv = [torch.cat((cached.to(t.dtype), t.narrow(d, 1, call.n_k - 1)), dim=d)
              for cached, t in zip(mark[2], (call.k, call.v))]
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
