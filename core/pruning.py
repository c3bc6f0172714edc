"""AT-EDM token pruning maths (Wang et al., CVPR 2024, arXiv 2405.05252).  Pure torch.

* :func:`gwpr_scores` -- G-WPR (Sec. 3.1): ``s <- Aᵀ s`` power iterations over the heads-averaged,
  row-stochastic self-attention map (a token matters when important tokens attend to it);
* :func:`select_kept`, :func:`recovery_source` / :func:`recover_tokens` -- the kept set per sample and
  the similarity-based recovery (Sec. 3.2: a pruned token copies the kept token it attends to most);
* :class:`DSAP` -- prune less early and spare stage-edge blocks (Sec. 3.3), in percent of denoising;
* FLOPs (:func:`layer_flops`, :func:`stack_flops`, :func:`other_flops` over a :class:`UNetInventory`,
  :class:`FlopsTally`) -- a multiply-add counts 2.  Notes: docs/atedm.md.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Optional

import torch

from .tokens import level_grids


# ------------------------------------------------------------------------------------------------
# G-WPR ranking and the kept set
# ------------------------------------------------------------------------------------------------
def gwpr_scores(attn: torch.Tensor, iterations: int = 5) -> torch.Tensor:
    """G-WPR token scores ``[B, N]`` of a self-attention map ``[B, N, N]`` or ``[B, H, N, N]``.

    Heads are averaged first; then ``iterations`` power iterations ``s <- Aᵀ s`` from ``s = 1/N``.
    """
    if attn.ndim == 4:
        attn = attn.float().mean(dim=1)
    a = attn.float()
    if a.ndim != 3 or a.shape[-1] != a.shape[-2]:
        raise ValueError(f"G-WPR needs square self-attention maps [B, N, N], got {tuple(attn.shape)}")
    b, n, _ = a.shape
    s = torch.full((b, 1, n), 1.0 / n, dtype=a.dtype, device=a.device)
    for _ in range(max(1, int(iterations))):
        s = torch.bmm(s, a)                     # s_j <- sum_i s_i A[i, j]
    return s.squeeze(1)


def kept_count(n: int, ratio: float) -> int:
    """Tokens kept out of ``n`` at pruning ``ratio`` (rounded, at least 1; ratio <= 0 keeps all)."""
    if ratio <= 0.0:
        return n
    return max(1, min(n, int(round(n * (1.0 - float(ratio))))))


def select_kept(scores: torch.Tensor, keep: int) -> torch.Tensor:
    """Indices ``[B, keep]`` (ascending) of the ``keep`` highest scores per sample."""
    idx = torch.topk(scores, keep, dim=-1, largest=True, sorted=False).indices
    return idx.sort(dim=-1).values


def recovery_source(attn: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
    """For every token, the position in the kept list it takes its value from -> ``[B, N]`` long.

    A kept token maps to itself; a pruned token ``i`` to the kept token ``j`` with the largest
    ``attn[i, j]`` (heads-averaged map ``[B, N, N]``).
    """
    b, n, _ = attn.shape
    k = kept.shape[1]
    cols = attn.gather(2, kept.unsqueeze(1).expand(b, n, k))      # [B, N, k]: A[i, kept_j]
    src = cols.argmax(dim=-1)
    src.scatter_(1, kept, torch.arange(k, device=kept.device).unsqueeze(0).expand(b, k))
    return src


def gather_tokens(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Rows ``idx`` ``[B, M]`` of ``x`` ``[B, N, C]`` -> ``[B, M, C]``."""
    return x.gather(1, idx.unsqueeze(-1).expand(idx.shape[0], idx.shape[1], x.shape[-1]))


