"""Keys of the training engine that Detectron2 does not have."""
from __future__ import annotations

from .config_node import CfgNode as CN


def add_engine_config(cfg: CN) -> None:
    # Mixed precision when SOLVER.AMP.ENABLED: "float16" (with a gradient scaler, as Detectron2's
    # AMP trainer) or "bfloat16" (no scaler). On CPU the engine always uses bfloat16.
    cfg.SOLVER.AMP.PRECISION = "float16"
