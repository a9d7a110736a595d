"""Pixel operations of the drawings: colour blending and segment outlines, in integers.

Integer arithmetic keeps every picture identical across machines, so tests can check pixels:
a filled pixel is ``(base * (256 - a) + color * a + 128) // 256`` with ``a = round(256 * alpha)``.
"""
from __future__ import annotations

import numpy as np
from scipy import ndimage

__all__ = ["blend", "outline_mask", "paint_segments", "outline_color", "default_thickness"]


def _alpha256(alpha: float) -> int:
    if not 0.0 <= float(alpha) <= 1.0:
        raise ValueError(f"alpha must lie in [0, 1], got {alpha}")
    return int(round(256 * float(alpha)))


def blend(base: np.ndarray, color: np.ndarray, alpha: float) -> np.ndarray:
    """``base`` and ``color`` (same shape, uint8) mixed with weight ``alpha`` on ``color``."""
    a = _alpha256(alpha)
    mixed = (base.astype(np.int32) * (256 - a) + color.astype(np.int32) * a + 128) // 256
    return mixed.astype(np.uint8)


def outline_color(colors: np.ndarray) -> np.ndarray:
    """The outline of a segment: its colour at half brightness."""
    return (np.asarray(colors, dtype=np.uint8) // 2).astype(np.uint8)


def default_thickness(height: int, width: int) -> int:
    """Outline width in pixels: 1 up to 256 pixels on the short side, growing with the image."""
    return max(1, int(round(min(height, width) / 256)))


def outline_mask(index_map: np.ndarray, thickness: int = 1) -> np.ndarray:
    """H x W bool: pixels of a segment (index > 0) within ``thickness`` pixels of another index.

    The image border is not an edge, so a segment touching it is not outlined there.
    """
    if thickness <= 0:
        return np.zeros(index_map.shape, dtype=bool)
    size = 2 * int(thickness) + 1
    hi = ndimage.maximum_filter(index_map, size=size, mode="nearest")
    lo = ndimage.minimum_filter(index_map, size=size, mode="nearest")
    return (index_map > 0) & ((hi != index_map) | (lo != index_map))


def paint_segments(image: np.ndarray, index_map: np.ndarray, colors: np.ndarray, alpha: float,
                   thickness: int) -> np.ndarray:
    """``image`` (H x W x 3 uint8) with segment k (``index_map == k``) blended in ``colors[k]``
    (row 0 unused: index 0 stays as the image) and outlined in :func:`outline_color`."""
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"expected an H x W x 3 uint8 image, got {image.dtype} {image.shape}")
    if index_map.shape != image.shape[:2]:
        raise ValueError(f"the segment map is {index_map.shape[0]}x{index_map.shape[1]} (HxW) but the image is "
                         f"{image.shape[0]}x{image.shape[1]}")
    colors = np.asarray(colors, dtype=np.uint8)
    out = image.copy()
    inside = index_map > 0
    out[inside] = blend(image[inside], colors[index_map[inside]], alpha)
    edges = outline_mask(index_map, thickness)
    out[edges] = outline_color(colors)[index_map[edges]]
    return out
