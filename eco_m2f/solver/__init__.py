"""Optimizer, learning-rate schedules and gradient clipping from ``cfg.SOLVER``."""
from __future__ import annotations

from .build import (
    EMBED_PARAM_NAMES,
    NORM_MODULE_TYPES,
    LRMultiplier,
    WarmupPolyLR,
    build_gradient_clipper,
    build_lr_scheduler,
    build_optimizer,
    get_param_groups,
    layer_decay_factor,
    warmup_factor_at_iter,
)

__all__ = [
    "EMBED_PARAM_NAMES",
    "NORM_MODULE_TYPES",
    "LRMultiplier",
    "WarmupPolyLR",
    "build_gradient_clipper",
    "build_lr_scheduler",
    "build_optimizer",
    "get_param_groups",
    "layer_decay_factor",
    "warmup_factor_at_iter",
]
