"""SegViT's attention-to-mask (ATM) decoder (Zhang et al. 2022), the base of DToP and STEP.

One learnable query per class (query k is class k: no Hungarian matching). The ViT features of
several layers (``MODEL.VIT.OUT_INDICES``) each go through ``Linear`` + ``LayerNorm``; then, deepest
level first, a small stack of post-norm decoder layers per level: self-attention among the
queries, cross-attention to the level's tokens, FFN. The mask of a level is the last layer's
cross-attention logits (scaled, before softmax) averaged over the heads; the masks of the levels
are summed, level after level. A class head ``Linear(dim, K + 1)`` scores every level's queries
(the last class is "no object"). Inference: softmax(class)[:-1] x sigmoid(mask), summed over
the queries. Every level is supervised (see :mod:`.atm_loss`).
"""
from __future__ import annotations

from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import Mlp, trunc_normal_
from timm.models.vision_transformer import Attention

from ..registry import SEM_SEG_HEADS_REGISTRY, ShapeSpec
from .atm_loss import ATMLoss
from .vit_decode_head import ViTDecodeHead, resize_logits, resize_logits_flops, tokens_to_map

__all__ = ["ATMHead", "ATMDecoderLayer", "MaskCrossAttention"]


class MaskCrossAttention(nn.Module):
    """Multi-head cross-attention that also returns its head-averaged pre-softmax logits (the mask)."""

    def __init__(self, dim: int, num_heads: int, attn_drop: float = 0.0) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"MODEL.SEM_SEG_HEAD.ATM: HIDDEN_DIM {dim} is not divisible by NUM_HEADS {num_heads}")
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        return x.view(b, n, self.num_heads, c // self.num_heads).transpose(1, 2)  # B x h x n x d

    def forward(
        self, queries: torch.Tensor, memory: torch.Tensor, padding_mask: Optional[torch.Tensor] = None
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """queries B x Q x C, memory B x N x C -> (B x Q x C output, B x Q x N mask logits)."""
        b, q_len, c = queries.shape
        q, k, v = self._heads(self.q(queries)), self._heads(self.k(memory)), self._heads(self.v(memory))
        logits = (q @ k.transpose(-2, -1)) * self.scale  # B x h x Q x N
        mask = logits.mean(dim=1)  # B x Q x N
        if padding_mask is not None:
            logits = logits.masked_fill(padding_mask[:, None, None, :], float("-inf"))
        attn = self.attn_drop(logits.softmax(dim=-1))
        out = (attn @ v).transpose(1, 2).reshape(b, q_len, c)  # B x Q x C
        return self.proj(out), mask


class ATMDecoderLayer(nn.Module):
    """Post-norm: x = norm1(x + SA(x)); x = norm2(x + CA(x, memory)); x = norm3(x + FFN(x))."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, dropout: float = 0.1) -> None:
        super().__init__()
        self.self_attn = Attention(dim, num_heads, qkv_bias=True, attn_drop=dropout, proj_drop=dropout)
        self.norm1 = nn.LayerNorm(dim)
        self.cross_attn = MaskCrossAttention(dim, num_heads, attn_drop=dropout)
        self.dropout2 = nn.Dropout(dropout)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=nn.ReLU, drop=dropout)
        self.norm3 = nn.LayerNorm(dim)

    def forward(
        self, queries: torch.Tensor, memory: torch.Tensor, padding_mask: Optional[torch.Tensor] = None
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """queries B x Q x C, memory B x N x C -> (queries, B x Q x N mask logits)."""
        x = self.norm1(queries + self.self_attn(queries))
        attended, mask = self.cross_attn(x, memory, padding_mask)
        x = self.norm2(x + self.dropout2(attended))
        return self.norm3(x + self.mlp(x)), mask


def _blocks(maps: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """B x C x h x w -> B x C x H x W, each cell's value over its block (nearest)."""
    (h, w), (hh, ww) = maps.shape[-2:], (int(size[0]), int(size[1]))
    if hh % h == 0 and ww % w == 0:
        return maps.repeat_interleave(hh // h, dim=2).repeat_interleave(ww // w, dim=3)
    return F.interpolate(maps, size=(hh, ww), mode="nearest")


@SEM_SEG_HEADS_REGISTRY.register()
class ATMHead(ViTDecodeHead):
    """Outputs ``"pred_logits"`` B x K x (K+1), ``"pred_masks"`` B x N x K (token axis 1) and
    ``"aux_outputs"`` (the same for every shallower level, deepest level last in the main keys)."""

    input_kind = "levels"
    scores_are_logits = False
    token_outputs = ("pred_masks",)

    def __init__(self, cfg: Any, input_shape: Mapping[str, ShapeSpec], *, auxiliary: bool = False) -> None:
        super().__init__(cfg, auxiliary=auxiliary)
        a = cfg.MODEL.SEM_SEG_HEAD.ATM
        in_dim = int(input_shape["tokens"].channels)
        dim, heads, layers = int(a.HIDDEN_DIM), int(a.NUM_HEADS), int(a.NUM_LAYERS)
        if layers < 1:
            raise ValueError(f"MODEL.SEM_SEG_HEAD.ATM.NUM_LAYERS must be >= 1, got {layers}")
        # one level per kept block ("layer{i}" in input_shape); an auxiliary ATM head reads one block
        self.num_levels = 1 if auxiliary else sum(name.startswith("layer") for name in input_shape)
        if self.num_levels < 1:
            raise ValueError("ATMHead needs at least one level: set MODEL.VIT.OUT_INDICES")
        self.input_proj = nn.ModuleList(nn.Linear(in_dim, dim) for _ in range(self.num_levels))
        self.proj_norm = nn.ModuleList(nn.LayerNorm(dim) for _ in range(self.num_levels))
        self.decoders = nn.ModuleList(
            nn.ModuleList(ATMDecoderLayer(dim, heads, float(a.MLP_RATIO), float(a.DROPOUT)) for _ in range(layers))
            for _ in range(self.num_levels)
        )
        self.q = nn.Embedding(self.num_classes, dim)
        self.class_embed = nn.Linear(dim, self.num_classes + 1)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        self.criterion = ATMLoss(
            self.num_classes, self.ignore_value, class_weight=float(a.CLASS_WEIGHT), mask_weight=float(a.MASK_WEIGHT),
            dice_weight=float(a.DICE_WEIGHT), no_object_weight=float(a.NO_OBJECT_WEIGHT),
            focal_alpha=float(a.FOCAL_ALPHA), focal_gamma=float(a.FOCAL_GAMMA),
        )

    def forward(self, levels: Sequence[torch.Tensor], padding_mask: Optional[torch.Tensor] = None) -> Dict[str, Any]:
        """levels: B x N x C per level, shallow to deep (``padding_mask`` B x N, True = empty slot)."""
        if len(levels) != self.num_levels:
            raise ValueError(f"ATMHead was built for {self.num_levels} levels, got {len(levels)}")
        b = levels[0].shape[0]
        queries = self.q.weight.unsqueeze(0).expand(b, -1, -1)  # B x K x D
        per_level: List[Dict[str, torch.Tensor]] = []
        mask_sum: Optional[torch.Tensor] = None
        for x, proj, norm, decoder in zip(reversed(levels), self.input_proj, self.proj_norm, self.decoders):
            memory = norm(proj(x))
            for layer in decoder:
                queries, mask = layer(queries, memory, padding_mask)
            mask_sum = mask if mask_sum is None else mask_sum + mask  # B x K x N
            per_level.append({"pred_logits": self.class_embed(queries), "pred_masks": mask_sum.transpose(1, 2)})
        return {**per_level[-1], "aux_outputs": per_level[:-1]}

    @staticmethod
    def mask_maps(pred_masks: torch.Tensor, grid: Tuple[int, int], size: Sequence[int]) -> torch.Tensor:
        """B x N x K per-token mask logits -> B x K x H x W (bilinear)."""
        return resize_logits(tokens_to_map(pred_masks, grid), size)

    def semantic_logits(self, outputs: Dict[str, Any], grid: Tuple[int, int], size: Sequence[int]) -> torch.Tensor:
        """B x K x H x W scores: sum over queries of softmax(class)[:-1] x sigmoid(mask upsampled to ``size``).

        A token reducer that finalised cells with class scores of their own (DToP) leaves
        ``"final_scores"`` B x G x K and ``"final_cells"`` B x G bool: those cells' blocks of
        the map take their stored scores instead."""
        probs = outputs["pred_logits"].float().softmax(-1)[..., :-1]  # B x Q x K
        masks = self.mask_maps(outputs["pred_masks"].float(), grid, size).sigmoid()  # B x Q x H x W
        scores = torch.einsum("bqk,bqhw->bkhw", probs, masks)
        if "final_cells" in outputs:
            final = tokens_to_map(outputs["final_scores"].float(), grid)  # B x K x h x w
            cells = tokens_to_map(outputs["final_cells"].unsqueeze(-1).float(), grid)  # B x 1 x h x w
            final, cells = (_blocks(t, size) for t in (final, cells))
            scores = torch.where(cells > 0, final, scores)
        return scores

    def token_scores(self, outputs: Dict[str, Any]) -> torch.Tensor:
        """B x N x K per-token class scores (softmax(class)[:-1] x sigmoid(mask) summed over the
        queries, at token resolution): what an ATM head inside the encoder predicts per token."""
        probs = outputs["pred_logits"].float().softmax(-1)[..., :-1]  # B x Q x K
        return torch.einsum("bqk,bnq->bnk", probs, outputs["pred_masks"].float().sigmoid())

    def forward_flops(self, num_tokens: int) -> int:
        """FLOPs of ``forward`` on one image's ``num_tokens`` tokens, by fvcore's rules: per level
        the input projection and norm, then per decoder layer self-attention among the K
        queries, cross-attention to the tokens (projections, scores and weighted sum), the FFN
        and three norms; the class head on the last level's queries."""
        from ..token_reduction.flops import token_wise_flops

        n, k = int(num_tokens), self.num_classes
        total = 0
        for proj, norm, decoder in zip(self.input_proj, self.proj_norm, self.decoders):
            total += n * (token_wise_flops(proj) + token_wise_flops(norm))
            for layer in decoder:
                attn, cross = layer.self_attn, layer.cross_attn
                dim = cross.q.in_features
                total += k * (token_wise_flops(attn.qkv) + token_wise_flops(attn.proj)) + 2 * k * k * dim
                total += k * (token_wise_flops(cross.q) + token_wise_flops(cross.proj)) + n * (token_wise_flops(cross.k) + token_wise_flops(cross.v))
                total += 2 * k * n * dim  # scores q k^T and the weighted sum of the values
                total += k * (token_wise_flops(layer.mlp) + sum(token_wise_flops(m) for m in (layer.norm1, layer.norm2, layer.norm3)))
        # the class head of the deepest level; the shallower levels' class scores feed only the
        # training losses (a traced inference pass, as fvcore counts it, drops them)
        return total + k * token_wise_flops(self.class_embed)

    def flops(self, num_tokens: int, grid: Tuple[int, int], size: Sequence[int]) -> int:
        """:meth:`forward_flops`, then :meth:`semantic_logits`: the mask upsampling (4 per output
        element) and the class x mask product (K x K per pixel; softmax and sigmoid count none)."""
        k = self.num_classes
        return self.forward_flops(num_tokens) + resize_logits_flops(k, grid, size) + k * k * int(size[0]) * int(size[1])

    def losses(self, outputs: Dict[str, Any], targets: torch.Tensor, grid: Tuple[int, int]) -> Dict[str, torch.Tensor]:
        """Per level CE + focal + dice (:class:`.atm_loss.ATMLoss`); shallower levels get suffix ``_i``."""
        levels = list(outputs["aux_outputs"]) + [outputs]
        losses: Dict[str, torch.Tensor] = {}
        for i, level in enumerate(levels):
            masks = tokens_to_map(level["pred_masks"].float(), grid)  # B x K x h x w
            suffix = "" if i == len(levels) - 1 else f"_{i}"
            for name, value in self.criterion(level["pred_logits"].float(), masks, targets).items():
                losses[name + suffix] = value * self.loss_weight
        return losses
