"""Backbones on timm, registered under Detectron2/Mask2Former's names.

Importing this package registers ``build_resnet_backbone``, ``D2SwinTransformer``,
``build_vit_backbone``, ``build_efficientnet_backbone`` and ``build_policy_cnn_backbone`` in
``BACKBONE_REGISTRY``.
"""
from __future__ import annotations

from . import key_maps
from .base import Backbone, pad_to_multiple
from .build import build_backbone
from .efficientnet import EfficientNetBackbone, build_efficientnet_backbone
from .policy_cnn import PolicyCNN, build_policy_cnn_backbone
from .resnet import ResNetBackbone, build_resnet_backbone, convert_frozen_batchnorm
from .swin import D2SwinTransformer, SwinBackbone
from .vit import ViTBackbone, ViTFeatures, build_vit_backbone

__all__ = [
    "Backbone",
    "D2SwinTransformer",
    "EfficientNetBackbone",
    "PolicyCNN",
    "ResNetBackbone",
    "SwinBackbone",
    "build_backbone",
    "ViTBackbone",
    "ViTFeatures",
    "build_efficientnet_backbone",
    "build_policy_cnn_backbone",
    "build_resnet_backbone",
    "build_vit_backbone",
    "convert_frozen_batchnorm",
    "key_maps",
    "pad_to_multiple",
]
