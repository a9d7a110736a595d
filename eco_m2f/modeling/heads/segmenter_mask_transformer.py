"""Segmenter's mask transformer (Strudel et al. 2021): class embeddings decoded jointly with the patches.

``proj_dec`` projects the patch tokens to the decoder width, K learnable ``cls_emb`` join them,
``NUM_LAYERS`` timm blocks (heads = width / 64, FFN 4x, dropout 0.1) and ``decoder_norm`` mix
both; patches and classes go through ``proj_patch`` / ``proj_classes``, are L2-normalised, and
their products are the masks, normalised over the classes by ``mask_norm``. Parameter names are
the official ones (``decoder.{cls_emb, proj_dec, proj_patch, proj_classes, blocks.i.*,
decoder_norm, mask_norm}``).
"""
from __future__ import annotations

from typing import Any, Dict, Mapping, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import trunc_normal_
from timm.models.vision_transformer import Block

from ..registry import SEM_SEG_HEADS_REGISTRY, ShapeSpec
from .vit_decode_head import ViTDecodeHead, resize_logits_flops

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

    def forward(
        self, tokens: torch.Tensor, padding_mask: Optional[torch.Tensor] = None, lengths: Optional[Sequence[int]] = None
    ) -> Dict[str, torch.Tensor]:
        """tokens B x N x C (``padding_mask`` B x N, True = empty slot) -> {"pred_tokens": B x N x K}.

        Without gradients, a ragged batch whose ``lengths`` are given runs :meth:`forward_packed`:
        the empty slots then cost nothing (values there are unspecified).
        """
        if padding_mask is not None and lengths is not None and not torch.is_grad_enabled():
            return self.forward_packed(tokens, lengths)
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

    def forward_packed(self, tokens: torch.Tensor, lengths: Sequence[int]) -> Dict[str, torch.Tensor]:
        """The decoder on the real tokens only: image b's first ``lengths[b]`` slots of
        ``tokens`` (B x N x C) packed (:meth:`forward_rows`), the blocks run by the token runtime
        (attention within each image, token-wise layers on the packed rows). Equals
        :meth:`forward` with the padding mask at every real slot; empty slots come back 0."""
        from ..token_reduction.packing import pack_slots, unpack_slots  # the token-reduction package imports the heads

        rows, layout = pack_slots(tokens, lengths)
        return {"pred_tokens": unpack_slots(self.forward_rows(rows, layout, tokens.shape[0]), layout, tokens.shape[1])}

    def forward_rows(self, rows: torch.Tensor, layout: Any, batch: int, attention: str = "auto") -> torch.Tensor:
        """The decoder on packed rows (R, C): the live tokens of ``batch`` images one after another
        by ``layout``, a :class:`~..token_reduction.packing.PackedLayout` without prefix, or a
        :class:`~..token_reduction.packing.StaticLayout` (the offsets on the device, ``max_len`` a
        bound on the lengths, rows past the last image padding and finite) so that a CUDA graph
        replays it for any lengths: every size is then fixed by the input. Returns (R, K), each
        real row's ``mask_norm`` output (padding rows unspecified). Each image's K class
        embeddings go in front of its rows; the padding keeps none."""
        from ..token_reduction.blocks import run_block
        from ..token_reduction.packing import PackedLayout, StaticLayout
        from ..token_reduction.static_decision import row_slots

        r, dev = rows.shape[0], rows.device
        k, dim = self.num_classes, self.proj_dec.out_features
        offsets = layout.offsets(torch.int32).long()  # (B + 1,), or (B + 2,): the last image padding
        index = torch.arange(r, device=dev)
        image = torch.searchsorted(offsets[1: batch + 1].contiguous(), index, right=True)  # (R,); B on padding
        patch_rows = index + k * torch.clamp(image + 1, max=batch)  # a row's place behind its image's classes
        starts = offsets[:batch] + k * torch.arange(batch, device=dev)  # (B,) first class row of each image
        class_rows = (starts.view(-1, 1) + torch.arange(k, device=dev).view(1, -1)).view(-1)  # (B * K,)
        patches = self.proj_dec(rows)  # R x D
        classes = self.cls_emb.expand(batch, -1, -1).to(patches.dtype).reshape(batch * k, dim)
        x = patches.new_empty(r + batch * k, dim).index_copy(0, patch_rows, patches).index_copy(0, class_rows, classes)
        if isinstance(layout, PackedLayout):  # host lengths: any attention backend
            decoder_layout = PackedLayout([k + n for n in layout.lengths], k, dev)
        else:
            grown = offsets + k * torch.clamp(torch.arange(offsets.numel(), device=dev), max=batch)
            decoder_layout = StaticLayout(grown.to(torch.int32), layout.max_len + k, uniform=False)
        for block in self.blocks:
            x = run_block(block, x, decoder_layout, attention)
        x = self.decoder_norm(x)
        patches = F.normalize(x.index_select(0, patch_rows) @ self.proj_patch.to(x.dtype), dim=-1)  # R x D
        classes = F.normalize(x.index_select(0, class_rows) @ self.proj_classes.to(x.dtype), dim=-1)  # (B * K) x D
        # the patch-class products per image on a (B + 1) x width grid, the padding image last
        # (max_len bounds it too), so that every row has a slot of its own
        width = int(layout.max_len)
        slot = row_slots(image, offsets, width)  # (R,)
        grid = patches.new_zeros((batch + 1) * width, dim).index_copy(0, slot, patches)[: batch * width]
        masks = grid.view(batch, width, dim) @ classes.view(batch, k, dim).transpose(1, 2)  # B x width x K
        masks = torch.cat([masks.reshape(batch * width, k), masks.new_zeros(width, k)]).index_select(0, slot)  # R x K
        return self.mask_norm(masks)

    def flops(self, num_tokens: int, grid: Tuple[int, int], size: Sequence[int]) -> int:
        """proj_dec, the blocks on the N + K tokens, decoder_norm, the two projections, the
        patch-class products, mask_norm, then the upsampling (L2 normalisation costs none)."""
        from ..token_reduction.flops import block_cost, token_wise_flops

        n, k = int(num_tokens), self.num_classes
        dim = self.proj_dec.out_features
        total = n * self.proj_dec.in_features * dim
        total += sum(block_cost(block)(n + k) for block in self.blocks)
        total += token_wise_flops(self.decoder_norm) * (n + k)
        total += (n + k) * dim * dim  # proj_patch on the patches, proj_classes on the classes
        total += n * dim * k + token_wise_flops(self.mask_norm) * n
        return total + resize_logits_flops(k, grid, size)
