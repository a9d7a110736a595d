"""Segment layers drawn over their image as panels: class colours, outlines, a legend, the cost."""
from __future__ import annotations

from collections import Counter
from typing import Any, Mapping, Optional, Sequence

import numpy as np

from .classes import ClassPalette
from .cost import cost_notes
from .panels import LegendEntry, Panel
from .raster import default_thickness, paint_segments
from .segments import TASK_ORDER, SegmentLayer

__all__ = ["DEFAULT_ALPHA", "class_legend", "draw_layer", "prediction_panel"]

#: Weight of the class colour over the image inside a segment.
DEFAULT_ALPHA = 0.6


def class_legend(layer: SegmentLayer, classes: ClassPalette) -> list[LegendEntry]:
    """One entry per class present, in class order; things say how many segments they have."""
    counts = Counter(s.category_id for s in layer.segments if s.area > 0)
    entries = []
    for c in sorted(counts):
        label = classes.names[c]
        if classes.is_thing[c] and layer.task != "sem_seg":
            label = f"{label} ({counts[c]})"
        entries.append(LegendEntry(label, tuple(int(v) for v in classes.colors[c])))
    return entries


def draw_layer(image: np.ndarray, layer: SegmentLayer, classes: ClassPalette, *, title: str = "",
               notes: Sequence[str] = (), alpha: float = DEFAULT_ALPHA, thickness: Optional[int] = None) -> Panel:
    """``image`` (H x W x 3 uint8, the layer's size) with every segment filled in its class colour
    (weight ``alpha``) and outlined; void pixels keep the image."""
    colors = np.zeros((len(layer.segments) + 1, 3), dtype=np.uint8)
    if layer.segments:
        colors[1:] = classes.colors[[s.category_id for s in layer.segments]]
    h, w = layer.index_map.shape
    picture = paint_segments(image, layer.index_map, colors, alpha,
                             default_thickness(h, w) if thickness is None else thickness)
    return Panel(picture, title, list(notes), class_legend(layer, classes))


_TASK_TITLES = {"panoptic_seg": "panoptic", "instances": "instances", "sem_seg": "semantic"}


def prediction_panel(image: np.ndarray, layers: Mapping[str, SegmentLayer], classes: ClassPalette, *,
                     cost: Optional[Mapping[str, Any]] = None, title: str = "prediction",
                     alpha: float = DEFAULT_ALPHA) -> Panel:
    """The first task of :data:`~.segments.TASK_ORDER` among ``layers`` drawn over ``image``, with the
    image's cost record (exit, GFLOPs, ...) written under it."""
    task = next((t for t in TASK_ORDER if t in layers), None)
    if task is None:
        raise ValueError(f"nothing to draw: the output holds none of {list(TASK_ORDER)}")
    notes = cost_notes(cost) if cost else []
    return draw_layer(image, layers[task], classes, title=f"{title} ({_TASK_TITLES[task]})", notes=notes, alpha=alpha)
