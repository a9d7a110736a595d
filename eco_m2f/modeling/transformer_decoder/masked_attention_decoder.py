"""Mask2Former's masked-attention transformer decoder (``MultiScaleMaskedTransformerDecoder``).

Learnable queries attend, one scale at a time (round robin over the 3 pixel-decoder scales,
lowest resolution first), only to the pixels inside the mask predicted by the previous
layer; then self-attention and an FFN. Every layer, and the learnable queries themselves,
predict class logits and mask logits (deep supervision).
Parameter names are the official ones (``transformer_{self,cross}_attention_layers.N``,
``transformer_ffn_layers.N``, ``decoder_norm``, ``query_feat``, ``query_embed``,
``level_embed``, ``input_proj``, ``class_embed``, ``mask_embed.layers.N``).
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..pixel_decoder.position_encoding import PositionEmbeddingSine
from ..activation import get_activation
from ..registry import TRANSFORMER_DECODER_REGISTRY

__all__ = [
    "CrossAttentionLayer",
    "FFNLayer",
    "MLP",
    "MultiScaleMaskedTransformerDecoder",
    "SelfAttentionLayer",
]



def _activation(name: str):
    return get_activation(name, "decoder activation")


def _with_pos(x: torch.Tensor, pos: Optional[torch.Tensor]) -> torch.Tensor:
    return x if pos is None else x + pos


def masked_multihead_attention(
    mha: nn.MultiheadAttention,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """``mha(query, key, value, attn_mask)[0]`` through ``F.scaled_dot_product_attention``.

    query (L, B, C), key/value (S, B, C), sequence-first as nn.MultiheadAttention; attn_mask
    (B, L, S) bool, True = may not attend, shared by all heads. Passing the mask once per image
    instead of once per head (B*heads, L, S), and not materialising the attention weights that
    nn.MultiheadAttention returns by default, is what makes masked attention at stride 8 cheap.
    Returns (L, B, C).
    """
    l, b, c = query.shape
    heads = mha.num_heads
    w_q, w_k, w_v = mha.in_proj_weight.chunk(3)
    b_q, b_k, b_v = mha.in_proj_bias.chunk(3) if mha.in_proj_bias is not None else (None, None, None)

    def split_heads(x: torch.Tensor) -> torch.Tensor:
        # (T, B, C) -> (B, heads, T, C/heads)
        return x.view(x.shape[0], b, heads, c // heads).permute(1, 2, 0, 3)

    q = split_heads(F.linear(query, w_q, b_q))
    k = split_heads(F.linear(key, w_k, b_k))
    v = split_heads(F.linear(value, w_v, b_v))
    mask = None if attn_mask is None else ~attn_mask[:, None]  # SDPA: True = may attend; (B, 1, L, S)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=mha.dropout if mha.training else 0.0)
    # (B, heads, L, C/heads) -> (L, B, C)
    out = out.permute(2, 0, 1, 3).reshape(l, b, c)
    return mha.out_proj(out)


def _xavier_matrices(module: nn.Module) -> None:
    for p in module.parameters():
        if p.dim() > 1:
            nn.init.xavier_uniform_(p)


class SelfAttentionLayer(nn.Module):
    """Self-attention among the queries; tensors are sequence-first (Q, B, C)."""

    def __init__(self, d_model: int, nhead: int, dropout: float = 0.0, activation: str = "relu", normalize_before: bool = False) -> None:
        super().__init__()
        self.self_attn = nn.MultiheadAttention(d_model, nhead, dropout=dropout)
        self.norm = nn.LayerNorm(d_model)
        self.dropout = nn.Dropout(dropout)
        self.activation = _activation(activation)
        self.normalize_before = normalize_before
        _xavier_matrices(self)

    def forward(
        self,
        tgt: torch.Tensor,
        tgt_mask: Optional[torch.Tensor] = None,
        tgt_key_padding_mask: Optional[torch.Tensor] = None,
        query_pos: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        if self.normalize_before:
            tgt2 = self.norm(tgt)
            q = k = _with_pos(tgt2, query_pos)
            tgt2 = self.self_attn(q, k, value=tgt2, attn_mask=tgt_mask, key_padding_mask=tgt_key_padding_mask)[0]
            return tgt + self.dropout(tgt2)
        q = k = _with_pos(tgt, query_pos)
        tgt2 = self.self_attn(q, k, value=tgt, attn_mask=tgt_mask, key_padding_mask=tgt_key_padding_mask)[0]
        return self.norm(tgt + self.dropout(tgt2))


class CrossAttentionLayer(nn.Module):
    """Queries (Q, B, C) attend to pixel tokens (HW, B, C), optionally masked."""

    def __init__(self, d_model: int, nhead: int, dropout: float = 0.0, activation: str = "relu", normalize_before: bool = False) -> None:
        super().__init__()
        self.multihead_attn = nn.MultiheadAttention(d_model, nhead, dropout=dropout)
        self.norm = nn.LayerNorm(d_model)
        self.dropout = nn.Dropout(dropout)
        self.activation = _activation(activation)
        self.normalize_before = normalize_before
        _xavier_matrices(self)

    def forward(
        self,
        tgt: torch.Tensor,
        memory: torch.Tensor,
        memory_mask: Optional[torch.Tensor] = None,
        memory_key_padding_mask: Optional[torch.Tensor] = None,
        pos: Optional[torch.Tensor] = None,
        query_pos: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """memory_mask: (B, Q, HW) bool shared by all heads, or (B*heads, Q, HW) per head; True = may not attend."""
        x = self.norm(tgt) if self.normalize_before else tgt
        q, k = _with_pos(x, query_pos), _with_pos(memory, pos)
        per_image_mask = memory_mask is not None and memory_mask.shape[0] == tgt.shape[1]
        if memory_key_padding_mask is None and (memory_mask is None or per_image_mask):
            tgt2 = masked_multihead_attention(self.multihead_attn, q, k, memory, memory_mask)
        else:
            tgt2 = self.multihead_attn(
                query=q, key=k, value=memory, attn_mask=memory_mask,
                key_padding_mask=memory_key_padding_mask, need_weights=False,
            )[0]
        if self.normalize_before:
            return tgt + self.dropout(tgt2)
        return self.norm(tgt + self.dropout(tgt2))


class FFNLayer(nn.Module):
    """Two-layer MLP with residual and LayerNorm."""

    def __init__(
        self, d_model: int, dim_feedforward: int = 2048, dropout: float = 0.0, activation: str = "relu", normalize_before: bool = False
    ) -> None:
        super().__init__()
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.dropout = nn.Dropout(dropout)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.norm = nn.LayerNorm(d_model)
        self.activation = _activation(activation)
        self.normalize_before = normalize_before
        _xavier_matrices(self)

    def forward(self, tgt: torch.Tensor) -> torch.Tensor:
        if self.normalize_before:
            tgt2 = self.norm(tgt)
            tgt2 = self.linear2(self.dropout(self.activation(self.linear1(tgt2))))
            return tgt + self.dropout(tgt2)
        tgt2 = self.linear2(self.dropout(self.activation(self.linear1(tgt))))
        return self.norm(tgt + self.dropout(tgt2))


class MLP(nn.Module):
    """Linear layers with ReLU between them (``layers.N``)."""

    def __init__(self, input_dim: int, hidden_dim: int, output_dim: int, num_layers: int) -> None:
        super().__init__()
        self.num_layers = num_layers
        h = [hidden_dim] * (num_layers - 1)
        self.layers = nn.ModuleList(nn.Linear(n, k) for n, k in zip([input_dim] + h, h + [output_dim]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, layer in enumerate(self.layers):
            x = F.relu(layer(x)) if i < self.num_layers - 1 else layer(x)
        return x


@TRANSFORMER_DECODER_REGISTRY.register()
class MultiScaleMaskedTransformerDecoder(nn.Module):
    """Built ``MultiScaleMaskedTransformerDecoder(cfg, in_channels, mask_classification=True)``.

    Config: MODEL.SEM_SEG_HEAD.{NUM_CLASSES, MASK_DIM}, MODEL.MASK_FORMER.{HIDDEN_DIM,
    NUM_OBJECT_QUERIES, NHEADS, DIM_FEEDFORWARD, DEC_LAYERS (layers + 1: the prediction from
    the learnable queries counts), PRE_NORM, ENFORCE_INPUT_PROJ}.
    """

    def __init__(self, cfg, in_channels: int, mask_classification: bool = True) -> None:
        super().__init__()
        mf = cfg.MODEL.MASK_FORMER
        if not mask_classification:
            raise ValueError("MultiScaleMaskedTransformerDecoder only supports mask classification")
        if mf.DEC_LAYERS < 1:
            raise ValueError(f"MODEL.MASK_FORMER.DEC_LAYERS must be >= 1 (it counts the query prediction), got {mf.DEC_LAYERS}")
        hidden_dim = mf.HIDDEN_DIM
        nheads = mf.NHEADS
        if hidden_dim % nheads != 0:
            raise ValueError(f"MODEL.MASK_FORMER.HIDDEN_DIM={hidden_dim} is not divisible by NHEADS={nheads}")
        num_classes = cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES
        mask_dim = cfg.MODEL.SEM_SEG_HEAD.MASK_DIM
        self.mask_classification = mask_classification
        self.num_classes = num_classes

        self.pe_layer = PositionEmbeddingSine(hidden_dim // 2, normalize=True)
        self.num_heads = nheads
        self.num_layers = mf.DEC_LAYERS - 1
        self.transformer_self_attention_layers = nn.ModuleList()
        self.transformer_cross_attention_layers = nn.ModuleList()
        self.transformer_ffn_layers = nn.ModuleList()
        for _ in range(self.num_layers):
            self.transformer_self_attention_layers.append(
                SelfAttentionLayer(d_model=hidden_dim, nhead=nheads, dropout=0.0, normalize_before=mf.PRE_NORM)
            )
            self.transformer_cross_attention_layers.append(
                CrossAttentionLayer(d_model=hidden_dim, nhead=nheads, dropout=0.0, normalize_before=mf.PRE_NORM)
            )
            self.transformer_ffn_layers.append(
                FFNLayer(d_model=hidden_dim, dim_feedforward=mf.DIM_FEEDFORWARD, dropout=0.0, normalize_before=mf.PRE_NORM)
            )
        self.decoder_norm = nn.LayerNorm(hidden_dim)

        self.num_queries = mf.NUM_OBJECT_QUERIES
        self.query_feat = nn.Embedding(self.num_queries, hidden_dim)  # learnable query features
        self.query_embed = nn.Embedding(self.num_queries, hidden_dim)  # learnable query positions

        self.num_feature_levels = 3
        self.level_embed = nn.Embedding(self.num_feature_levels, hidden_dim)
        self.input_proj = nn.ModuleList()
        for _ in range(self.num_feature_levels):
            if in_channels != hidden_dim or mf.ENFORCE_INPUT_PROJ:
                proj = nn.Conv2d(in_channels, hidden_dim, kernel_size=1)
                nn.init.kaiming_uniform_(proj.weight, a=1)  # Detectron2's c2_xavier_fill
                nn.init.constant_(proj.bias, 0)
                self.input_proj.append(proj)
            else:
                self.input_proj.append(nn.Sequential())

        self.class_embed = nn.Linear(hidden_dim, num_classes + 1)
        self.mask_embed = MLP(hidden_dim, hidden_dim, mask_dim, 3)

    def forward(
        self, x: Sequence[torch.Tensor], mask_features: torch.Tensor, mask: Optional[torch.Tensor] = None
    ) -> Dict[str, Any]:
        """x: 3 maps (B, C, H_l, W_l) low -> high resolution; mask_features (B, MASK_DIM, H/4, W/4).

        Returns {"pred_logits": (B, Q, K+1), "pred_masks": (B, Q, H/4, W/4), "aux_outputs": [...]}
        where aux_outputs holds the DEC_LAYERS-1 earlier predictions, first to last.
        ``mask`` is accepted for the official signature and unused.
        """
        if len(x) != self.num_feature_levels:
            raise ValueError(f"decoder expects {self.num_feature_levels} feature maps, got {len(x)}")
        src, pos, size_list = [], [], []
        for i in range(self.num_feature_levels):
            size_list.append(x[i].shape[-2:])
            # (B, C, H, W) -> (B, C, HW) -> (HW, B, C)
            pos.append(self.pe_layer(x[i], None).flatten(2).permute(2, 0, 1))
            src.append((self.input_proj[i](x[i]).flatten(2) + self.level_embed.weight[i][None, :, None]).permute(2, 0, 1))
        bs = src[0].shape[1]

        # (Q, B, C)
        query_embed = self.query_embed.weight.unsqueeze(1).repeat(1, bs, 1)
        output = self.query_feat.weight.unsqueeze(1).repeat(1, bs, 1)

        if torch.is_autocast_enabled(mask_features.device.type):
            # every prediction head would cast it for its einsum; do it once
            mask_features = mask_features.to(torch.get_autocast_dtype(mask_features.device.type))

        predictions_class: List[torch.Tensor] = []
        predictions_mask: List[torch.Tensor] = []
        outputs_class, outputs_mask, attn_mask = self.forward_prediction_heads(
            output, mask_features, size_list[0], with_attn_mask=self.num_layers > 0
        )
        predictions_class.append(outputs_class)
        predictions_mask.append(outputs_mask)

        for i in range(self.num_layers):
            level_index = i % self.num_feature_levels
            # a query whose mask is empty at this scale attends everywhere instead of nowhere
            attn_mask = attn_mask & ~attn_mask.all(-1, keepdim=True)
            output = self.transformer_cross_attention_layers[i](
                output, src[level_index], memory_mask=attn_mask, memory_key_padding_mask=None,
                pos=pos[level_index], query_pos=query_embed,
            )
            output = self.transformer_self_attention_layers[i](
                output, tgt_mask=None, tgt_key_padding_mask=None, query_pos=query_embed
            )
            output = self.transformer_ffn_layers[i](output)
            outputs_class, outputs_mask, attn_mask = self.forward_prediction_heads(
                output, mask_features, size_list[(i + 1) % self.num_feature_levels], with_attn_mask=i + 1 < self.num_layers
            )
            predictions_class.append(outputs_class)
            predictions_mask.append(outputs_mask)

        return {
            "pred_logits": predictions_class[-1],
            "pred_masks": predictions_mask[-1],
            "aux_outputs": self._set_aux_loss(predictions_class, predictions_mask),
        }

    def forward_prediction_heads(
        self,
        output: torch.Tensor,
        mask_features: torch.Tensor,
        attn_mask_target_size: Tuple[int, int],
        with_attn_mask: bool = True,
    ) -> Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
        """Class logits (B, Q, K+1), mask logits (B, Q, H, W) and the next layer's attention mask.

        The mask is (B, Q, h*w) bool, True = masked out, shared by all heads (the official code
        repeats it per head); None when ``with_attn_mask`` is False (after the last layer).
        """
        decoder_output = self.decoder_norm(output).transpose(0, 1)  # (B, Q, C)
        outputs_class = self.class_embed(decoder_output)
        mask_embed = self.mask_embed(decoder_output)
        outputs_mask = torch.einsum("bqc,bchw->bqhw", mask_embed, mask_features)
        if not with_attn_mask:
            return outputs_class, outputs_mask, None
        # the mask is predicted at stride 4 and resized to the scale the next layer attends to;
        # (B, Q, h, w) -> (B, Q, hw)
        attn_mask = F.interpolate(outputs_mask, size=attn_mask_target_size, mode="bilinear", align_corners=False)
        attn_mask = attn_mask.sigmoid().flatten(2) < 0.5
        return outputs_class, outputs_mask, attn_mask.detach()

    @torch.jit.unused
    def _set_aux_loss(self, outputs_class: List[torch.Tensor], outputs_seg_masks: List[torch.Tensor]) -> List[Dict[str, torch.Tensor]]:
        return [{"pred_logits": a, "pred_masks": b} for a, b in zip(outputs_class[:-1], outputs_seg_masks[:-1])]
