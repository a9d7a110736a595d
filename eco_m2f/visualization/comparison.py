"""Input | ground truth | prediction of one dataset image: the panels of the evaluation's
pictures and of the README's figure."""
from __future__ import annotations

from typing import Any, Mapping

from ..data.io import read_image
from .classes import ClassPalette
from .cost import cost_record
from .drawing import DEFAULT_ALPHA, draw_layer, prediction_panel
from .ground_truth import ground_truth_layer
from .panels import Panel
from .segments import prediction_layers

__all__ = ["comparison_panels"]


def comparison_panels(dataset_dict: Mapping[str, Any], output: Mapping[str, Any], classes: ClassPalette, *,
                      score_threshold: float = 0.5, ignore_label: int = 255,
                      alpha: float = DEFAULT_ALPHA) -> list[Panel]:
    """Three panels for a mapped dataset dict (``file_name`` and its ground-truth keys) and the
    model's output for it; the prediction panel notes the output's cost record."""
    file_name = dataset_dict.get("file_name")
    if not file_name:
        raise KeyError(f"the dataset dict has no 'file_name' to draw (keys: {sorted(dataset_dict)})")
    image = read_image(file_name, "RGB")
    gt = ground_truth_layer(dataset_dict, classes, ignore_label)
    if gt is None:
        gt_panel = Panel(image, "ground truth", ["(none in the dataset dict)"])
    else:
        gt_panel = draw_layer(image, gt, classes, title="ground truth", alpha=alpha)
    layers = prediction_layers(output, classes, score_threshold, where=str(file_name))
    pred = prediction_panel(image, layers, classes, cost=cost_record(output), alpha=alpha)
    return [Panel(image, "input"), gt_panel, pred]
