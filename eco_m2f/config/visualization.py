"""Keys of the pictures the evaluation writes."""
from __future__ import annotations

from .config_node import CfgNode as CN


def add_visualization_config(cfg: CN) -> None:
    # Save the first N predictions of every evaluation as input | ground truth | prediction
    # pictures in OUTPUT_DIR/inference/<dataset>/vis/ (0 = none).
    cfg.TEST.VIS_NUM_IMAGES = 0
