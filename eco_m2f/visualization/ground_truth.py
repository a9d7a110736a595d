"""The ground truth of a dataset dict as a segment layer, read from the files it names.

Panoptic datasets give ``pan_seg_file_name`` + ``segments_info`` (contiguous category ids,
as the loaders convert them); semantic ones ``sem_seg_file_name`` (contiguous ids, the
dataset's ignore label elsewhere). The test mapper keeps these keys, so the same dicts that
feed the model feed the drawing.
"""
from __future__ import annotations

from typing import Any, Mapping, Optional

from ..data.io import read_png_ids
from .classes import ClassPalette
from .segments import SegmentLayer, panoptic_layer, semantic_layer

__all__ = ["ground_truth_layer"]


def ground_truth_layer(dataset_dict: Mapping[str, Any], classes: ClassPalette,
                       ignore_label: int = 255) -> Optional[SegmentLayer]:
    """Panoptic ground truth if the dict has it, else semantic, else None."""
    pan_file = dataset_dict.get("pan_seg_file_name")
    if pan_file and "segments_info" in dataset_dict:
        ids = read_png_ids(pan_file, expect="rgb")
        return panoptic_layer((ids, dataset_dict["segments_info"]), classes, where=f"ground truth {pan_file}")
    sem_file = dataset_dict.get("sem_seg_file_name")
    if sem_file:
        labels = read_png_ids(sem_file, expect="single")
        return semantic_layer(labels, classes, ignore_label, where=f"ground truth {sem_file}")
    return None
