"""Targets of the CTS policy network: does a 32x32 superpatch hold a single semantic class?

A superpatch is 2 x 2 patches of 16 pixels (papers/002 section 1.1), one cell of the policy's
stride-32 output. Target 1 ("uniform"): the superpatch may share one token; 0 ("mixed"): it holds
several classes. Rules (DESIGN.md section 6, and the choices where the paper is silent):

* ignore pixels (the dataset's ignore label) are "don't care" by default: a superpatch whose
  labelled pixels all have one class is uniform, however many ignore pixels it also holds
  (sharing there cannot cost accuracy, since the metric skips those pixels). With
  ``ignore_as_class`` the ignore label counts as a class of its own instead;
* an all-ignore superpatch is uniform (one class, the paper's rule) in both modes;
* a superpatch cut by the image border is judged on its pixels inside the image: the padding
  counts as ignore. Cells wholly outside an image (batch padding) are not targets at all; the
  model leaves them out of the loss.
"""
from __future__ import annotations

from typing import Tuple

import torch
import torch.nn.functional as F

__all__ = ["SUPERPATCH_SIZE", "superpatch_grid", "superpatch_targets", "window_grid", "window_targets"]

#: Pixels per side of a superpatch: 2 x 2 patches of 16 pixels, the policy's output stride.
SUPERPATCH_SIZE = 32


def superpatch_grid(height: int, width: int, size: int = SUPERPATCH_SIZE) -> Tuple[int, int]:
    """Rows and columns of superpatches that cover an image, a partly covered one included."""
    return -(-int(height) // size), -(-int(width) // size)


def window_grid(height: int, width: int, window: int = 2) -> Tuple[int, int]:
    """Rows and columns of windows of ``window`` x ``window`` patches that the policy scores on an
    image: the stride-32 cells grouped ``window / 2`` a side, windows wholly on that grid only."""
    rows, cols = superpatch_grid(height, width)
    k = max(1, int(window) // 2)
    return rows // k, cols // k


def window_targets(
    labels: torch.Tensor, window: int = 2, ignore_value: int = 255, ignore_as_class: bool = False
) -> torch.Tensor:
    """Semantic labels (..., H, W) -> (..., rows, cols) of :func:`window_grid`: 1 when the
    window of ``window`` x ``window`` patches (16 pixels each) holds one class, by the rules of
    :func:`superpatch_targets`; ``window`` 2 is the superpatch."""
    rows, cols = window_grid(labels.shape[-2], labels.shape[-1], window)
    targets = superpatch_targets(labels, ignore_value, ignore_as_class, size=16 * int(window))
    return targets[..., :rows, :cols]


def superpatch_targets(
    labels: torch.Tensor, ignore_value: int = 255, ignore_as_class: bool = False, size: int = SUPERPATCH_SIZE
) -> torch.Tensor:
    """Semantic labels (..., H, W) -> (..., ceil(H/size), ceil(W/size)) int64: 1 uniform, 0 mixed."""
    if labels.dim() < 2:
        raise ValueError(f"superpatch_targets needs (..., H, W) labels, got shape {tuple(labels.shape)}")
    if labels.dtype.is_floating_point or labels.dtype == torch.bool:
        raise TypeError(f"superpatch_targets needs integer class labels, got {labels.dtype}")
    labels = labels.to(torch.int64)
    lead, (h, w) = labels.shape[:-2], labels.shape[-2:]
    rows, cols = superpatch_grid(h, w, size)
    labels = F.pad(labels, (0, cols * size - w, 0, rows * size - h), value=ignore_value)
    # (..., rows*size, cols*size) -> (..., rows, cols, size*size): the pixels of each superpatch
    cells = labels.reshape(*lead, rows, size, cols, size).transpose(-3, -2).flatten(-2)
    if ignore_as_class:
        return (cells.amax(dim=-1) == cells.amin(dim=-1)).to(torch.int64)
    ignored = cells == ignore_value
    lowest = cells.masked_fill(ignored, torch.iinfo(torch.int64).max).amin(dim=-1)
    highest = cells.masked_fill(ignored, torch.iinfo(torch.int64).min).amax(dim=-1)
    # one labelled class: highest == lowest; all ignore: highest (min int) < lowest (max int)
    return (highest <= lowest).to(torch.int64)
