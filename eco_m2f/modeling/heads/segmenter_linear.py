"""Segmenter's linear decoder: one ``Linear(C, K)`` per patch token (Strudel et al. 2021).

The parameter is ``head`` (official ``decoder.head.*``).
"""
from __future__ import annotations

from typing import Any, Dict, Mapping, Optional, Sequence, Tuple

import torch
import torch.nn as nn
from timm.layers import trunc_normal_

from ..registry import SEM_SEG_HEADS_REGISTRY, ShapeSpec
from .vit_decode_head import ViTDecodeHead, resize_logits_flops

__all__ = ["SegmenterLinearHead"]


@SEM_SEG_HEADS_REGISTRY.register()
class SegmenterLinearHead(ViTDecodeHead):
    """Per-token class logits ``"pred_tokens"`` (B x N x K)."""

    input_kind = "tokens"

    def __init__(self, cfg: Any, input_shape: Mapping[str, ShapeSpec], *, auxiliary: bool = False) -> None:
        super().__init__(cfg, auxiliary=auxiliary)
        self.head = nn.Linear(input_shape["tokens"].channels, self.num_classes)
        trunc_normal_(self.head.weight, std=0.02)
        nn.init.zeros_(self.head.bias)

    def forward(
        self, tokens: torch.Tensor, padding_mask: Optional[torch.Tensor] = None, lengths: Optional[Sequence[int]] = None
    ) -> Dict[str, torch.Tensor]:
        """tokens B x N x C -> {"pred_tokens": B x N x K} (each token on its own; mask and lengths are not needed)."""
        return {"pred_tokens": self.head(tokens)}

    def flops(self, num_tokens: int, grid: Tuple[int, int], size: Sequence[int]) -> int:
        """One linear layer per token, then the upsampling of the K x h x w logits."""
        patch = self.head.in_features * self.head.out_features * int(num_tokens)
        return patch + resize_logits_flops(self.num_classes, grid, size)
