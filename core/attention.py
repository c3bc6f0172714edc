"""Explicit attention: the softmax map that no fused kernel returns.

No fused kernel (SDPA, xformers, flash, sage, ComfyUI's sub-quadratic CPU path) returns
softmax(Q Kᵀ / sqrt(d)), yet attention-map reuse (arXiv 2401.01008) keeps it and AT-EDM (arXiv
2405.05252 Sec. 3.1) ranks tokens with it.  Layout is ComfyUI's: q/k/v ``[B, N, heads * dim_head]``
(projected, not yet split into heads), maps ``[B, heads, Nq, Nk]``.  Scores and softmax are float32
(as ComfyUI's ``attention_basic`` for fp16 inputs, which otherwise overflow in Q Kᵀ); the float32
temporaries are bounded by processing queries (or heads) in chunks.
"""
from __future__ import annotations

from typing import Optional

import torch

# at most this many float32 elements of a map at once (256 MB)
TEMP_ELEMENTS = 2 ** 26


def split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """[B, N, H*D] -> [B, H, N, D]."""
    b, n, hd = x.shape
    return x.view(b, n, heads, hd // heads).transpose(1, 2)


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    """[B, H, N, D] -> [B, N, H*D]."""
    b, h, n, d = x.shape
    return x.transpose(1, 2).reshape(b, n, h * d)


def attention_map(q: torch.Tensor, k: torch.Tensor, heads: int, scale: Optional[float] = None) -> torch.Tensor:
    """softmax(q kᵀ · scale) per head -> [B, heads, Nq, Nk] float32."""
    d = q.shape[-1] // heads
    scale = d ** -0.5 if scale is None else scale
    sim = torch.matmul(split_heads(q, heads).float(), split_heads(k, heads).float().transpose(-1, -2)) * scale
    return sim.softmax(dim=-1)


def attention_from_map(attn: torch.Tensor, v: torch.Tensor, heads: int) -> torch.Tensor:
    """map · V with a map [B, heads, Nq, Nk] and v [B, Nk, heads*D] -> [B, Nq, heads*D] in v's dtype."""
    vh = split_heads(v, heads)
    return merge_heads(torch.matmul(attn.to(vh.dtype), vh))


def query_chunk(batch: int, heads: int, n_query: int, n_key: int) -> int:
    return max(1, min(n_query, TEMP_ELEMENTS // max(1, batch * heads * n_key)))


def explicit_attention(q, k, v, heads: int, map_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(output in v's dtype, map [B, heads, Nq, Nk] in ``map_dtype``); queries in chunks so the float32
    temporary stays bounded (the map itself is written straight into ``map_dtype``)."""
    b, nq, _ = q.shape
    nk = k.shape[1]
    step = query_chunk(b, heads, nq, nk)
    if step >= nq:
        attn = attention_map(q, k, heads)
        return attention_from_map(attn, v.float(), heads).to(v.dtype), attn.to(map_dtype)
    amap = torch.empty((b, heads, nq, nk), dtype=map_dtype, device=q.device)
    outs = []
    vf = v.float()
    for s in range(0, nq, step):
        attn = attention_map(q[:, s:s + step], k, heads)
        outs.append(attention_from_map(attn, vf, heads).to(v.dtype))
        amap[:, :, s:s + step] = attn
        del attn
    return torch.cat(outs, dim=1), amap


def map_times_v(amap: torch.Tensor, v: torch.Tensor, heads: int) -> torch.Tensor:
    """map · V in v's dtype; a map of another dtype is cast in query chunks (bounded temporaries)."""
    b, h, nq, nk = amap.shape
    step = query_chunk(b, h, nq, nk)
    if amap.dtype == v.dtype or step >= nq:
        return attention_from_map(amap, v, heads)
    return torch.cat([attention_from_map(amap[:, :, s:s + step], v, heads) for s in range(0, nq, step)], dim=1)


def attention_with_mean_map(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int,
                            scale: Optional[float] = None, chunk_bytes: int = 512 * 2 ** 20):
    """Explicit attention that also returns the heads-averaged map (AT-EDM's ranking input).

    Returns ``(out [B, Nq, heads*D] in v's dtype, mean_map [B, Nq, Nk] float32)``; heads are
    processed in chunks of at most ``chunk_bytes`` of scores, so ``B x H x N x N`` never exists.
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


__all__ = ["TEMP_ELEMENTS", "split_heads", "merge_heads", "attention_map", "attention_from_map", "explicit_attention",
           "map_times_v", "attention_with_mean_map"]
