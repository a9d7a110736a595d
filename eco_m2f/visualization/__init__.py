"""Pictures of segmentation results: drawing, panels, the demo, evaluation and README figures.

Drawing is deterministic (integer blending, PIL's built-in font), so tests check pixels.

* :func:`draw_layer` / :func:`prediction_panel`: a panoptic, instance or semantic result over
  its image, in the dataset's class colours (:class:`ClassPalette`), outlined, with a legend;
* :func:`label_grid_panel`: a small labelled grid (per-stage token maps) at the result's size;
  :func:`token_map_panels`: a token-reduction model's maps over the image (``--show-tokens``);
  :func:`policy_panel`: the CTS policy network's shared superpatches;
* :func:`render_figure`: panels side by side and in rows; :func:`save_picture` writes PNG or JPEG;
* :func:`run_demo`: ``demo/demo.py``; :func:`render_dataset_figure`: ``demo/visualize_dataset.py``;
* :func:`build_visualization_evaluator`: pictures of the first ``TEST.VIS_NUM_IMAGES`` predictions
  of an evaluation.
"""
from __future__ import annotations

from .classes import ClassPalette
from .comparison import comparison_panels
from .cost import ImageGflops, cost_notes, cost_record
from .dataset_figure import render_dataset_figure
from .demo import DemoReport, run_demo
from .drawing import draw_layer, prediction_panel
from .evaluator import VisualizationEvaluator, build_visualization_evaluator
from .ground_truth import ground_truth_layer
from .inference import build_inference_model, dataset_palette
from .inputs import expand_inputs
from .label_grid import GridLabel, label_grid_panel
from .panels import Figure, LegendEntry, Panel, downscaled, render_figure, save_picture
from .policy import policy_panel, policy_record
from .raster import blend, paint_segments
from .token_maps import model_token_maps, token_map_counts, token_map_panels
from .segments import (
    TASK_ORDER,
    Segment,
    SegmentLayer,
    instance_layer,
    panoptic_layer,
    prediction_layers,
    semantic_layer,
)

__all__ = [
    "ClassPalette",
    "DemoReport",
    "ImageGflops",
    "Figure",
    "GridLabel",
    "LegendEntry",
    "Panel",
    "Segment",
    "SegmentLayer",
    "TASK_ORDER",
    "VisualizationEvaluator",
    "blend",
    "build_inference_model",
    "build_visualization_evaluator",
    "comparison_panels",
    "cost_notes",
    "cost_record",
    "dataset_palette",
    "downscaled",
    "draw_layer",
    "expand_inputs",
    "ground_truth_layer",
    "instance_layer",
    "label_grid_panel",
    "model_token_maps",
    "paint_segments",
    "policy_panel",
    "policy_record",
    "panoptic_layer",
    "prediction_layers",
    "prediction_panel",
    "render_dataset_figure",
    "render_figure",
    "run_demo",
    "save_picture",
    "semantic_layer",
    "token_map_counts",
    "token_map_panels",
]
