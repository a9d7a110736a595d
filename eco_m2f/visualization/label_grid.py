"""A small grid of labels drawn as a panel: the per-stage token maps of dynamic segmenters.

A token-reduction model can say, for each cell of its patch grid and each stage, what became
of that token ("kept", "paused at layer 3", "shared 4x4", "pruned at layer 8"). Such a map is
an ``Hg x Wg`` integer grid plus what each value means; this draws it at the result's size,
over the image or alone, with a legend counting the cells of each label, so the token maps
stand beside the segmentation in the same figure.
"""
from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction
from typing import Optional, Sequence, Union

import numpy as np

from .panels import LegendEntry, Panel
from .raster import blend

__all__ = ["GridLabel", "label_grid_panel"]

_CELL_LINE = np.array([40, 40, 40], dtype=np.uint8)


@dataclass(frozen=True)
class GridLabel:
    """What grid value ``value`` means: a legend text and an RGB colour."""

    value: int
    label: str
    color: tuple[int, int, int]


def _cell_index(n_cells: int, n_pixels: int, per_cell: Optional[Fraction] = None) -> np.ndarray:
    """Cell of every pixel along one axis: pixel p lies in cell floor(p * n_cells / n_pixels), or
    floor(p / per_cell) (exact, in integers) when the cells have a size of their own."""
    if per_cell is None:
        return (np.arange(n_pixels) * n_cells) // n_pixels
    return np.minimum((np.arange(n_pixels, dtype=np.int64) * per_cell.denominator) // per_cell.numerator, n_cells - 1)


Number = Union[int, float, Fraction]


def label_grid_panel(grid: np.ndarray, labels: Sequence[GridLabel], *, image: Optional[np.ndarray] = None,
                     size: Optional[tuple[int, int]] = None, title: str = "", alpha: float = 0.6,
                     cell_lines: Optional[bool] = None,
                     cell_size: Optional[tuple[Number, Number]] = None) -> Panel:
    """Panel of ``grid`` (Hg x Wg ints, every value one of ``labels``).

    The grid is stretched to ``size`` (H, W): the image's size when ``image`` is given (the
    colours are then blended over it with weight ``alpha``), else 16 pixels per cell. Cells
    are separated by dark lines when they are at least 6 pixels wide (``cell_lines`` forces it
    either way). ``cell_size`` (pixels per cell along H and W, fractions allowed) places the
    cells where the picture is a resized copy of a network input whose last cells reach past
    the image (its padding): those cells are then cut at the border instead of every cell
    being stretched. The legend lists the labels present, in the order of ``labels``, with
    their cell counts.
    """
    grid = np.asarray(grid)
    if grid.ndim != 2 or grid.size == 0 or not np.issubdtype(grid.dtype, np.integer):
        raise ValueError(f"a label grid must be a non-empty 2-D integer array, got {grid.dtype} {grid.shape}")
    table = {int(g.value): g for g in labels}
    if len(table) != len(labels):
        raise ValueError(f"label grid '{title}': two labels share a value: {[g.value for g in labels]}")
    unknown = sorted(set(np.unique(grid).tolist()) - set(table))
    if unknown:
        raise ValueError(f"label grid '{title}' holds values {unknown} that no label describes (known: {sorted(table)})")
    gh, gw = grid.shape
    if image is not None:
        image = np.asarray(image)
        size = image.shape[:2]
    elif size is None:
        size = (16 * gh, 16 * gw)
    h, w = int(size[0]), int(size[1])
    if h < gh or w < gw:
        raise ValueError(f"label grid '{title}': {gh}x{gw} cells do not fit in {h}x{w} pixels")
    values = sorted(table)
    lut = np.zeros((max(values) - min(values) + 1, 3), dtype=np.uint8)
    for v in values:
        lut[v - min(values)] = table[v].color
    if cell_size is None:
        rows, cols = _cell_index(gh, h), _cell_index(gw, w)
        cell_px = min(h / gh, w / gw)
    else:
        per = [Fraction(c).limit_denominator(10 ** 6) for c in cell_size]
        if len(per) != 2 or min(per) <= 0:
            raise ValueError(f"label grid '{title}': cell_size must be two positive sizes, got {cell_size}")
        if (gh - 1) * per[0] >= h or (gw - 1) * per[1] >= w:
            raise ValueError(f"label grid '{title}': {gh}x{gw} cells of {float(per[0]):g}x{float(per[1]):g} pixels "
                             f"leave whole cells outside {h}x{w} pixels")
        rows, cols = _cell_index(gh, h, per[0]), _cell_index(gw, w, per[1])
        cell_px = float(min(per))
    cells = grid[rows[:, None], cols[None, :]]  # H x W grid value of every pixel
    picture = lut[cells - min(values)]
    if image is not None:
        picture = blend(image, picture, alpha)
    if cell_lines if cell_lines is not None else cell_px >= 6:
        starts_r = np.r_[False, rows[1:] != rows[:-1]]
        starts_c = np.r_[False, cols[1:] != cols[:-1]]
        picture[starts_r, :] = _CELL_LINE
        picture[:, starts_c] = _CELL_LINE
    counts = {v: int((grid == v).sum()) for v in values}
    legend = [LegendEntry(f"{g.label} ({counts[g.value]})", tuple(int(c) for c in g.color))
              for g in labels if counts[int(g.value)]]
    return Panel(picture, title, [], legend)
