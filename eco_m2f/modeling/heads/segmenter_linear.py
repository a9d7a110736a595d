"""Segmenter's linear decoder: one ``Linear(C, K)`` per patch token (Strudel et al. 2021).

The parameter is ``head`` (official ``decoder.head.*``).
"""
from __future__ import annotations

from typing import Any, Dict, Mapping, Optional

import torch
import torch.nn as nn
from timm.layers import trunc_normal_

from ..registry import SEM_SEG_HEADS_REGISTRY, ShapeSpec
from .vit_decode_head import ViTDecodeHead

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

    def forward(self, tokens: torch.Tensor, padding_mask: Optional[torch.Tensor] = None) -> Dict[str, torch.Tensor]:
        """tokens B x N x C -> {"pred_tokens": B x N x K} (each token on its own; the mask is not needed)."""
        return {"pred_tokens": self.head(tokens)}
