"""AT-EDM on DiTs (issue 16; Wang et al., arXiv 2405.05252).  Inside a chosen range of blocks the image tokens
of the sampled latent are ranked at the range's first block, the following blocks run on the kept image tokens
plus every text token (and every reference-latent token) with the matching positional rows (``pe``) gathered,
and the range's last block scatters every pruned token back -- before the final layer and before any
full-length ControlNet addition (the range is cut at the first block that gets one).

Ranking without the full map: G-WPR over a *strided set of query rows* of the first block's attention
(``core.pruning.sampled_gwpr_scores``: m ≈ N/16 rows instead of N, read off the q/k the attention override sees,
after RoPE); recovery: a pruned token gets its own input plus the residual the range added to the kept token it
attends to most (``similar``) or to itself at the previous evaluation (``previous``; ``core.pruning.scatter_back``).
DSAP: the early ratio is lower and the range's first and last blocks are spared early.  Hooks: chained ``dit``
block replaces + the chained attention override; PixArt: object patches of ``blocks.N.forward`` and
``blocks.N.attn.forward`` (ranking from the module's own q/k projection).  Notes: docs/atedm.md.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch

import comfy.patcher_extension as pe

from ...core.batch import BatchLayout
from ...core.pruning import (dit_block_flops, dit_ranking_flops, gather_rows, gather_tokens, kept_count,
    sampled_gwpr_scores, scatter_back, select_kept, similar_source, strided_rows)
from ..dit import apply_args, block_order, parse_attention, sequence_kind, skipped_blocks, tag_blocks, tagged_args, with_layout
from ..hooks import installed, logger
from ..sites import add_attention_override, add_block_replace, block_sites, dit_block_shapes, patch_forward
from .config import ATEDMRun
from .unet import ATEDM


RANK = "freespeed.atedm.rank"
ROW_STRIDE = 4            # sampled query rows: every 4th row and column of the grid (m ≈ N/16, at most 1024)


@dataclass
class PruneCall:
    """One model call: where its range starts (ranking block) and ends (scatter block), what was kept."""
    layout: object
    batch: BatchLayout
    keep: int
    rank: int
    last: int
    kept: Optional[torch.Tensor] = None          # [B, keep + refs]: kept positions in the image sequence (sorted)
    source: Optional[torch.Tensor] = None        # [B, N_img]: position in ``kept`` each token takes its residual from
    x_full: Optional[torch.Tensor] = None        # the image stream after the ranking block (full length)
    delta: Optional[torch.Tensor] = None         # the range's residual per token (``previous`` recovery)
    pruned: bool = False


@dataclass
class ATEDMDiTRun(ATEDMRun):
    call: Optional[PruneCall] = None
    previous: dict = field(default_factory=dict)  # branch uuid -> [N_img, C] residual of the range, last call


class ATEDMDiT(ATEDM):
    """AT-EDM on a DiT (same key, config and stats as AT-EDM)."""

    def __init__(self, config, info, node_id: Optional[str] = None):
        super().__init__(config, info, [], node_id)
        self.sites = []
        self.shapes = {}
        self.start = self.end = 0
        self.dm = None
        self.ranking_probe = None         # optional callable(dict of the call's kept set and scores): tests, debugging

    def install(self, model) -> None:
        self.replace_earlier(model)
        super(ATEDM, self).install(model)                 # run wrappers only
        self.dm = model.model.diffusion_model
        self.sites = block_sites(model, self.info)
        self.shapes = dit_block_shapes(model, self.info)
        n = len(self.sites)
        self.start = min(max(0, int(round(self.config.dit_start * n))), n - 1)
        self.end = min(n, max(self.start + 2, int(round(self.config.dit_end * n))))
        front = max((len(t.front) for t in installed(model) if hasattr(t, "front")), default=0)
        if front > self.start:                 # Encoder Propagation skips those blocks: prune behind them
            logger.warning("FreeSpeed AT-EDM: blocks 0-%d are Encoder Propagation's front; the pruned range starts "
                           "at block %d instead of %d", front - 1, front, self.start)
            self.start = front
            self.end = max(self.end, min(n, self.start + 2))
        model.add_wrapper_with_key(pe.WrappersMP.APPLY_MODEL, self.key, self._apply_model)
        if self.config.off:
            return
        for pos in range(self.start, self.end):
            site = self.sites[pos]
            if site.replace_key is None:           # PixArt
                patch_forward(model, site.path, lambda orig, s=site, p=pos: self._pixart_block(s, p, orig))
                patch_forward(model, f"{site.path}.attn", lambda orig, p=pos: self._pixart_attn(p, orig))
            else:
                add_block_replace(model, site, lambda args, extra, s=site, p=pos: self._block(s, p, args, extra))
        if self.info.family != "pixart":
            tag_blocks(model, self.info)               # the attention roles the ranking reads
            add_attention_override(model, self._override)

    def new_run(self, ctx) -> ATEDMDiTRun:
        return ATEDMDiTRun(ctx, self.stats_type())

    # -- the call's range ------------------------------------------------------------------------------
    def _apply_model(self, executor, x, t, *args, **kwargs):
        run = self.run
        ev = run.eval if run is not None else None
        if ev is None:
            return executor(x, t, *args, **kwargs)
        args, kwargs, layout = with_layout(self.info, self.dm, x, args, kwargs)
        skipped = skipped_blocks(self.dm)
        vals = apply_args(args, kwargs)
        ctx = vals.get("c_crossattn")
        n_ctx = int(ctx.shape[1]) if torch.is_tensor(ctx) and ctx.ndim == 3 else 0
        call = None
        if layout is not None and not self.config.off:
            call = self._plan(run, ev.info.percent, layout, BatchLayout.from_options(vals.get("transformer_options"),
                                                                                       x.shape[0]), kwargs, skipped)
        prev, run.call = run.call, call
        try:
            return executor(x, t, *args, **kwargs)
        finally:
            run.call = prev
            self._finish_call(run, call, layout, int(x.shape[0]), n_ctx)

    def _plan(self, run, percent: float, layout, batch: BatchLayout, kwargs, skipped=frozenset()) -> Optional[PruneCall]:
        cfg, st = self.config, run.stats
        early = percent < cfg.dsap_end
        ratio = 0.0 if percent < cfg.dit_warmup else cfg.dsap.ratio_at(percent, edge=False)   # warm-up: full steps
        rank, last = self.start, self.end - 1
        if early:
            rank, last = rank + 1, last - 1             # DSAP: the range's first and last blocks are spared early
        order = block_order(self.sites)
        gone = {order[c] for c in skipped if c in order}      # Chroma's skip lists: those blocks never run
        while rank in gone:
            rank += 1
        while last in gone:
            last -= 1
        controls = sorted(order[c] for c in layout.control if c in order and order[c] >= rank)
        if controls:
            if controls[0] == rank:
                st.stack_calls_left_control += 1
                return None
            last = min(last, controls[0])
        main = layout.main_grid.n
        keep = kept_count(main, ratio)
        if last <= rank or keep >= main or kwargs.get("attention_mask") is not None:
            st.stack_calls_full += 1
            return PruneCall(layout, batch, main, rank, last) if cfg.recovery == "previous" and last > rank else None
        return PruneCall(layout, batch, keep, rank, last)

    # -- ranking (the attention override at the ranking block) --------------------------------------------
    def _override(self, call_next, func, *args, **kwargs):
        a = parse_attention(args, kwargs)
        pc = a.transformer_options.get(RANK) if a is not None else None
        if pc is None or pc.kept is not None or self.run is None or pc is not self.run.call:
            return call_next(func, *args, **kwargs)
        kind = sequence_kind(a, pc.layout)
        if kind is not None:
            q, k = a.q, a.k
            if not a.skip_reshape:
                b, n, c = q.shape
                q = q.view(b, n, a.heads, c // a.heads).transpose(1, 2)
                k = k.view(b, n, a.heads, c // a.heads).transpose(1, 2)
            self._rank(pc, q, k, pc.layout.image_offset(kind == "joint"))
        return call_next(func, *args, **kwargs)

    def _rank(self, pc: PruneCall, q: torch.Tensor, k: torch.Tensor, img_offset: int) -> None:
        layout, g = pc.layout, pc.layout.main_grid
        off = layout.group_offsets()[layout.main]
        lo = img_offset + off
        qm, km = q[:, :, lo:lo + g.n], k[:, :, lo:lo + g.n]
        rows = strided_rows(g.frames, g.h, g.w, ROW_STRIDE)
        scores = sampled_gwpr_scores(qm[:, :, rows.to(q.device)], km, rows, self.config.iterations)
        kept_main = select_kept(scores, pc.keep)
        b = kept_main.shape[0]
        others = torch.cat([torch.arange(o, o + gr.n) for i, (o, gr) in
                            enumerate(zip(layout.group_offsets(), layout.groups)) if i != layout.main]
                           or [torch.zeros(0, dtype=torch.long)]).to(q.device)
        kept = torch.cat((kept_main + off, others.unsqueeze(0).expand(b, -1)), dim=1).sort(dim=1).values
        src_main = similar_source(qm, km, kept_main)                       # positions in kept_main
        pos_main = torch.searchsorted(kept, kept_main + off)               # kept_main -> position in kept
        source = torch.searchsorted(kept, torch.arange(layout.img, device=q.device).unsqueeze(0).expand(b, -1)
                                    .contiguous()).clamp_(max=kept.shape[1] - 1)
        source[:, off:off + g.n] = pos_main.gather(1, src_main)
        pc.kept, pc.source = kept, source
        if self.ranking_probe is not None:          # nothing is kept on the technique: no tensor outlives a run
            self.ranking_probe({"kept": kept, "kept_main": kept_main, "source": source, "scores": scores})

    # -- the blocks ----------------------------------------------------------------------------------------
    def _step(self, pos: int, img: torch.Tensor, run_block, pc: PruneCall):
        """The image stream a block in the range returns (``run_block(img, pruned)`` runs it)."""
        if pos == pc.rank:
            out = run_block(img, False, True)
            pc.x_full = out
            if pc.keep >= pc.layout.main_grid.n:           # a recording call (``previous``): nothing pruned
                return out
            if pc.kept is None:
                self.run.stats.stack_calls_left_no_map += 1
                pc.rank = pc.last = -1
                return out
            pc.pruned = True
            return gather_tokens(out, pc.kept)
        out = run_block(img, pc.pruned, False)
        if pos != pc.last:
            return out
        if not pc.pruned:
            pc.delta = out - pc.x_full
            return out
        prev = self._previous(pc, out) if self.config.recovery == "previous" else None
        full = scatter_back(pc.x_full, out, pc.kept, pc.source, prev)
        pc.delta = full - pc.x_full
        return full

    def _previous(self, pc: PruneCall, like: torch.Tensor) -> Optional[torch.Tensor]:
        parts = [self.run.previous.get(c.uuid) for c in pc.batch.chunks()]
        if any(p is None or p.shape[0] != pc.batch.per or p.shape[1:] != pc.x_full.shape[1:] for p in parts):
            return None
        return torch.cat(parts, dim=0).to(like.device)

    def _block(self, site, pos: int, args: dict, extra: dict):
        run = self.run
        pc = run.call if run is not None else None
        if pc is None or not pc.rank <= pos <= pc.last:
            return extra["original_block"](args)
        txt = pc.layout.txt if site.kind == "single" else 0
        held = {}

        def run_block(img, pruned, rank):
            a = dict(args, img=torch.cat((args["img"][:, :txt], img), dim=1) if txt else img)
            if pruned:
                a = self._pruned_args(a, pc)
            if rank:
                a = tagged_args(a, site, **{RANK: pc})
            held["out"] = out = extra["original_block"](a)
            return out["img"][:, txt:] if txt else out["img"]

        img = self._step(pos, args["img"][:, txt:] if txt else args["img"], run_block, pc)
        out = dict(held["out"])
        out["img"] = torch.cat((held["out"]["img"][:, :txt], img), dim=1) if txt else img
        return out

    def _pruned_args(self, a: dict, pc: PruneCall) -> dict:
        """Block arguments of a pruned block: the positional rows (``pe``) and per-token modulation gathered."""
        layout, b = pc.layout, pc.kept.shape[0]
        rows = pc.kept + layout.image_offset(True) if layout.txt else pc.kept
        if layout.txt:
            rows = torch.cat((torch.arange(layout.txt, device=rows.device).unsqueeze(0).expand(b, -1), rows), dim=1)
        p = a.get("pe")
        if torch.is_tensor(p):
            d = next((d for d in (1, 2) if p.ndim > d and p.shape[d] == (layout.joint if layout.txt else layout.img)),
                     None)
            if d is not None:
                a["pe"] = gather_rows(p, d, rows)
        v = a.get("vec")
        if torch.is_tensor(v) and v.ndim >= 3 and v.shape[1] == layout.img and layout.img > 1:   # Wan 2.2 per token
            a["vec"] = gather_rows(v, 1, pc.kept)
        return a

    # -- PixArt ----------------------------------------------------------------------------------------------
    def _pixart_attn(self, pos: int, orig):
        tech = self

        def forward(x, *args, **kwargs):
            run = tech.run
            pc = run.call if run is not None else None
            if pc is not None and pos == pc.rank and pc.kept is None and x.shape[1] == pc.layout.img:
                m = tech.dm.get_submodule(f"{tech.sites[pos].path}.attn")
                b, n, c = x.shape
                q, k, _ = m.qkv(x).reshape(b, n, 3, c).unbind(2)
                q, k = m.q_norm(q), m.k_norm(k)
                h = m.num_heads
                tech._rank(pc, q.view(b, n, h, c // h).transpose(1, 2), k.view(b, n, h, c // h).transpose(1, 2), 0)
            return orig(x, *args, **kwargs)
        return forward

    def _pixart_block(self, site, pos: int, orig):
        tech = self

        def forward(x, *args, **kwargs):
            run = tech.run
            pc = run.call if run is not None else None
            if pc is None or not pc.rank <= pos <= pc.last:
                return orig(x, *args, **kwargs)
            return tech._step(pos, x, lambda img, pruned, rank: orig(img, *args, **kwargs), pc)
        return forward

    # -- accounting ----------------------------------------------------------------------------------------------
    def _finish_call(self, run, pc: Optional[PruneCall], layout, batch: int, n_ctx: int) -> None:
        if pc is not None and pc.delta is not None and self.config.recovery == "previous":
            for c in pc.batch.chunks():
                run.previous[c.uuid] = pc.delta[c.rows].detach()
        if layout is None:
            return
        st = run.stats
        n, txt = layout.img, layout.txt
        pruned = pc is not None and pc.pruned
        keep = pc.kept.shape[1] if pruned else n
        full = actual = 0
        for pos, site in enumerate(self.sites):
            shape = self.shapes.get((site.kind, site.index))
            if shape is None:
                continue
            f = dit_block_flops(shape, n, txt, n_ctx)
            full += f
            actual += dit_block_flops(shape, keep, txt, n_ctx) if pruned and pc.rank < pos <= pc.last else f
        over = 0
        if pruned:
            g = layout.main_grid
            m = strided_rows(g.frames, g.h, g.w, ROW_STRIDE).numel()
            dim = self.shapes[(self.sites[pc.rank].kind, self.sites[pc.rank].index)].dim
            over = dit_ranking_flops(m, g.n, dim, self.config.iterations, g.n - pc.keep, pc.keep)
            st.stack_calls_pruned += 1
            st.pruned_calls_per_level["image"] = st.pruned_calls_per_level.get("image", 0) + 1
            run.kept_shapes["image"] = (g.n, pc.keep)
            run.slots[0] += batch * g.n * (pc.last - pc.rank)
            run.slots[1] += batch * pc.keep * (pc.last - pc.rank)
        run.flops.full += batch * full
        run.flops.run += batch * actual
        run.flops.overhead += batch * over

    def finish_stats(self, run) -> None:
        super().finish_stats(run)
        s, n = run.stats, len(self.sites)
        s.levels, s.stacks = [], self.end - self.start
        s.dit_range = f"blocks {self.start}-{self.end - 1} of {n}"
        s.recovery = self.config.recovery
        run.previous.clear()


__all__ = ["ATEDMDiT", "PruneCall", "RANK"]
