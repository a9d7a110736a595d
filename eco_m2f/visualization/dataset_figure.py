"""One picture of a model on a dataset: a row of input | ground truth | prediction per image.

The README shows this for the synthetic validation set; any registered dataset works.
"""
from __future__ import annotations

from typing import Any, Optional

import numpy as np
import torch
import torch.nn as nn

from .classes import ClassPalette
from .comparison import comparison_panels
from .panels import render_figure

__all__ = ["render_dataset_figure"]


def render_dataset_figure(cfg: Any, model: nn.Module, dataset_name: str, num_images: int, *,
                          min_size: int = 256, score_threshold: float = 0.5) -> np.ndarray:
    """H x W x 3 uint8: the first ``num_images`` images of ``dataset_name`` as the test loader gives
    them, one row each; images smaller than ``min_size`` are enlarged by an integer factor."""
    from ..data import MetadataCatalog, build_detection_test_loader

    if num_images < 1:
        raise ValueError(f"the number of images must be at least 1, got {num_images}")
    meta = MetadataCatalog.get(dataset_name)
    classes = ClassPalette.from_metadata(meta)
    ignore_label = int(meta.get("ignore_label", 255))
    rows = []
    loader = build_detection_test_loader(cfg, dataset_name, num_workers=0, rank=0, world_size=1)
    with torch.no_grad():
        for batch in loader:
            for x, out in zip(batch, model(batch)):
                rows.append(comparison_panels(x, out, classes, score_threshold=score_threshold,
                                              ignore_label=ignore_label))
            if len(rows) >= num_images:
                break
    if len(rows) < num_images:
        raise ValueError(f"dataset '{dataset_name}' has {len(rows)} images, fewer than the {num_images} asked for")
    rows = rows[:num_images]
    smallest = min(min(p.image.shape[:2]) for r in rows for p in r)
    scale = max(1, -(-int(min_size) // smallest)) if smallest < min_size else 1
    return render_figure(rows, scale=scale).image
