"""Explicit attention that can return its softmax map, and attention from a given map.

No fused kernel (SDPA, xformers, flash, sage, ComfyUI's sub-quadratic CPU path) returns
softmax(Q Kᵀ / sqrt(d)), yet attention-map reuse (arXiv 2401.01008) caches it and AT-EDM (arXiv
2405.05252 Sec. 3.1) ranks tokens with it.  These functions compute it explicitly in ComfyUI's
layout: q/k/v are ``[B, N, heads * dim_head]`` (projected, not yet split into heads), maps are
``[B, heads, Nq, Nk]``.

The map is computed in float32 (as ComfyUI's ``attention_basic`` does for fp16 inputs, which
otherwise overflow in Q Kᵀ) and returned in ``map_dtype`` (fp16 halves a map cache).  Queries can
be processed in chunks to bound the N x N temporary when no map is kept.
"""
from __future__ import annotations

from typing import Optional

import torch


def split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """[B, N, H*D] -> [B, H, N, D]."""
    b, n, hd = x.shape
    return x.view(b, n, heads, hd // heads).transpose(1, 2)


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    """[B, H, N, D] -> [B, N, H*D]."""
    b, h, n, d = x.shape
    return x.transpose(1, 2).reshape(b, n, h * d)


def attention_map(q: torch.Tensor, k: torch.Tensor, heads: int, scale: Optional[float] = None,
                  mask: Optional[torch.Tensor] = None, map_dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """softmax(q kᵀ · scale) per head -> [B, heads, Nq, Nk] (float32 math)."""
    d = q.shape[-1] // heads
    scale = d ** -0.5 if scale is None else scale
    qh = split_heads(q, heads).float()
    kh = split_heads(k, heads).float()
    sim = torch.matmul(qh, kh.transpose(-1, -2)) * scale
    if mask is not None:
        if mask.dtype == torch.bool:
            sim = sim.masked_fill(~mask, torch.finfo(sim.dtype).min)
        else:
            sim = sim + mask.float()
    attn = sim.softmax(dim=-1)
    return attn if map_dtype is None else attn.to(map_dtype)


def attention_from_map(attn: torch.Tensor, v: torch.Tensor, heads: int) -> torch.Tensor:
    """map · V with a given map [B, heads, Nq, Nk] and v [B, Nk, heads*D] -> [B, Nq, heads*D]."""
    vh = split_heads(v, heads)
    out = torch.matmul(attn.to(vh.dtype), vh)
    return merge_heads(out)


def attention_with_map(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int,
                       scale: Optional[float] = None, mask: Optional[torch.Tensor] = None,
                       map_dtype: Optional[torch.dtype] = None, return_map: bool = True):
    """Explicit attention.  Returns ``(out, map)`` (``map`` None when ``return_map`` is False).

    ``out`` is in v's dtype and ComfyUI's [B, N, heads*D] layout.
    """
    attn = attention_map(q, k, heads, scale=scale, mask=mask)
    out = attention_from_map(attn, v, heads).to(v.dtype)
    if not return_map:
        return out, None
    return out, attn if map_dtype is None else attn.to(map_dtype)


def attention_chunked(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int,
                      scale: Optional[float] = None, query_chunk: int = 1024) -> torch.Tensor:
    """Explicit attention without a map, queries in chunks (bounded memory reference)."""
    outs = []
    for s in range(0, q.shape[1], query_chunk):
        o, _ = attention_with_map(q[:, s:s + query_chunk], k, v, heads, scale=scale, return_map=False)
        outs.append(o)
    return torch.cat(outs, dim=1)


def map_entropy(attn: torch.Tensor) -> float:
    """Mean row entropy of a map divided by log(Nk): 1.0 = uniform, 0.0 = one-hot."""
    n_k = attn.shape[-1]
    if n_k <= 1:
        return 0.0
    p = attn.float().clamp_min(1e-12)
    ent = -(p * p.log()).sum(-1).mean()
    return float(ent / torch.log(torch.tensor(float(n_k))))


__all__ = ["split_heads", "merge_heads", "attention_map", "attention_from_map", "attention_with_map",
           "attention_chunked", "map_entropy"]
