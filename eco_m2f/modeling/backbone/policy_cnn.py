"""The small CTS policy network of papers/002 (Table 2; supplementary section 1.1), ``MODEL.POLICY_CNN.*``.

"Seven 3x3 convolutional layers, with 128 output channels per convolution, and a final 1x1
convolution to output a prediction for two classes. Strided convolutions are used to reduce the
resolution by a factor of 32. This network is not pre-trained." The final 1x1 convolution is
the policy's own head (:class:`~..meta_arch.token_sharing_policy.TokenSharingPolicy`); this is
the seven convolutions, as a backbone whose one output ``res5`` has stride 32. The paper says
neither where the strides go nor what follows each convolution: here the first five convolutions
halve the resolution (``STRIDES``), and each convolution is followed by BatchNorm and ReLU.

Why it is here: dense 3x3 convolutions run on the GPU's matrix units, where EfficientNet-Lite0's
depthwise convolutions are bound by memory traffic; inside a token-sharing Segmenter the policy
is a fixed cost per image that the shared tokens must pay back (the README's CTS tables).
"""
from __future__ import annotations

from math import prod
from typing import Sequence

import torch
import torch.nn as nn

from ..registry import BACKBONE_REGISTRY, ShapeSpec
from .base import Backbone

__all__ = ["PolicyCNN", "build_policy_cnn_backbone"]


class ConvBNReLU(nn.Sequential):
    """3x3 convolution (no bias), BatchNorm, ReLU: the children a frozen policy folds
    (:func:`eco_m2f.modeling.policy.inference.fold_batchnorm`)."""

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(out_channels)
        self.act = nn.ReLU(inplace=True)


class PolicyCNN(Backbone):
    """``len(strides)`` :class:`ConvBNReLU` layers of ``channels`` outputs, strides multiplying to 32."""

    def __init__(self, channels: int = 128, strides: Sequence[int] = (2, 2, 2, 2, 2, 1, 1), in_channels: int = 3) -> None:
        super().__init__()
        strides = [int(s) for s in strides]
        if not strides or any(s not in (1, 2) for s in strides) or prod(strides) != 32:
            raise ValueError(f"MODEL.POLICY_CNN.STRIDES {strides}: strides of 1 or 2 whose product is 32 (one cell per 32x32 superpatch)")
        if int(channels) < 1:
            raise ValueError(f"MODEL.POLICY_CNN.CHANNELS must be >= 1, got {channels}")
        self._in_channels = int(in_channels)
        widths = [self._in_channels] + [int(channels)] * len(strides)
        self.layers = nn.Sequential(*(ConvBNReLU(a, b, s) for a, b, s in zip(widths, widths[1:], strides)))
        self._out_features = ["res5"]
        self._out_feature_channels = {"res5": int(channels)}
        self._out_feature_strides = {"res5": 32}
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward_features(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"res5": self.layers(x)}


@BACKBONE_REGISTRY.register()
def build_policy_cnn_backbone(cfg, input_shape: ShapeSpec) -> PolicyCNN:
    """``MODEL.POLICY_CNN.*``; never pre-trained (the paper trains it from scratch)."""
    if cfg.MODEL.BACKBONE.PRETRAINED:
        raise ValueError("MODEL.BACKBONE.PRETRAINED: build_policy_cnn_backbone has no pre-trained weights "
                         "(papers/002 trains the small policy network from scratch); set it to False")
    if cfg.MODEL.BACKBONE.FREEZE_AT:
        raise ValueError("MODEL.BACKBONE.FREEZE_AT is not supported by build_policy_cnn_backbone; set it to 0")
    c = cfg.MODEL.POLICY_CNN
    return PolicyCNN(int(c.CHANNELS), list(c.STRIDES), input_shape.channels or 3)
