"""One task's result as a list of segments over an index map: what is drawn and what the JSON lists.

The model's eval outputs (DESIGN.md section 3) come in three shapes, panoptic
``(id_map, segments_info)``, semantic ``C x H x W`` scores and instance masks; each becomes a
:class:`SegmentLayer`: an ``H x W`` index map (0 = no segment, k = ``segments[k - 1]``) and the
segments' class, score, area and box. Areas and boxes of the panoptic and semantic layers are
exact for their partition of the image; an instance's are those of its own mask, also where a
later instance covers it in the drawing.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, Optional

import numpy as np
from scipy import ndimage

from .classes import ClassPalette

__all__ = [
    "Segment",
    "SegmentLayer",
    "TASK_ORDER",
    "instance_layer",
    "panoptic_layer",
    "prediction_layers",
    "semantic_layer",
]

#: Which task a picture shows when an output holds several (as Detectron2's demo).
TASK_ORDER = ("panoptic_seg", "instances", "sem_seg")

BBox = tuple[int, int, int, int]


@dataclass(frozen=True)
class Segment:
    """One segment; ``bbox`` is COCO's ``[x, y, width, height]`` in pixels of the original image."""

    id: int
    category_id: int
    class_name: str
    area: int
    bbox: BBox
    isthing: Optional[bool] = None
    score: Optional[float] = None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"id": self.id, "category_id": self.category_id, "class_name": self.class_name}
        if self.isthing is not None:
            out["isthing"] = self.isthing
        if self.score is not None:
            out["score"] = self.score
        out["area"] = self.area
        out["bbox"] = list(self.bbox)
        return out


@dataclass
class SegmentLayer:
    """``index_map`` H x W int32 (0 = nothing, k = ``segments[k - 1]``) and its segments."""

    task: str
    index_map: np.ndarray
    segments: list[Segment] = field(default_factory=list)