def recover_tokens(x_kept: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
    """Full grid ``[B, N, C]`` from the kept tokens ``[B, k, C]`` and :func:`recovery_source`."""
    return gather_tokens(x_kept, source)


# ------------------------------------------------------------------------------------------------
# DSAP: the pruning ratio over denoising
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class DSAP:
    """Pruning ratio of a transformer stack at a point of denoising.

    * before ``early_end`` (percent of denoising, 0..1): stage-edge stacks (the first attention
      block of each down stage, the last of each up stage) get 0, the others
      ``ratio * early_scale``;
    * from ``early_end`` on: ``ratio`` for every pruned stack.

    ``early_end = 0`` disables DSAP (the target ratio from the first step).
    """
    ratio: float = 0.7
    early_end: float = 0.3
    early_scale: float = 1.0

    def __post_init__(self):
        if not 0.0 <= self.ratio < 1.0:
            raise ValueError("AT-EDM: pruning ratio must be in [0, 1)")
        if not 0.0 <= self.early_end <= 1.0:
            raise ValueError("AT-EDM: DSAP end must be in 0..1 (percent of denoising)")
        if not 0.0 <= self.early_scale <= 1.0:
            raise ValueError("AT-EDM: DSAP early scale must be in 0..1")

    def ratio_at(self, percent: float, edge: bool) -> float:
        if self.ratio <= 0.0:
            return 0.0
        if percent < self.early_end:
            return 0.0 if edge else self.ratio * self.early_scale
        return self.ratio

def stage_edges(stacks: dict) -> set:
    """Edge stacks of a UNet: the first stack of each input level, the last of each output level.

    ``stacks`` maps ``("input"|"middle"|"output", i)`` to its resolution level.
    """
    edges = set()
    for part, pick in (("input", min), ("output", max)):
        by_level: dict = {}
        for key, lvl in stacks.items():
            if key[0] == part:
                by_level.setdefault(lvl, []).append(key)
        for keys in by_level.values():
            edges.add(pick(keys, key=lambda kk: kk[1]))
    return edges


# ------------------------------------------------------------------------------------------------
# FLOPs
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class LayerShape:
    """What the FLOPs of one transformer layer depend on (read from the module)."""
    dim: int             # inner dim, heads * dim_head
    ctx_dim: int         # cross-attention context dim (0 = no cross-attention)
    ff_params: int       # weights of the feed-forward linears
    heads: int = 1


def layer_flops(shape: LayerShape, n: int, n_kv: Optional[int] = None, n_ctx: int = 77) -> dict:
    """FLOPs of one transformer layer for one sample: ``{"attn1", "attn2", "ff"}``.

    ``n`` query tokens, ``n_kv`` self-attention key/value tokens (default ``n``; ToDo lowers it),
    ``n_ctx`` text tokens.  Projections 2·tokens·in·out, scores and map·V 2·n·n_kv·dim each.
    """
    c = shape.dim
    m = n if n_kv is None else n_kv
    attn1 = 2 * n * c * c + 2 * 2 * m * c * c + 2 * 2 * n * m * c + 2 * n * c * c
    attn2 = 0
    if shape.ctx_dim:
        attn2 = 2 * n * c * c + 2 * 2 * n_ctx * shape.ctx_dim * c + 2 * 2 * n * n_ctx * c + 2 * n * c * c
    return {"attn1": attn1, "attn2": attn2, "ff": 2 * n * shape.ff_params}


def ranking_flops(n: int, heads: int, iterations: int, keep: int) -> int:
    """Extra FLOPs of AT-EDM at a pruning layer, per sample: head average, G-WPR, recovery argmax."""
    return heads * n * n + iterations * 2 * n * n + n * keep


def conv_flops(weight_numel: int, out_h: int, out_w: int) -> int:
    return 2 * weight_numel * out_h * out_w


def conv_out(size: int, stride: int) -> int:
    return size if stride == 1 else math.ceil(size / stride)


@functools.lru_cache(maxsize=4096)
def stack_flops(shapes: tuple, n: int, n_ctx: int, keep: Optional[int], full_attn2: tuple,
                iterations: int) -> tuple[int, int, int]:
    """(full, actual, overhead) FLOPs of one transformer stack call for one sample.

    ``keep`` None: the call ran unpruned.  Otherwise the first layer is the pruning layer: in a
    stack of depth >= 2 it runs in full and the following layers on ``keep`` tokens; in a depth-1
    stack its cross-attention and FF run on the kept tokens.  ``full_attn2`` lists the layers whose
    cross-attention ran on the recovered full grid (another node patched it).  The overhead is the
    ranking (:func:`ranking_flops`).
    """
    full = actual = 0
    depth = len(shapes)
    for i, shape in enumerate(shapes):
        f = layer_flops(shape, n, n_ctx=n_ctx)
        full += sum(f.values())
        if keep is None:
            actual += sum(f.values())
            continue
        p = layer_flops(shape, keep, n_ctx=n_ctx)
        if i == 0 and depth > 1:
            actual += sum(f.values())
        elif i == 0:
            actual += f["attn1"] + p["ff"] + (f["attn2"] if 0 in full_attn2 else p["attn2"])
        else:
            actual += p["attn1"] + p["ff"] + (f["attn2"] if i in full_attn2 else p["attn2"])
    overhead = ranking_flops(n, shapes[0].heads, iterations, keep) if keep is not None else 0
    return full, actual, overhead


@dataclass(frozen=True)
class UNetInventory:
    """What the FLOPs of a UNet evaluation outside the pruned stacks depend on, read off the model.

    ``convs``: (weight elements, grid index, stride h, stride w) per convolution, where grid index i
    is the latent halved i times (an upsampling conv runs on the finer grid).  ``projections``:
    (weight elements, grid index) per linear stack projection.  ``stacks``: (grid index, layer
    shapes) per transformer stack that is not pruned (it runs in full every call).
    """
    convs: tuple = ()
    projections: tuple = ()
    stacks: tuple = ()


@functools.lru_cache(maxsize=1024)
def other_flops(inv: UNetInventory, h: int, w: int, n_ctx: int) -> int:
    """Per-sample FLOPs of everything in ``inv`` for an ``h`` x ``w`` latent and ``n_ctx`` text tokens."""
    grids = level_grids(h, w, 8)
    total = 0
    for level, shapes in inv.stacks:
        gh, gw = grids[level]
        total += sum(sum(layer_flops(s, gh * gw, n_ctx=n_ctx).values()) for s in shapes)
    for numel, level, sh, sw in inv.convs:
        gh, gw = grids[level]
        total += conv_flops(numel, conv_out(gh, sh), conv_out(gw, sw))
    for numel, level in inv.projections:
        gh, gw = grids[level]
        total += 2 * numel * gh * gw
    return total


@dataclass
class FlopsTally:
    """A run's FLOPs: everything outside the pruned stacks (``other``), the pruned stacks as they would
    have run in full (``full``) and as they ran (``run``), and the ranking overhead."""
    other: int = 0
    full: int = 0
    run: int = 0
    overhead: int = 0

    def add_stack(self, batch: int, flops: tuple[int, int, int]) -> None:
        self.full += batch * flops[0]
        self.run += batch * flops[1]
        self.overhead += batch * flops[2]

    def summary(self, evaluations: int) -> dict:
        full = self.other + self.full
        actual = self.other + self.run + self.overhead
        evals = max(evaluations, 1)
        return {"gflops_per_eval_full": round(full / evals / 1e9, 3),
                "gflops_per_eval_run": round(actual / evals / 1e9, 3),
                "flops_saved_pct": round(100.0 * (1 - actual / full), 1) if full else 0.0,
                "attn_ff_saved_pct": round(100.0 * (1 - (self.run + self.overhead) / self.full), 1) if self.full else 0.0}


# ------------------------------------------------------------------------------------------------
# DiTs (issue 16): ranking without the full map, recovery by residual, FLOPs of DiT blocks
# ------------------------------------------------------------------------------------------------
def strided_rows(frames: int, h: int, w: int, stride: int, max_rows: int = 1024) -> torch.Tensor:
    """Indices (row-major over ``frames`` x ``h`` x ``w``) of a strided subset of a token grid: every
    ``stride``-th row and column of every frame, the stride raised until at most ``max_rows`` remain."""
    stride = max(1, int(stride))
    while True:
        rows = torch.arange(0, h, stride)
        cols = torch.arange(0, w, stride)
        per = (rows.unsqueeze(1) * w + cols.unsqueeze(0)).flatten()
        idx = (torch.arange(frames).unsqueeze(1) * (h * w) + per.unsqueeze(0)).flatten()
        if idx.numel() <= max_rows or (stride >= h and stride >= w):
            return idx
        stride += 1


def sampled_gwpr_scores(q_rows: torch.Tensor, k: torch.Tensor, rows: torch.Tensor, iterations: int = 5,
                        scale: Optional[float] = None, chunk_bytes: int = 256 * 2 ** 20) -> torch.Tensor:
    """G-WPR scores ``[B, N]`` of N tokens from a *sampled set of query rows* of their attention map.

    ``q_rows`` ``[B, H, m, D]``: the queries of the ``m`` sampled tokens (positions ``rows`` among the N);
    ``k`` ``[B, H, N, D]``: every token's key.  The sampled rows ``A_S = softmax(q_S kᵀ · scale)`` (over the N
    keys, heads averaged) stand in for the full map in G-WPR's power iteration ``s <- Aᵀ s``:
    ``s'_j = Σ_{i∈S} s_i A[i, j] / Σ_{i∈S} s_i`` (an importance-sampled estimate of the same iteration, the
    sampled rows weighted by their own current score).  Cost ``m·N`` per head instead of ``N²``; the
    ``N x N`` map never exists.  ``iterations = 1`` is the column mean of the sampled rows.
    """
    b, h, m, d = q_rows.shape
    n = k.shape[2]
    scale = d ** -0.5 if scale is None else scale
    a = torch.zeros(b, m, n, dtype=torch.float32, device=k.device)
    per_head = max(1, b * m * n * 4)
    step = max(1, min(h, chunk_bytes // per_head))
    for h0 in range(0, h, step):
        logits = torch.matmul(q_rows[:, h0:h0 + step].float(), k[:, h0:h0 + step].float().transpose(-1, -2)) * scale
        a += logits.softmax(dim=-1).sum(dim=1)
        del logits
    a /= h
    s = torch.full((b, n), 1.0 / n, dtype=torch.float32, device=k.device)
    for _ in range(max(1, int(iterations))):
        w = s.gather(1, rows.to(k.device).unsqueeze(0).expand(b, m))
        w = w / w.sum(dim=1, keepdim=True).clamp_min(1e-30)
        s = torch.bmm(w.unsqueeze(1), a).squeeze(1)
    return s


def similar_source(q: torch.Tensor, k: torch.Tensor, kept: torch.Tensor, chunk_rows: int = 1024) -> torch.Tensor:
    """For every token, the position in the kept list of the kept token it attends to most -> ``[B, N]``.

    ``q``/``k`` ``[B, H, N, D]``; "attends to most" = the largest ``q_i · k_j`` summed over heads (the logit
    of the heads-concatenated dot product); a kept token maps to itself (AT-EDM's similarity recovery,
    Sec. 3.2, without the full map: ``N x keep`` logits in row chunks)."""
    b, h, n, d = q.shape
    kk = kept.shape[1]
    kf = k.permute(0, 2, 1, 3).reshape(b, n, h * d)
    kk_t = kf.gather(1, kept.unsqueeze(-1).expand(b, kk, h * d)).float()          # [B, keep, C]
    qf = q.permute(0, 2, 1, 3).reshape(b, n, h * d)
    src = torch.empty(b, n, dtype=torch.long, device=q.device)
    for r0 in range(0, n, chunk_rows):
        logits = torch.bmm(qf[:, r0:r0 + chunk_rows].float(), kk_t.transpose(1, 2))
        src[:, r0:r0 + chunk_rows] = logits.argmax(dim=-1)
    src.scatter_(1, kept, torch.arange(kk, device=q.device).unsqueeze(0).expand(b, kk))
    return src


def scatter_back(x_full: torch.Tensor, y_kept: torch.Tensor, kept: torch.Tensor, source: torch.Tensor,
                 previous: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The full-length output of a pruned range of residual blocks.

    ``x_full`` ``[B, N, C]``: every token at the range's input; ``y_kept`` ``[B, keep, C]``: the kept tokens at
    its output.  A kept token gets its output; a pruned token ``i`` gets its own input plus the residual the
    range added to its source token (``x_i + y_src - x_src``, ``source`` from :func:`similar_source`), or,
    with ``previous`` ``[B, N, C]``, the residual the range added to token ``i`` itself at an earlier step.
    """
    index = kept.unsqueeze(-1).expand(kept.shape[0], kept.shape[1], x_full.shape[-1])
    if previous is None:
        out = x_full + gather_tokens(y_kept - gather_tokens(x_full, kept), source)
    else:
        out = x_full + previous.to(x_full.dtype)
    return out.scatter_(1, index, y_kept)


def gather_rows(t: torch.Tensor, dim: int, idx: torch.Tensor) -> torch.Tensor:
    """Rows ``idx`` ``[B, M]`` of ``t`` along ``dim`` per sample (``t``'s batch may be 1: broadcast)."""
    b = idx.shape[0]
    if t.shape[0] != b:
        t = t.expand(b, *t.shape[1:])
    shape = [b] + [1] * (t.ndim - 1)
    shape[dim] = idx.shape[1]
    index = idx.view(shape).expand(*[t.shape[i] if i != dim else idx.shape[1] for i in range(t.ndim)])
    return t.gather(dim, index.to(t.device))


@dataclass(frozen=True)
class DiTBlockShape:
    """What one DiT block's FLOPs depend on: linear weights applied per image / text token (``img``, ``txt``),
    per context token of a separate cross-attention (``ctx``), the hidden size and its attentions (``joint``:
    text + image in one sequence; ``image_self``: image-only self-attentions; ``cross``: image -> context)."""
    img: int
    txt: int = 0
    ctx: int = 0
    dim: int = 0
    joint: bool = True
    image_self: int = 0
    cross: bool = False


def dit_block_flops(shape: DiTBlockShape, n_img: int, n_txt: int, n_ctx: int = 0) -> int:
    """FLOPs of one DiT block call for one sample: linears 2·tokens·weights, attention 4·Lq·Lk·dim."""
    f = 2 * (shape.img * n_img + shape.txt * n_txt + shape.ctx * n_ctx)
    if shape.joint:
        f += 4 * (n_img + n_txt) ** 2 * shape.dim
    f += shape.image_self * 4 * n_img * n_img * shape.dim
    if shape.cross:
        f += 4 * n_img * n_ctx * shape.dim
    return f


def dit_ranking_flops(m: int, n: int, heads_dim: int, iterations: int, n_pruned: int, keep: int) -> int:
    """Extra FLOPs of the DiT ranking: sampled logits (m x n x C, twice for softmax·sum), the power
    iterations and the similarity argmax (n_pruned x keep x C)."""
    return 2 * m * n * heads_dim + iterations * 2 * m * n + 2 * n_pruned * keep * heads_dim


__all__ = ["FlopsTally", "gwpr_scores", "kept_count", "select_kept", "recovery_source", "gather_tokens", "recover_tokens", "DSAP",
           "stage_edges", "LayerShape", "layer_flops", "ranking_flops", "conv_flops", "conv_out", "stack_flops",
           "UNetInventory", "other_flops", "strided_rows", "sampled_gwpr_scores", "similar_source", "scatter_back", "gather_rows",
           "DiTBlockShape", "dit_block_flops", "dit_ranking_flops"]
