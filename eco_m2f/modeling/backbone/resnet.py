"""Detectron2's ResNet (``MODEL.RESNETS.*``) on timm's ResNet modules.

Detectron2's ResNet and timm's (= torchvision's) ResNet are the same network: a 7x7 stride-2
stem conv + norm + ReLU + 3x3 stride-2 max pool, then four stages of bottleneck (or basic)
blocks with a 1x1 projection shortcut in the first block of each stage. Differences that the
config can ask for are applied to the timm modules after construction:

* ``STRIDE_IN_1X1 True`` (MSRA/caffe weights): the stride of the first block of res3..res5
  moves from the 3x3 conv to the first 1x1 conv. ``False`` (torchvision weights, Mask2Former's
  configs) is timm's layout.
* ``RES5_DILATION 2``: res5 keeps stride 16 and *every* res5 block's 3x3 conv is dilated by 2
  (timm would leave the first block undilated).
* ``NORM``: ``FrozenBN`` -> ``torchvision.ops.FrozenBatchNorm2d`` (statistics and affine are
  buffers: no trainable parameters), ``BN``/``SyncBN`` -> ``nn.BatchNorm2d`` (the trainer
  converts it to SyncBatchNorm under DDP), ``GN`` -> ``GroupNorm(32, C)``.
* ``FREEZE_AT k``: stem (k >= 1) and res2..res{k} (k >= 2) get ``requires_grad=False`` and their
  BatchNorms become FrozenBatchNorm, as Detectron2 does.

Module names are timm's/torchvision's (``conv1``, ``bn1``, ``layer1.0.conv1``,
``layer1.0.downsample.0`` ...): torchvision/timm ImageNet weights load as they are and
Detectron2 names are mapped by :mod:`.key_maps`. Only the stages up to the last requested
output are built (as Detectron2 does).
"""
from __future__ import annotations

import logging
from typing import Callable, Mapping, Sequence

import timm
import torch
import torch.nn as nn
from torchvision.ops import FrozenBatchNorm2d

from ..registry import BACKBONE_REGISTRY, ShapeSpec
from .base import Backbone, load_timm_pretrained
from .key_maps import map_resnet_state_dict

__all__ = ["ResNetBackbone", "build_resnet_backbone", "convert_frozen_batchnorm", "get_resnet_norm"]

logger = logging.getLogger(__name__)

_STAGES = ("res2", "res3", "res4", "res5")
_SUPPORTED_DEPTHS = (18, 34, 50, 101, 152)


def _frozen_bn(num_features: int, device=None, dtype=None) -> nn.Module:
    """FrozenBatchNorm2d with timm's ``norm_layer(C, device=, dtype=)`` signature."""
    return FrozenBatchNorm2d(num_features, eps=1e-5)


def _group_norm(num_channels: int, device=None, dtype=None) -> nn.Module:
    return nn.GroupNorm(32, num_channels, device=device, dtype=dtype)


def get_resnet_norm(norm: str) -> Callable[..., nn.Module]:
    """``MODEL.RESNETS.NORM`` -> a norm-layer factory ``f(channels)``."""
    table: dict[str, Callable[..., nn.Module]] = {
        "FrozenBN": _frozen_bn,
        "BN": nn.BatchNorm2d,
        "SyncBN": nn.BatchNorm2d,
        "GN": _group_norm,
    }
    if norm not in table:
        raise ValueError(f"MODEL.RESNETS.NORM '{norm}' is not supported; choose one of {sorted(table)}")
    return table[norm]


def convert_frozen_batchnorm(module: nn.Module) -> nn.Module:
    """Replace every BatchNorm2d/SyncBatchNorm inside ``module`` by a FrozenBatchNorm2d (same stats)."""
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        frozen = FrozenBatchNorm2d(module.num_features, eps=module.eps)
        if module.affine:
            frozen.weight.copy_(module.weight.detach())
            frozen.bias.copy_(module.bias.detach())
        if module.track_running_stats:
            frozen.running_mean.copy_(module.running_mean)
            frozen.running_var.copy_(module.running_var)
        return frozen.to(module.running_mean.device if module.running_mean is not None else "cpu")
    for name, child in module.named_children():
        new_child = convert_frozen_batchnorm(child)
        if new_child is not child:
            setattr(module, name, new_child)
    return module


