"""Backbones on timm, registered under Detectron2/Mask2Former's names.

Importing this package registers ``build_resnet_backbone`` and ``D2SwinTransformer`` in
``BACKBONE_REGISTRY``.
"""
from __future__ import annotations

from . import key_maps
from .base import Backbone, pad_to_multiple
from .build import build_backbone
from .resnet import ResNetBackbone, build_resnet_backbone, convert_frozen_batchnorm
from .swin import D2SwinTransformer, SwinBackbone

__all__ = [
    "Backbone",
    "D2SwinTransformer",
    "ResNetBackbone",
    "SwinBackbone",
    "build_backbone",
    "build_resnet_backbone",
    "convert_frozen_batchnorm",
    "key_maps",
    "pad_to_multiple",
]
