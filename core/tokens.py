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

import functools
import math
from dataclasses import dataclass
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


def factor_for_level(level: int, factors: Sequence[float]) -> float:
    """The factor of attention level ``level`` (1-based) from a per-level list; 1.0 past its end."""
    return float(factors[level - 1]) if 1 <= level <= len(factors) else 1.0




# ------------------------------------------------------------------------------------------------
# DiT token layouts (issue 16): which rows of an attention sequence are text, which are image grids
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Grid:
    """One image token group: ``frames`` x ``h`` x ``w`` tokens, row-major (frame, row, column)."""
    frames: int
    h: int
    w: int

    @property
    def n(self) -> int:
        return self.frames * self.h * self.w

    @property
    def per_frame(self) -> int:
        return self.h * self.w


@dataclass(frozen=True)
class TokenLayout:
    """The token layout of one DiT call, built once per model call from the latent and conditioning.

    ``txt``: text tokens in the *joint* sequence (Flux, SD3, Qwen-Image; 0 where text is not part of the
    self-attention sequence: Wan, PixArt); ``groups``: the image token groups in sequence order (the
    sampled latent and any reference latents, e.g. Flux Kontext / Qwen edit images, Wan's reference
    frame), ``main`` the sampled latent's group; ``txt_first``: text precedes the image tokens.
    ``control``: the blocks after which a full-length residual is added (block kind, index): a ControlNet
    residual, or a model's own hint (Wan VACE, Wan Animate's face adapter, Qwen-Image block patches).
    """
    family: str
    txt: int = 0
    groups: tuple = ()
    main: int = 0
    txt_first: bool = True
    control: frozenset = frozenset()

    @property
    def img(self) -> int:
        return sum(g.n for g in self.groups)

    @property
    def joint(self) -> int:
        return self.txt + self.img

    @property
    def main_grid(self) -> Grid:
        return self.groups[self.main]

    def group_offsets(self) -> list[int]:
        """Offset of each group in the image part of the sequence."""
        out, o = [], 0
        for g in self.groups:
            out.append(o)
            o += g.n
        return out

    def main_range(self) -> tuple[int, int]:
        """(start, end) of the sampled latent's tokens in the image part of the sequence."""
        start = self.group_offsets()[self.main]
        return start, start + self.main_grid.n

    def image_offset(self, joint: bool) -> int:
        """Where the image tokens start in a joint (text + image) or image-only sequence."""
        return self.txt if joint and self.txt_first else 0

    def sequence(self, n: int) -> Optional[str]:
        """"joint" when ``n`` tokens are this call's text + image sequence, "image" when they are its image
        tokens alone, None otherwise (a cross-attention, another model's call)."""
        if self.txt and n == self.joint:
            return "joint"
        if n == self.img and self.img:
            return "image"
        return None

    def segments(self, joint: bool) -> tuple:
        """The sequence as ``("text", n)`` and :class:`Grid` segments, in order."""
        segs = list(self.groups)
        if joint and self.txt:
            segs = [("text", self.txt)] + segs if self.txt_first else segs + [("text", self.txt)]
        return tuple(segs)


def nearest_index(size: int, out: int) -> torch.Tensor:
    """Source index of each of ``out`` cells resizing ``size`` -> ``out`` as ``F.interpolate(mode="nearest")``
    (floor(i * size / out), computed in float32 as PyTorch does)."""
    scale = torch.tensor(size / out, dtype=torch.float32)
    idx = torch.floor(torch.arange(out, dtype=torch.float32) * scale).long()
    return idx.clamp_(max=size - 1)


def grid_keep_index(grid: Grid, factor: float) -> torch.Tensor:
    """Indices (into the group's tokens) kept by nearest downsampling of every frame by ``factor``."""
    nh, nw = downsampled_size(grid.h, grid.w, factor)
    rows, cols = nearest_index(grid.h, nh), nearest_index(grid.w, nw)
    per = (rows.unsqueeze(1) * grid.w + cols.unsqueeze(0)).flatten()
    frames = torch.arange(grid.frames).unsqueeze(1) * grid.per_frame
    return (frames + per.unsqueeze(0)).flatten()


