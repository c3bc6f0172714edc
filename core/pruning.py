"""AT-EDM token pruning maths (Wang et al., "Attention-Driven Training-Free Efficiency Enhancement of
Diffusion Models", CVPR 2024, arXiv 2405.05252).  Pure torch, no ComfyUI import.

* :func:`attention_with_mean_map` -- explicit self-attention that also returns the heads-averaged
  softmax map (no fused kernel returns maps; heads are processed in chunks so the ``B x H x N x N``
  tensor never exists at once).
* :func:`gwpr_scores` -- Generalized Weighted PageRank (Sec. 3.1).  The self-attention map is the
  adjacency matrix of a directed graph whose nodes are tokens: row ``i`` of ``A`` says how query
  token ``i`` distributes its attention over the key tokens.  A token is important when important
  tokens attend to it, so the score vector is propagated as ``s <- Aᵀ s`` from a uniform start
  (the WPR of the same first author's Zero-TPrune, arXiv 2305.17328, generalised to the
  heads-averaged maps of diffusion UNets).  ``A`` is row-stochastic, so ``s`` stays a distribution
  and no renormalisation is needed; a few iterations suffice (the ranking, not the exact
  stationary vector, is what matters).
* :func:`select_kept` -- the kept set: the ``keep`` highest scores per sample (so cond and uncond
  may keep different tokens), returned in ascending token order.
* :func:`recovery_source` / :func:`recover_tokens` -- similarity-based copy (Sec. 3.2): before
  the feature map goes back to convolutions, each pruned token takes the value of its most similar
  kept token.  Similarity is read from the same attention map: pruned token ``i`` copies the kept
  token ``j`` with the largest ``A[i, j]`` (the kept token it attends to most), which costs no
  extra matmul.
* :class:`DSAP` -- Denoising-Steps-Aware Pruning (Sec. 3.3): attention maps vary most in early
  steps, so early steps prune less: the first attention block of each down stage and the last of
  each up stage are not pruned and the others use a reduced ratio; later steps use the target ratio
  everywhere.  Written in percent of denoising.
* FLOPs formulas (:func:`layer_flops`, :func:`ranking_flops`) -- a multiply-add counts 2 FLOPs.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch


# ------------------------------------------------------------------------------------------------
# explicit attention with the heads-averaged map
# ------------------------------------------------------------------------------------------------
def attention_with_mean_map(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int,
                            scale: Optional[float] = None, chunk_bytes: int = 512 * 2 ** 20):
    """Explicit attention in ComfyUI's layout (q/k/v ``[B, N, heads*D]``).

    Returns ``(out [B, Nq, heads*D] in v's dtype, mean_map [B, Nq, Nk] float32)`` where
    ``mean_map`` is softmax(q kᵀ · scale) averaged over heads.  Scores and softmax are float32 (as
    ComfyUI's ``attention_basic`` for fp16 inputs); heads are processed in chunks of at most
    ``chunk_bytes`` of scores.
    """
    b, nq, hd = q.shape
    nk = k.shape[1]
    d = hd // heads
    scale = d ** -0.5 if scale is None else scale
    qh = q.view(b, nq, heads, d).transpose(1, 2)
    kh = k.view(b, nk, heads, d).transpose(1, 2)
    vh = v.view(b, nk, heads, v.shape[-1] // heads).transpose(1, 2)
    per_head = max(1, b * nq * nk * 4)
    hc = max(1, min(heads, chunk_bytes // per_head))
    mean = torch.zeros(b, nq, nk, dtype=torch.float32, device=q.device)
    outs = []
    for s in range(0, heads, hc):
        sim = torch.matmul(qh[:, s:s + hc].float(), kh[:, s:s + hc].float().transpose(-1, -2)) * scale
        attn = sim.softmax(dim=-1)
        del sim
        mean += attn.sum(dim=1)
        outs.append(torch.matmul(attn.to(vh.dtype), vh[:, s:s + hc]))
        del attn
    mean /= heads
    out = torch.cat(outs, dim=1).transpose(1, 2).reshape(b, nq, -1).to(v.dtype)
    return out, mean


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

    def early(self, percent: float) -> bool:
        return percent < self.early_end


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


__all__ = ["attention_with_mean_map", "gwpr_scores", "kept_count", "select_kept", "recovery_source",
           "gather_tokens", "recover_tokens", "DSAP", "stage_edges", "LayerShape", "layer_flops",
           "ranking_flops", "conv_flops", "conv_out"]
