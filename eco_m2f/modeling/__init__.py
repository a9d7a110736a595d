"""Models: every component is registered by name and built from the config.

Importing this package registers the builtin backbones, pixel decoders, transformer decoders,
heads and the meta-architectures defined here (``MaskFormer``). Meta-architectures defined
elsewhere in the project (``ECOMaskFormer`` in ``eco_m2f.eco``) register themselves on import;
``eco_m2f.architectures.build_model`` imports all of them and builds any.
"""
from __future__ import annotations

from . import backbone, heads, meta_arch, pixel_decoder, transformer_decoder  # noqa: F401  (registration)
from .backbone import build_backbone
from .meta_arch.base import TASKS, SegmentationModel
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
    "TASKS",
    "TRANSFORMER_DECODER_REGISTRY",
    "SegmentationModel",
    "ShapeSpec",
    "build_backbone",
]
