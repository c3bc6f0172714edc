"""Token grids: tokens <-> (h, w) at every UNet level, and 2-D downsampling of token sequences.

A UNet's self-attention at resolution level L sees ``h_L * w_L`` tokens laid out row-major over the
latent grid.  Each downsampling stage of ComfyUI's UNet is a stride-2 conv with padding 1, so
``h_{L+1} = ceil(h_L / 2)`` (a 65x97 latent gives 33x49, then 17x25) -- sizes that are not
divisible by the factor are normal and must not break anything.

Downsampling (ToDo, arXiv 2402.13573 Sec. 3.2): the key/value token sequence is reshaped to its
(h, w) grid, resized to ``(ceil(h / f), ceil(w / f))`` and flattened back.  Queries keep their full
count, so attention output has the original token count and needs no "unmerge".
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

METHODS = ("nearest", "avg-pool", "bilinear")


def level_grids(height: int, width: int, levels: int = 6) -> list[tuple[int, int]]:
    """[(h, w) of level 1, level 2, ...] for a latent of ``height`` x ``width`` (ceil halving)."""
    out = [(int(height), int(width))]
    for _ in range(levels - 1):
        h, w = out[-1]
        out.append(((h + 1) // 2, (w + 1) // 2))
    return out


def grid_for_tokens(n_tokens: int, height: int, width: int, levels: int = 6) -> Optional[tuple[int, int, int]]:
    """(level, h, w) whose grid has ``n_tokens`` tokens, level counted from 1; None if none does."""
    for i, (h, w) in enumerate(level_grids(height, width, levels)):
        if h * w == n_tokens:
            return i + 1, h, w
    return None


def downsampled_size(h: int, w: int, factor: float) -> tuple[int, int]:
    """Grid size after downsampling by ``factor`` (ceil, never below 1)."""
    if factor <= 1.0:
        return h, w
    return max(1, math.ceil(h / factor)), max(1, math.ceil(w / factor))


def downsample_grid(x: torch.Tensor, h: int, w: int, factor: float, method: str = "nearest") -> torch.Tensor:
    """Downsample a token sequence ``x`` [B, h*w, C] on its 2-D grid -> [B, h'*w', C].

    * ``nearest``: pick one token per cell (F.interpolate nearest, as the ToDo reference code).
    * ``avg-pool``: mean over each cell (adaptive average pooling, so non-divisible sizes give
      ceil-sized outputs whose edge cells cover the remainder).
    * ``bilinear``: bilinear resize, no antialiasing (as the reference's ``F.interpolate``).
    """
    if factor <= 1.0:
        return x
    b, n, c = x.shape
    if n != h * w:
        raise ValueError(f"token count {n} does not match grid {h}x{w}")
    nh, nw = downsampled_size(h, w, factor)
    if (nh, nw) == (h, w):
        return x
    grid = x.transpose(1, 2).reshape(b, c, h, w)
    if method == "nearest":
        out = F.interpolate(grid, size=(nh, nw), mode="nearest")
    elif method == "avg-pool":
        if h % nh == 0 and w % nw == 0:
            out = F.avg_pool2d(grid, kernel_size=(h // nh, w // nw))
        else:
            out = F.adaptive_avg_pool2d(grid, (nh, nw))
    elif method == "bilinear":
        out = F.interpolate(grid, size=(nh, nw), mode="bilinear", align_corners=False)
    else:
        raise ValueError(f"unknown downsampling method {method!r}; expected one of {', '.join(METHODS)}")
    return out.reshape(b, c, nh * nw).transpose(1, 2)


def tokens_to_grid(x: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """[B, h*w, C] -> [B, C, h, w]."""
    b, n, c = x.shape
    if n != h * w:
        raise ValueError(f"token count {n} does not match grid {h}x{w}")
    return x.transpose(1, 2).reshape(b, c, h, w)


def grid_to_tokens(x: torch.Tensor) -> torch.Tensor:
    """[B, C, h, w] -> [B, h*w, C]."""
    b, c, h, w = x.shape
    return x.reshape(b, c, h * w).transpose(1, 2)


def factor_for_level(level: int, factors: Sequence[float]) -> float:
    """The factor of attention level ``level`` (1-based) from a per-level list; 1.0 past its end."""
    return float(factors[level - 1]) if 1 <= level <= len(factors) else 1.0


__all__ = ["METHODS", "level_grids", "grid_for_tokens", "downsampled_size", "downsample_grid",
           "tokens_to_grid", "grid_to_tokens", "factor_for_level"]
