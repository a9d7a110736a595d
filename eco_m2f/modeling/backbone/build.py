"""``build_backbone(cfg)``: the backbone ``MODEL.BACKBONE.NAME`` names, from the registry."""
from __future__ import annotations

from typing import Optional

from ..registry import BACKBONE_REGISTRY, ShapeSpec, lookup
from . import resnet as _resnet  # noqa: F401  (registers build_resnet_backbone)
from . import swin as _swin  # noqa: F401  (registers D2SwinTransformer)
from .base import Backbone

__all__ = ["build_backbone"]


def build_backbone(cfg, input_shape: Optional[ShapeSpec] = None) -> Backbone:
    """Build ``MODEL.BACKBONE.NAME`` (input channels from ``MODEL.PIXEL_MEAN`` unless given)."""
    if input_shape is None:
        input_shape = ShapeSpec(channels=len(cfg.MODEL.PIXEL_MEAN))
    return lookup(BACKBONE_REGISTRY, cfg.MODEL.BACKBONE.NAME, "MODEL.BACKBONE.NAME")(cfg, input_shape)
