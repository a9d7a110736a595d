"""Segmenter's mask transformer (Strudel et al. 2021): class embeddings decoded jointly with the patches.

``proj_dec`` projects the patch tokens to the decoder width, K learnable ``cls_emb`` join them,
``NUM_LAYERS`` timm blocks (heads = width / 64, FFN 4x, dropout 0.1) and ``decoder_norm`` mix
both; patches and classes go through ``proj_patch`` / ``proj_classes``, are L2-normalised, and
their products are the masks, normalised over the classes by ``mask_norm``. Parameter names are
the official ones (``decoder.{cls_emb, proj_dec, proj_patch, proj_classes, blocks.i.*,
decoder_norm, mask_norm}``).
"""
from __future__ import annotations

from typing import Any, Dict, Mapping, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import trunc_normal_
from timm.models.vision_transformer import Block

from ..registry import SEM_SEG_HEADS_REGISTRY, ShapeSpec
from .vit_decode_head import ViTDecodeHead

__all__ = ["SegmenterMaskTransformerHead"]


def _init_segmenter_weights(module: nn.Module) -> None:
    """Segmenter's init: truncated normal (0.02) linears with zero bias, unit LayerNorms."""
    if isinstance(module, nn.Linear):
        trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


@SEM_SEG_HEADS_REGISTRY.register()
class SegmenterMaskTransformerHead(ViTDecodeHead):
    """Per-token class logits ``"pred_tokens"`` (B x N x K): the patch-class similarities after ``mask_norm``."""

    input_kind = "tokens"

    def __init__(self, cfg: Any, input_shape: Mapping[str, ShapeSpec], *, auxiliary: bool = False) -> None:
        super().__init__(cfg, auxiliary=auxiliary)
        m = cfg.MODEL.SEM_SEG_HEAD.MASK_TRANSFORMER
        in_dim = int(input_shape["tokens"].channels)
        dim = int(m.HIDDEN_DIM) or in_dim
        heads = int(m.NUM_HEADS) or max(1, dim // 64)
        if heads <= 0 or dim % heads:
            raise ValueError(
                f"MODEL.SEM_SEG_HEAD.MASK_TRANSFORMER: width {dim} is not divisible into {heads} heads "
                "(set HIDDEN_DIM / NUM_HEADS)"
            )
        if int(m.NUM_LAYERS) < 1:
            raise ValueError(f"MODEL.SEM_SEG_HEAD.MASK_TRANSFORMER.NUM_LAYERS must be >= 1, got {m.NUM_LAYERS}")
        k = self.num_classes
        rates = torch.linspace(0, float(m.DROP_PATH_RATE), int(m.NUM_LAYERS)).tolist()
        self.proj_dec = nn.Linear(in_dim, dim)
        self.blocks = nn.ModuleList(
            Block(dim, heads, mlp_ratio=float(m.MLP_RATIO), qkv_bias=True, proj_drop=float(m.DROPOUT),
                  attn_drop=float(m.DROPOUT), drop_path=r, norm_layer=nn.LayerNorm)
            for r in rates
        )
        self.decoder_norm = nn.LayerNorm(dim)
        self.mask_norm = nn.LayerNorm(k)
        self.apply(_init_segmenter_weights)
        scale = dim**-0.5
        self.cls_emb = nn.Parameter(torch.zeros(1, k, dim))
        trunc_normal_(self.cls_emb, std=0.02)
        self.proj_patch = nn.Parameter(scale * torch.randn(dim, dim))
        self.proj_classes = nn.Parameter(scale * torch.randn(dim, dim))

    def forward(self, tokens: torch.Tensor, padding_mask: Optional[torch.Tensor] = None) -> Dict[str, torch.Tensor]:
        """tokens B x N x C (``padding_mask`` B x N, True = empty slot) -> {"pred_tokens": B x N x K}."""
        b, n, _ = tokens.shape
        k = self.num_classes
        x = self.proj_dec(tokens)
        x = torch.cat([x, self.cls_emb.expand(b, -1, -1).to(x.dtype)], dim=1)  # B x (N + K) x D
        attn_mask = None
        if padding_mask is not None:
            keep = torch.cat([~padding_mask, padding_mask.new_ones(b, k)], dim=1)  # B x (N + K)
            attn_mask = keep[:, None, None, :]  # B x 1 x 1 x (N + K): True = may attend
        for block in self.blocks:
            x = block(x, attn_mask=attn_mask)
        x = self.decoder_norm(x)
        patches = F.normalize(x[:, :n] @ self.proj_patch.to(x.dtype), dim=-1)  # B x N x D
        classes = F.normalize(x[:, n:] @ self.proj_classes.to(x.dtype), dim=-1)  # B x K x D
        masks = patches @ classes.transpose(1, 2)  # B x N x K
        return {"pred_tokens": self.mask_norm(masks)}
