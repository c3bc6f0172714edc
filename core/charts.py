"""Benchmark pictures drawn with Pillow only (a ComfyUI dependency; no matplotlib needed): the
speed-vs-fidelity plot (one point per row, the fewer-steps curve drawn through) and a text table,
for the benchmark CLI's PNG and the FreeSpeed Benchmark node's IMAGE output.  No comfy import.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

from PIL import Image, ImageDraw, ImageFont

BG = (255, 255, 255)
FG = (30, 30, 30)
GRID = (225, 225, 225)
CURVE = (120, 120, 120)
PALETTE = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (148, 103, 189), (255, 127, 14), (23, 190, 207),
           (140, 86, 75), (227, 119, 194), (188, 189, 34), (127, 127, 127)]


def _font(size: int = 13):
    for name in ("DejaVuSans.ttf", "Arial.ttf", "LiberationSans-Regular.ttf"):
        try:
            return ImageFont.truetype(name, size)
        except OSError:
            continue
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1
        return ImageFont.load_default()


def _nice_ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    if hi <= lo:
        hi = lo + 1.0
    raw = (hi - lo) / max(1, n)
    mag = 10 ** math.floor(math.log10(raw))
    step = min((m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw), default=10 * mag)
    start = math.ceil(lo / step) * step
    out = []
    v = start
    while v <= hi + 1e-9:
        out.append(round(v, 10))
        v += step
    return out


def speed_fidelity_plot(points: Sequence[dict], curve: Sequence[tuple[float, float, str]] = (),
                        title: str = "", size: tuple[int, int] = (900, 600),
                        x_label: str = "speed ratio vs baseline (×, higher is faster)",
                        y_label: str = "PSNR vs full run (dB, higher is closer)") -> Image.Image:
    """Scatter ``points`` ({"label", "x", "y"}; y may be inf: drawn at the top edge, labelled ∞)
    and the ``curve`` of (x, y, label) points joined by a line (the fewer-steps runs)."""
    w, h = size
    img = Image.new("RGB", size, BG)
    d = ImageDraw.Draw(img)
    font, small = _font(14), _font(12)
    left, right, top, bottom = 70, 30, 40 if title else 20, 60
    finite = [p["y"] for p in points if p.get("y") is not None and math.isfinite(p["y"])]
    finite += [y for _, y, _ in curve if y is not None and math.isfinite(y)]
    xs = [p["x"] for p in points if p.get("x") is not None] + [x for x, _, _ in curve]
    if not xs:
        d.text((left, top), "no data", fill=FG, font=font)
        return img
    ylo = min(finite) if finite else 0.0
    yhi = max(finite) if finite else 1.0
    pad = max(1.0, (yhi - ylo) * 0.08)
    ylo, yhi = ylo - pad, yhi + 2 * pad                       # room at the top for "∞" points
    xlo, xhi = min(xs + [1.0]), max(xs + [1.0])
    xpad = max(0.05, (xhi - xlo) * 0.08)
    xlo, xhi = max(0.0, xlo - xpad), xhi + xpad

    def px(x: float) -> float:
        return left + (x - xlo) / (xhi - xlo) * (w - left - right)

    def py(y: float) -> float:
        if not math.isfinite(y):
            return top + 14
        return h - bottom - (y - ylo) / (yhi - ylo) * (h - top - bottom)

    for t in _nice_ticks(xlo, xhi, 8):
        d.line([(px(t), top), (px(t), h - bottom)], fill=GRID)
        d.text((px(t) - 10, h - bottom + 6), f"{t:g}", fill=FG, font=small)
    for t in _nice_ticks(ylo, yhi, 6):
        d.line([(left, py(t)), (w - right, py(t))], fill=GRID)
        d.text((8, py(t) - 7), f"{t:g}", fill=FG, font=small)
    d.rectangle([left, top, w - right, h - bottom], outline=FG)
    d.line([(px(1.0), top), (px(1.0), h - bottom)], fill=(170, 170, 170), width=1)
    d.text(((w - d.textlength(x_label, font=font)) / 2, h - 30), x_label, fill=FG, font=font)
    d.text((left, 4 if title else top - 18), y_label if not title else title, fill=FG, font=font)
    if title:
        d.text((left, 22), y_label, fill=FG, font=small)
    # fewer-steps curve
    cpts = sorted((x, y, lb) for x, y, lb in curve if y is not None)
    if len(cpts) >= 2:
        d.line([(px(x), py(y)) for x, y, _ in cpts], fill=CURVE, width=2)
    for x, y, lb in cpts:
        d.ellipse([px(x) - 3, py(y) - 3, px(x) + 3, py(y) + 3], fill=CURVE)
        d.text((px(x) + 4, py(y) + 2), lb, fill=CURVE, font=small)
    # rows (labels moved down until they overlap no earlier label)
    placed: list[tuple[float, float, float, float]] = []
    for i, p in enumerate(points):
        if p.get("x") is None or p.get("y") is None:
            continue
        c = PALETTE[i % len(PALETTE)]
        x, y = px(p["x"]), py(p["y"])
        d.ellipse([x - 6, y - 6, x + 6, y + 6], fill=c, outline=FG)
        lab = p["label"] + (" (∞ dB)" if not math.isfinite(p["y"]) else "")
        lw = d.textlength(lab, font=small)
        lx, ly = x + 8, y - 16
        while any(lx < bx1 and lx + lw > bx0 and ly < by1 and ly + 14 > by0 for bx0, by0, bx1, by1 in placed):
            ly += 15
        placed.append((lx, ly, lx + lw, ly + 14))
        d.text((lx, ly), lab, fill=c, font=small)
    return img


def text_table(header: Sequence[str], rows: Sequence[Sequence[str]], title: str = "",
               notes: Sequence[str] = (), width: Optional[int] = None) -> Image.Image:
    """A plain table rendered as an image (monospace layout by column widths)."""
    font, bold = _font(13), _font(14)
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    cols = len(header)
    cw = [max(probe.textlength(str(r[i]) if i < len(r) else "", font=font) for r in list(rows) + [header]) + 18
          for i in range(cols)]
    line_h = 20
    w = int(max(sum(cw) + 20, width or 0, max((probe.textlength(n, font=font) for n in notes), default=0) + 20))
    h = 20 + (26 if title else 0) + line_h * (len(rows) + 1) + 8 + line_h * len(notes) + 10
    img = Image.new("RGB", (w, h), BG)
    d = ImageDraw.Draw(img)
    y = 10
    if title:
        d.text((10, y), title, fill=FG, font=bold)
        y += 26
    x = 10
    for i, name in enumerate(header):
        d.text((x, y), str(name), fill=FG, font=bold)
        x += cw[i]
    y += line_h
    d.line([(10, y - 3), (w - 10, y - 3)], fill=FG)
    for r in rows:
        x = 10
        for i in range(cols):
            d.text((x, y), str(r[i]) if i < len(r) else "", fill=FG, font=font)
            x += cw[i]
        y += line_h
    y += 8
    for n in notes:
        d.text((10, y), n, fill=CURVE, font=font)
        y += line_h
    return img


def stack_images(images: Sequence[Image.Image]) -> Image.Image:
    """Images one below the other on a white page (widest sets the width)."""
    w = max(i.width for i in images)
    h = sum(i.height for i in images)
    out = Image.new("RGB", (w, h), BG)
    y = 0
    for i in images:
        out.paste(i, (0, y))
        y += i.height
    return out


__all__ = ["speed_fidelity_plot", "text_table", "stack_images"]
