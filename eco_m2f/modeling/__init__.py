"""Models: every component is registered by name and built from the config."""
from __future__ import annotations

import torch.nn as nn

from .registry import (
    BACKBONE_REGISTRY,
    META_ARCH_REGISTRY,
    PIXEL_DECODER_REGISTRY,
    SEM_SEG_HEADS_REGISTRY,
    TRANSFORMER_DECODER_REGISTRY,
    ShapeSpec,
)

__all__ = [
    "BACKBONE_REGISTRY",
    "META_ARCH_REGISTRY",
    "PIXEL_DECODER_REGISTRY",
    "SEM_SEG_HEADS_REGISTRY",
    "TRANSFORMER_DECODER_REGISTRY",
    "ShapeSpec",
    "build_model",
    "build_backbone",
]


def _register_builtin() -> None:
    """Import the modules whose import registers the builtin components."""
    from . import backbone, meta_arch, pixel_decoder, transformer_decoder  # noqa: F401
    from . import heads  # noqa: F401


def build_backbone(cfg, input_shape: ShapeSpec | None = None) -> nn.Module:
    """Build ``MODEL.BACKBONE.NAME`` from the registry."""
    _register_builtin()
    if input_shape is None:
        input_shape = ShapeSpec(channels=len(cfg.MODEL.PIXEL_MEAN))
    return BACKBONE_REGISTRY.get(cfg.MODEL.BACKBONE.NAME)(cfg, input_shape)


def build_model(cfg) -> nn.Module:
    """Build whatever ``MODEL.META_ARCHITECTURE`` names (on ``MODEL.DEVICE`` if available)."""
    _register_builtin()
    name = cfg.MODEL.META_ARCHITECTURE
    try:
        builder = META_ARCH_REGISTRY.get(name)
    except KeyError as exc:
        known = sorted(name for name, _ in META_ARCH_REGISTRY)
        raise KeyError(f"MODEL.META_ARCHITECTURE '{name}' is not registered; known: {known}") from exc
    return builder(cfg)