@functools.lru_cache(maxsize=256)
def _kv_index_cpu(segments: tuple, factor: float) -> torch.Tensor:
    parts, o = [], 0
    for seg in segments:
        if isinstance(seg, Grid):
            parts.append(grid_keep_index(seg, factor) + o)
            o += seg.n
        else:
            parts.append(torch.arange(o, o + seg[1]))
            o += seg[1]
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.long)


def kv_index(segments: tuple, factor: float, device=None) -> torch.Tensor:
    """Indices into a sequence laid out as ``segments`` that nearest downsampling keeps: every text token,
    every image grid (per frame) downsampled by ``factor`` (ceil sizes)."""
    idx = _kv_index_cpu(tuple(segments), float(factor))
    return idx if device is None else idx.to(device)


def downsample_tokens(x: torch.Tensor, dim: int, segments: tuple, factor: float, method: str = "nearest") -> torch.Tensor:
    """Downsample the image grids of a token sequence along ``dim`` (text segments untouched).

    ``nearest`` picks one token per cell (an index selection, so rotary phases already applied to the
    keys stay exact); ``avg-pool`` / ``bilinear`` resample each frame of each grid (positions mix).
    """
    if method == "nearest":
        return x.index_select(dim, kv_index(segments, factor, x.device))
    if method not in METHODS:
        raise ValueError(f"unknown downsampling method {method!r}; expected one of {', '.join(METHODS)}")
    dim = dim % x.ndim
    moved = x.movedim(dim, 1)                       # [B, L, ...rest]
    lead, rest = moved.shape[0], moved.shape[2:]
    flat = moved.reshape(lead, moved.shape[1], -1)
    out, o = [], 0
    for seg in segments:
        if isinstance(seg, Grid):
            part = flat[:, o:o + seg.n]
            frames = part.reshape(lead * seg.frames, seg.per_frame, part.shape[-1])
            ds = downsample_grid(frames, seg.h, seg.w, factor, method)
            out.append(ds.reshape(lead, seg.frames * ds.shape[1], part.shape[-1]))
            o += seg.n
        else:
            out.append(flat[:, o:o + seg[1]])
            o += seg[1]
    res = torch.cat(out, dim=1)
    return res.reshape(lead, res.shape[1], *rest).movedim(1, dim)


def kept_kv_tokens(segments: tuple, factor: float) -> int:
    """K/V length after :func:`downsample_tokens`."""
    n = 0
    for seg in segments:
        if isinstance(seg, Grid):
            nh, nw = downsampled_size(seg.h, seg.w, factor)
            n += seg.frames * nh * nw
        else:
            n += seg[1]
    return n


# ToDo's resolution bands (arXiv 2402.13573: factor 2 at 1024², 3 at 1536², 4 at 2048²), by the image side
# in pixels (the geometric mean of width and height); a band starts halfway between the paper's sizes
BANDS = ((1280, 2.0), (1792, 3.0), (float("inf"), 4.0))


def band_factor(pixels_h: int, pixels_w: int) -> float:
    """The paper's factor for an image of ``pixels_h`` x ``pixels_w`` (2 up to ~1280², 3 up to ~1792², 4 above)."""
    side = math.sqrt(max(pixels_h, 1) * max(pixels_w, 1))
    for limit, f in BANDS:
        if side < limit:
            return f
    return BANDS[-1][1]


__all__ = ["METHODS", "level_grids", "downsampled_size", "downsample_grid", "factor_for_level", "Grid", "TokenLayout",
           "nearest_index", "grid_keep_index", "kv_index", "downsample_tokens", "kept_kv_tokens", "BANDS", "band_factor"]
