"""An evaluator that saves pictures of the first predictions of an evaluation run.

With ``TEST.VIS_NUM_IMAGES N`` the first N images of each test dataset are written as
``input | ground truth | prediction`` (with the image's cost record) to
``OUTPUT_DIR/inference/<dataset>/vis/<image>.png``, beside the metrics, by the main process
(which evaluates the first block of the dataset). It computes no metric.
"""
from __future__ import annotations

import logging
import os
from typing import Any, Optional

from ..data.io import write_png
from ..evaluation.evaluator import DatasetEvaluator
from .classes import ClassPalette
from .comparison import comparison_panels
from .panels import render_figure

__all__ = ["VisualizationEvaluator", "build_visualization_evaluator"]

logger = logging.getLogger(__name__)


class VisualizationEvaluator(DatasetEvaluator):
    """Writes ``num_images`` pictures into ``vis_dir``, then ignores the rest of the run."""

    def __init__(self, dataset_name: str, vis_dir: str, num_images: int, *, score_threshold: float = 0.5) -> None:
        from ..data import MetadataCatalog

        if num_images < 1:
            raise ValueError(f"num_images must be at least 1, got {num_images}")
        meta = MetadataCatalog.get(dataset_name)
        self.dataset_name = dataset_name
        self.classes = ClassPalette.from_metadata(meta)
        self.ignore_label = int(meta.get("ignore_label", 255))
        self.vis_dir = vis_dir
        self.num_images = int(num_images)
        self.score_threshold = float(score_threshold)
        self._written: list[str] = []

    def reset(self) -> None:
        self._written = []

    def process(self, inputs: list[dict], outputs: list[dict]) -> None:
        from ..utils import comm

        if not comm.is_main_process():
            return
        for x, out in zip(inputs, outputs):
            if len(self._written) >= self.num_images:
                return
            panels = comparison_panels(x, out, self.classes, score_threshold=self.score_threshold,
                                       ignore_label=self.ignore_label)
            stem = os.path.splitext(os.path.basename(str(x["file_name"])))[0]
            path = os.path.join(self.vis_dir, f"{stem}.png")
            write_png(path, render_figure([panels]).image)
            self._written.append(path)

    def evaluate(self) -> dict:
        if self._written:
            logger.info("Saved %d pictures of %s to %s", len(self._written), self.dataset_name, self.vis_dir)
        return {}


def build_visualization_evaluator(cfg: Any, dataset_name: str,
                                  output_dir: Optional[str] = None) -> Optional[VisualizationEvaluator]:
    """The evaluator for ``TEST.VIS_NUM_IMAGES`` > 0 (pictures in ``output_dir/vis``; ``output_dir``
    defaults to ``OUTPUT_DIR/inference/<dataset>``), or None when the key is 0."""
    num = int(cfg.TEST.VIS_NUM_IMAGES)
    if num <= 0:
        return None
    if output_dir is None:
        output_dir = os.path.join(cfg.OUTPUT_DIR, "inference", dataset_name)
    return VisualizationEvaluator(dataset_name, os.path.join(output_dir, "vis"), num)