class ResNetBackbone(Backbone):
    """ResNet-18/34/50/101/152 (and ResNeXt via ``num_groups``) with Detectron2's outputs.

    Outputs (bottleneck depths): ``stem`` (stride 4, 64 ch), ``res2`` 4/256, ``res3`` 8/512,
    ``res4`` 16/1024, ``res5`` 32/2048 (16 with ``res5_dilation=2``); basic-block depths
    (18/34) have 64/128/256/512 channels.
    """

    def __init__(
        self,
        depth: int = 50,
        norm: str = "FrozenBN",
        out_features: Sequence[str] = _STAGES,
        stride_in_1x1: bool = False,
        res5_dilation: int = 1,
        num_groups: int = 1,
        width_per_group: int = 64,
        freeze_at: int = 0,
        in_channels: int = 3,
    ) -> None:
        super().__init__()
        if depth not in _SUPPORTED_DEPTHS:
            raise ValueError(f"MODEL.RESNETS.DEPTH {depth} is not supported; choose one of {_SUPPORTED_DEPTHS}")
        if res5_dilation not in (1, 2):
            raise ValueError(f"MODEL.RESNETS.RES5_DILATION must be 1 or 2, got {res5_dilation}")
        unknown = [f for f in out_features if f not in ("stem",) + _STAGES]
        if unknown or not out_features:
            raise ValueError(
                f"MODEL.RESNETS.OUT_FEATURES {list(out_features)}: unknown {unknown}; use 'stem', {list(_STAGES)}"
            )
        bottleneck = depth >= 50
        if not bottleneck and (num_groups != 1 or width_per_group != 64):
            raise ValueError("ResNet-18/34 use basic blocks: NUM_GROUPS must be 1 and WIDTH_PER_GROUP 64")
        if not bottleneck and res5_dilation != 1:
            raise ValueError("RES5_DILATION 2 needs bottleneck blocks (DEPTH >= 50)")

        self.depth = depth
        self.norm_name = norm
        self._in_channels = in_channels
        self._timm_name = f"resnet{depth}"
        net = timm.create_model(
            self._timm_name,
            pretrained=False,
            num_classes=0,
            global_pool="",
            in_chans=in_channels,
            norm_layer=get_resnet_norm(norm),
            cardinality=num_groups,
            base_width=width_per_group,
            output_stride=16 if res5_dilation == 2 else 32,
            zero_init_last=False,
        )
        num_stages = max({"stem": 0, "res2": 1, "res3": 2, "res4": 3, "res5": 4}[f] for f in out_features)
        # Module names stay timm's/torchvision's so that their weights load unchanged.
        self.conv1 = net.conv1
        self.bn1 = net.bn1
        self.act1 = net.act1
        self.maxpool = net.maxpool
        self.stage_names = list(_STAGES[:num_stages])
        for idx in range(num_stages):
            self.add_module(f"layer{idx + 1}", getattr(net, f"layer{idx + 1}"))
        del net

        if bottleneck and stride_in_1x1:
            for idx in range(1, num_stages):
                block = getattr(self, f"layer{idx + 1}")[0]
                stride = block.conv2.stride
                block.conv1.stride, block.conv2.stride = stride, (1, 1)
        if res5_dilation == 2 and num_stages == 4:
            for block in self.layer4:
                block.conv2.dilation = (2, 2)
                block.conv2.padding = (2, 2)

        stem_channels = self.conv1.out_channels
        stage_channels = [256, 512, 1024, 2048] if bottleneck else [64, 128, 256, 512]
        strides = [4, 8, 16, 16 if res5_dilation == 2 else 32]
        self._out_features = list(out_features)
        self._out_feature_channels = {"stem": stem_channels, **dict(zip(_STAGES, stage_channels))}
        self._out_feature_strides = {"stem": 4, **dict(zip(_STAGES, strides))}
        self._out_feature_channels = {k: self._out_feature_channels[k] for k in self._out_features}
        self._out_feature_strides = {k: self._out_feature_strides[k] for k in self._out_features}

        self._resnext = num_groups != 1 or width_per_group != 64
        self.freeze(freeze_at)

    def load_pretrained(self) -> "ResNetBackbone":
        """torchvision's ImageNet weights through timm (``MODEL.BACKBONE.PRETRAINED``, read by the builder)."""
        if self._resnext:
            raise ValueError(
                "MODEL.BACKBONE.PRETRAINED: timm has no torchvision ImageNet weights for this ResNeXt; "
                "set MODEL.WEIGHTS to a checkpoint instead"
            )
        load_timm_pretrained(self, f"resnet{self.depth}.tv_in1k")
        return self

    def freeze(self, freeze_at: int = 0) -> "ResNetBackbone":
        """Detectron2's FREEZE_AT: 0 nothing, 1 stem, 2 stem+res2, ... 5 everything.

        Frozen parts get ``requires_grad=False`` and their BatchNorms become FrozenBatchNorm2d.
        """
        if freeze_at < 0 or freeze_at > 5:
            raise ValueError(f"MODEL.BACKBONE.FREEZE_AT must be in 0..5, got {freeze_at}")
        parts: list[nn.Module] = []
        if freeze_at >= 1:
            self.bn1 = convert_frozen_batchnorm(self.bn1)
            parts += [self.conv1, self.bn1]
        for idx in range(len(self.stage_names)):
            if freeze_at >= idx + 2:
                name = f"layer{idx + 1}"
                setattr(self, name, convert_frozen_batchnorm(getattr(self, name)))
                parts.append(getattr(self, name))
        for part in parts:
            for p in part.parameters():
                p.requires_grad_(False)
        return self

    def forward_features(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        outputs: dict[str, torch.Tensor] = {}
        x = self.maxpool(self.act1(self.bn1(self.conv1(x))))  # B x 64 x H/4 x W/4
        if "stem" in self._out_features:
            outputs["stem"] = x
        for idx, name in enumerate(self.stage_names):
            x = getattr(self, f"layer{idx + 1}")(x)
            if name in self._out_features:
                outputs[name] = x
        return outputs

    def checkpoint_key_map(self, state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Detectron2 / torchvision / timm ResNet names -> ours (see :mod:`.key_maps`)."""
        return map_resnet_state_dict(state_dict)


@BACKBONE_REGISTRY.register()
def build_resnet_backbone(cfg, input_shape: ShapeSpec) -> ResNetBackbone:
    """Detectron2's registered ResNet builder, reading ``MODEL.RESNETS.*`` and ``MODEL.BACKBONE.*``."""
    r = cfg.MODEL.RESNETS
    if r.STEM_TYPE != "basic":
        raise ValueError(
            f"MODEL.RESNETS.STEM_TYPE '{r.STEM_TYPE}' is not supported (only 'basic'; 'deeplab' is the default of "
            "add_deeplab_config, which Mask2Former's configs override with 'basic')"
        )
    if list(r.RES5_MULTI_GRID) != [1, 1, 1]:
        raise ValueError(
            f"MODEL.RESNETS.RES5_MULTI_GRID {list(r.RES5_MULTI_GRID)} is not supported (only [1, 1, 1], as "
            "Mask2Former's configs set it; [1, 2, 4] is add_deeplab_config's default)"
        )
    if r.RES4_DILATION != 1:
        raise ValueError(f"MODEL.RESNETS.RES4_DILATION {r.RES4_DILATION} is not supported (only 1)")
    if r.STEM_OUT_CHANNELS != 64:
        raise ValueError(f"MODEL.RESNETS.STEM_OUT_CHANNELS must be 64 (timm's ResNet), got {r.STEM_OUT_CHANNELS}")
    expected_res2 = 256 if r.DEPTH >= 50 else 64
    if r.RES2_OUT_CHANNELS != expected_res2:
        raise ValueError(
            f"MODEL.RESNETS.RES2_OUT_CHANNELS must be {expected_res2} for DEPTH {r.DEPTH}, got {r.RES2_OUT_CHANNELS}"
        )
    if any(r.DEFORM_ON_PER_STAGE):
        raise ValueError("MODEL.RESNETS.DEFORM_ON_PER_STAGE: deformable convolutions are not supported")
    backbone = ResNetBackbone(
        depth=r.DEPTH,
        norm=r.NORM,
        out_features=list(r.OUT_FEATURES),
        stride_in_1x1=r.STRIDE_IN_1X1,
        res5_dilation=r.RES5_DILATION,
        num_groups=r.NUM_GROUPS,
        width_per_group=r.WIDTH_PER_GROUP,
        freeze_at=cfg.MODEL.BACKBONE.FREEZE_AT,
        in_channels=input_shape.channels or 3,
    )
    return backbone.load_pretrained() if cfg.MODEL.BACKBONE.PRETRAINED else backbone
