"""Panels (a picture with a title, notes and a legend) laid out side by side and in rows.

Every picture the project writes is a grid of panels: the demo's result beside its extra
panels (exit and GFLOPs, token maps), the evaluation's input | ground truth | prediction, and
the README's rows of those. Text is drawn with PIL's built-in font at a size that follows the
pictures, so one layout serves a 64-pixel test image and a 2048-pixel Cityscapes frame.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence

import os

import numpy as np
from PIL import Image, ImageDraw, ImageFont

__all__ = ["Figure", "LegendEntry", "Panel", "downscaled", "font_size_for", "render_figure", "save_picture"]

Color = tuple[int, int, int]
Box = tuple[int, int, int, int]

_BACKGROUND = (255, 255, 255)
_TEXT = (0, 0, 0)


@dataclass(frozen=True)
class LegendEntry:
    """A colour swatch and its label."""

    label: str
    color: Color


@dataclass
class Panel:
    """``image`` (H x W x 3 uint8) under ``title``, with ``notes`` (text lines) and ``legend`` below."""

    image: np.ndarray
    title: str = ""
    notes: list[str] = field(default_factory=list)
    legend: list[LegendEntry] = field(default_factory=list)

    def __post_init__(self) -> None:
        img = np.asarray(self.image)
        if img.ndim != 3 or img.shape[2] != 3 or img.dtype != np.uint8:
            raise ValueError(f"panel '{self.title}': expected an H x W x 3 uint8 image, got {img.dtype} {img.shape}")
        self.image = img


@dataclass
class Figure:
    """The rendered picture and, per row and panel, the box ``(x, y, w, h)`` where the panel's image lies."""

    image: np.ndarray
    boxes: list[list[Box]]


def font_size_for(width: int) -> int:
    """Text height that reads well beside a picture ``width`` pixels wide."""
    return int(min(48, max(12, round(width / 40))))


def _font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: one bitmap size only
        return ImageFont.load_default()


@dataclass
class _Column:
    """Measured layout of one panel."""

    panel: Panel
    image: np.ndarray
    width: int
    legend_lines: list[list[tuple[int, LegendEntry]]]  # per line: (x offset, entry)
    height: int


class _Layout:
    def __init__(self, font_size: int) -> None:
        self.font = _font(font_size)
        ascent, descent = self.font.getmetrics()
        self.line = ascent + descent + max(2, font_size // 4)
        self.swatch = max(8, int(0.8 * (ascent + descent)))
        self.gap = max(4, font_size // 2)
        self.margin = max(6, font_size // 2)

    def text_width(self, text: str) -> int:
        return int(np.ceil(self.font.getlength(text)))

    def entry_width(self, entry: LegendEntry) -> int:
        return self.swatch + self.gap // 2 + self.text_width(entry.label)

    def column(self, panel: Panel, scale: int) -> _Column:
        image = panel.image
        if scale > 1:
            image = image.repeat(scale, axis=0).repeat(scale, axis=1)
        texts = [panel.title, *panel.notes]
        width = max([image.shape[1]] + [self.text_width(t) for t in texts] + [self.entry_width(e) for e in panel.legend])
        lines: list[list[tuple[int, LegendEntry]]] = []
        x = width + 1
        for entry in panel.legend:  # flow the entries left to right, wrapping at the column width
            w = self.entry_width(entry)
            if x + w > width:
                lines.append([])
                x = 0
            lines[-1].append((x, entry))
            x += w + self.gap
        height = (self.line if panel.title else 0) + image.shape[0] + self.line * (len(panel.notes) + len(lines))
        return _Column(panel, image, width, lines, height)


def render_figure(rows: Sequence[Sequence[Panel]], scale: int = 1, font_size: Optional[int] = None) -> Figure:
    """Rows of panels on a white canvas; panels of one grid column share a width, of one row a height.

    ``scale`` enlarges every image by an integer factor (nearest neighbour, so pixels stay
    exact); ``font_size`` defaults to :func:`font_size_for` the widest image.
    """
    rows = [list(r) for r in rows if len(r)]
    if not rows:
        raise ValueError("render_figure needs at least one panel")
    scale = int(scale)
    if scale < 1:
        raise ValueError(f"scale must be a positive integer, got {scale}")
    widest = max(p.image.shape[1] for r in rows for p in r) * scale
    layout = _Layout(font_size or font_size_for(widest))
    columns = [[layout.column(p, scale) for p in r] for r in rows]
    num_cols = max(len(r) for r in columns)
    col_w = [max(r[c].width for r in columns if c < len(r)) for c in range(num_cols)]
    row_h = [max(c.height for c in r) for r in columns]
    m = layout.margin
    canvas = Image.new("RGB", (sum(col_w) + m * (num_cols + 1), sum(row_h) + m * (len(rows) + 1)), _BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    boxes: list[list[Box]] = []
    y0 = m
    for r, row in enumerate(columns):
        boxes.append([])
        x0 = m
        for c, col in enumerate(row):
            y = y0
            if col.panel.title:
                draw.text((x0, y), col.panel.title, fill=_TEXT, font=layout.font)
                y += layout.line
            h, w = col.image.shape[:2]
            canvas.paste(Image.fromarray(col.image), (x0, y))
            boxes[-1].append((x0, y, w, h))
            y += h
            for note in col.panel.notes:
                draw.text((x0, y), note, fill=_TEXT, font=layout.font)
                y += layout.line
            for line in col.legend_lines:
                for dx, entry in line:
                    top = y + (layout.line - layout.swatch) // 2
                    draw.rectangle((x0 + dx, top, x0 + dx + layout.swatch - 1, top + layout.swatch - 1),
                                   fill=tuple(int(v) for v in entry.color), outline=_TEXT)
                    draw.text((x0 + dx + layout.swatch + layout.gap // 2, y), entry.label, fill=_TEXT, font=layout.font)
                y += layout.line
            x0 += col_w[c] + m
        y0 += row_h[r] + m
    return Figure(np.asarray(canvas, dtype=np.uint8).copy(), boxes)


def save_picture(path: str | os.PathLike, image: np.ndarray) -> None:
    """Write ``image`` as PNG (byte-identical run to run), or as JPEG (quality 90, a fraction of
    the size for photographs) when ``path`` ends in ``.jpg`` / ``.jpeg``; parent folders are created."""
    from ..data.io import write_png

    if os.fspath(path).lower().endswith((".jpg", ".jpeg")):
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        Image.fromarray(np.ascontiguousarray(image)).save(path, format="JPEG", quality=90)
    else:
        write_png(path, image)


def downscaled(image: np.ndarray, width: int) -> np.ndarray:
    """``image`` scaled (Lanczos) to ``width`` pixels, the aspect ratio kept: a figure small enough
    for a web page (pixels are then no longer exact)."""
    h, w = image.shape[:2]
    if width < 1:
        raise ValueError(f"the width must be positive, got {width}")
    size = (int(width), max(1, round(h * width / w)))
    return np.asarray(Image.fromarray(np.ascontiguousarray(image)).resize(size, Image.LANCZOS), dtype=np.uint8)
