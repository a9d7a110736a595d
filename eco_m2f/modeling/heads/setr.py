"""SETR's decoders on a ViT's patch grid (Zheng et al. 2021): naive and progressive upsampling (PUP).

Both normalise the tokens with a LayerNorm, then run ``num_convs`` x (conv ``kernel_size`` to
``channels`` + BatchNorm + ReLU + bilinear x ``up_scale``) and a 1x1 classifier; the logits are
upsampled to the image by the meta-architecture. Naive is one 1x1 conv without upsampling (a
1x1 conv commutes with bilinear upsampling, so where it upsamples makes no difference); PUP's
depth, kernel, width and scale come from ``MODEL.SEM_SEG_HEAD.SETR.*`` (SETR: 4 convs 3x3 of 256,
x2 each; PAUMER's ViT-Ti variant: 192 channels, 2 convs, x4 each). Auxiliary heads of both
kinds use ``AUX_NUM_CONVS`` convs with x ``AUX_UP_SCALE`` each (SETR: 2, x4).
"""
from __future__ import annotations

from typing import Any, Dict, Mapping

import torch
import torch.nn as nn

from ..registry import SEM_SEG_HEADS_REGISTRY, ShapeSpec
from .vit_decode_head import ViTDecodeHead

__all__ = ["SETRNaiveHead", "SETRPUPHead", "SETRUpHead"]


class SETRUpHead(ViTDecodeHead):
    """LayerNorm -> ``num_convs`` x (conv, BN, ReLU, upsample) -> dropout -> 1x1 classifier: ``"pred_maps"``."""

    input_kind = "grid"

    def __init__(
        self, cfg: Any, input_shape: Mapping[str, ShapeSpec], *, num_convs: int, kernel_size: int, up_scale: int,
        auxiliary: bool = False,
    ) -> None:
        super().__init__(cfg, auxiliary=auxiliary)
        s = cfg.MODEL.SEM_SEG_HEAD.SETR
        in_channels = int(input_shape["tokens"].channels)
        channels = int(s.CHANNELS)
        if num_convs < 1 or kernel_size < 1 or kernel_size % 2 == 0 or up_scale < 1 or channels < 1:
            raise ValueError(
                f"MODEL.SEM_SEG_HEAD.SETR: need >= 1 conv of odd kernel size, up-scale >= 1 and CHANNELS >= 1; got "
                f"{num_convs} convs, kernel {kernel_size}, up-scale {up_scale}, CHANNELS {channels}"
            )
        self.norm = nn.LayerNorm(in_channels, eps=float(s.LN_EPS))
        layers = []
        for i in range(num_convs):
            layers += [
                nn.Conv2d(in_channels if i == 0 else channels, channels, kernel_size, padding=kernel_size // 2, bias=False),
                nn.BatchNorm2d(channels),
                nn.ReLU(inplace=True),
            ]
            if up_scale > 1:
                layers.append(nn.Upsample(scale_factor=up_scale, mode="bilinear", align_corners=False))
        self.up_convs = nn.Sequential(*layers)
        self.dropout = nn.Dropout2d(float(s.DROPOUT))
        self.conv_seg = nn.Conv2d(channels, self.num_classes, 1)

    def forward(self, maps: torch.Tensor) -> Dict[str, torch.Tensor]:
        """maps B x C x h x w -> {"pred_maps": B x K x (h * up^n) x (w * up^n)} class logits."""
        x = self.norm(maps.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)  # LayerNorm over channels
        return {"pred_maps": self.conv_seg(self.dropout(self.up_convs(x)))}


@SEM_SEG_HEADS_REGISTRY.register()
class SETRNaiveHead(SETRUpHead):
    """SETR-Naive: LayerNorm, 1x1 conv to ``SETR.CHANNELS``, BN, ReLU, 1x1 classifier
    (auxiliary: ``SETR.AUX_NUM_CONVS`` 1x1 convs, x ``AUX_UP_SCALE`` each, as SETR's)."""

    def __init__(self, cfg: Any, input_shape: Mapping[str, ShapeSpec], *, auxiliary: bool = False) -> None:
        s = cfg.MODEL.SEM_SEG_HEAD.SETR
        super().__init__(
            cfg, input_shape, auxiliary=auxiliary, kernel_size=1,
            num_convs=int(s.AUX_NUM_CONVS) if auxiliary else 1, up_scale=int(s.AUX_UP_SCALE) if auxiliary else 1,
        )


@SEM_SEG_HEADS_REGISTRY.register()
class SETRPUPHead(SETRUpHead):
    """SETR-PUP: ``SETR.NUM_CONVS`` x (conv ``KERNEL_SIZE``, BN, ReLU, x ``UP_SCALE``) (auxiliary: the AUX_ values)."""

    def __init__(self, cfg: Any, input_shape: Mapping[str, ShapeSpec], *, auxiliary: bool = False) -> None:
        s = cfg.MODEL.SEM_SEG_HEAD.SETR
        super().__init__(
            cfg, input_shape, auxiliary=auxiliary, kernel_size=int(s.KERNEL_SIZE),
            num_convs=int(s.AUX_NUM_CONVS if auxiliary else s.NUM_CONVS),
            up_scale=int(s.AUX_UP_SCALE if auxiliary else s.UP_SCALE),
        )