def _numpy(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    return np.asarray(x)


def _partition_stats(index_map: np.ndarray, n: int) -> tuple[np.ndarray, list[BBox]]:
    """Area and box of labels 1..n of a partition (one label per pixel)."""
    areas = np.bincount(index_map.ravel(), minlength=n + 1)[1:]
    boxes = []
    for sl in ndimage.find_objects(index_map, max_label=n):
        if sl is None:
            boxes.append((0, 0, 0, 0))
        else:
            ys, xs = sl
            boxes.append((int(xs.start), int(ys.start), int(xs.stop - xs.start), int(ys.stop - ys.start)))
    return areas, boxes


def _mask_stats(masks: np.ndarray) -> tuple[np.ndarray, list[BBox]]:
    """Area and box of every mask of N x H x W booleans (possibly overlapping)."""
    n, h, w = masks.shape
    areas = masks.reshape(n, h * w).sum(1)
    rows, cols = masks.any(2), masks.any(1)  # N x H, N x W
    y0, x0 = rows.argmax(1), cols.argmax(1)
    y1, x1 = h - rows[:, ::-1].argmax(1), w - cols[:, ::-1].argmax(1)
    return areas, [
        (int(x0[i]), int(y0[i]), int(x1[i] - x0[i]), int(y1[i] - y0[i])) if areas[i] else (0, 0, 0, 0) for i in range(n)
    ]


def panoptic_layer(panoptic_seg: Any, classes: ClassPalette, where: str = "panoptic_seg") -> SegmentLayer:
    """``(id_map H x W, segments_info)`` (Detectron2's format); ids not listed are void."""
    id_map, segments_info = panoptic_seg
    ids = _numpy(id_map).astype(np.int64)
    if ids.ndim != 2:
        raise ValueError(f"{where}: the panoptic id map must be H x W, got shape {ids.shape}")
    listed = np.asarray([int(s["id"]) for s in segments_info], dtype=np.int64)
    if len(set(listed.tolist())) != len(listed):
        raise ValueError(f"{where}: segments_info repeats a segment id: {listed.tolist()}")
    index_map = np.zeros(ids.shape, dtype=np.int32)
    if len(listed):
        order = np.argsort(listed)
        pos = np.searchsorted(listed[order], ids).clip(max=len(listed) - 1)  # H x W position in sorted ids
        index_map = np.where(listed[order][pos] == ids, order[pos] + 1, 0).astype(np.int32)
    areas, boxes = _partition_stats(index_map, len(listed))
    segments = []
    for k, seg in enumerate(segments_info):
        c = classes.check(seg["category_id"], f"{where}, segment {seg['id']}")
        isthing = bool(seg["isthing"]) if "isthing" in seg else classes.is_thing[c]
        score = float(seg["score"]) if "score" in seg else None
        segments.append(Segment(int(seg["id"]), c, classes.names[c], int(areas[k]), boxes[k], isthing, score))
    return SegmentLayer("panoptic_seg", index_map, segments)


def semantic_layer(sem_seg: Any, classes: ClassPalette, ignore_label: int = 255, where: str = "sem_seg") -> SegmentLayer:
    """C x H x W class scores (argmax taken) or H x W class ids; one segment per class present."""
    arr = _numpy(sem_seg)
    if arr.ndim == 3:
        if arr.shape[0] != len(classes):
            raise ValueError(f"{where}: {arr.shape[0]} score channels for a dataset of {len(classes)} classes")
        labels = arr.argmax(0)
    elif arr.ndim == 2:
        labels = arr.astype(np.int64)
    else:
        raise ValueError(f"{where}: expected C x H x W scores or H x W labels, got shape {arr.shape}")
    valid = labels != ignore_label
    present = np.unique(labels[valid])
    for c in present:
        classes.check(c, where)
    index_map = np.where(valid, labels + 1, 0).astype(np.int32)  # class c -> index c + 1
    areas, boxes = _partition_stats(index_map, len(classes))
    # the layer lists the present classes only: renumber them 1..n in class order
    lut = np.zeros(len(classes) + 1, dtype=np.int32)
    lut[present + 1] = np.arange(1, len(present) + 1)
    segments = [
        Segment(int(c), int(c), classes.names[c], int(areas[c]), boxes[c], classes.is_thing[c]) for c in present
    ]
    return SegmentLayer("sem_seg", lut[index_map], segments)


def instance_layer(instances: Mapping[str, Any], classes: ClassPalette, score_threshold: float = 0.0,
                   where: str = "instances") -> SegmentLayer:
    """``{"pred_masks" N x H x W, "scores" N, "pred_classes" N}``: instances scoring at least
    ``score_threshold``, in the model's order; larger ones are painted first, so small ones stay visible."""
    masks = _numpy(instances["pred_masks"]).astype(bool)
    scores = _numpy(instances["scores"]).astype(np.float64).reshape(-1)
    labels = _numpy(instances["pred_classes"]).astype(np.int64).reshape(-1)
    if masks.ndim != 3 or not masks.shape[0] == len(scores) == len(labels):
        raise ValueError(f"{where}: pred_masks {masks.shape}, scores {scores.shape} and pred_classes {labels.shape} disagree")
    keep = scores >= score_threshold
    masks, scores, labels = masks[keep], scores[keep], labels[keep]
    areas, boxes = _mask_stats(masks)
    index_map = np.zeros(masks.shape[1:], dtype=np.int32)
    for k in np.argsort(-areas, kind="stable"):
        index_map[masks[k]] = k + 1
    segments = []
    for k in range(len(labels)):
        c = classes.check(labels[k], f"{where}, instance {k}")
        segments.append(Segment(k + 1, c, classes.names[c], int(areas[k]), boxes[k], classes.is_thing[c], float(scores[k])))
    return SegmentLayer("instances", index_map, segments)


def prediction_layers(output: Mapping[str, Any], classes: ClassPalette, score_threshold: float = 0.0,
                      where: str = "output") -> dict[str, SegmentLayer]:
    """Every task an eval output holds, in :data:`TASK_ORDER`."""
    layers: dict[str, SegmentLayer] = {}
    if "panoptic_seg" in output:
        layers["panoptic_seg"] = panoptic_layer(output["panoptic_seg"], classes, f"{where}: panoptic_seg")
    if "instances" in output:
        layers["instances"] = instance_layer(output["instances"], classes, score_threshold, f"{where}: instances")
    if "sem_seg" in output:
        layers["sem_seg"] = semantic_layer(output["sem_seg"], classes, where=f"{where}: sem_seg")
    return layers
