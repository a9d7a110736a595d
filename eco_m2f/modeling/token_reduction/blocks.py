"""timm ViT blocks run on a token set: every token-wise layer on the packed live tokens only.

``timm.models.vision_transformer.Block`` computes
``x + drop_path1(ls1(attn(norm1(x))))`` then ``x + drop_path2(ls2(mlp(norm2(x))))``. All of it
but the attention core and drop path is token-wise, so those modules run unchanged on the packed
``(T, C)`` rows and cost exactly what the live tokens cost. The attention core goes through
:func:`~.attention.packed_attention` (within each image), and drop path draws one keep/drop per
image, as timm does per sample, applied to all of that image's tokens. The same weights, the
same parameter names: a model keeps its timm blocks and only the loop over them changes.
"""
from __future__ import annotations

from typing import Iterable, Tuple

import torch
import torch.nn as nn
from timm.layers import DropPath
from timm.models.vision_transformer import Attention, Block

from .attention import packed_attention
from .packing import PackedLayout
from .token_set import TokenSet

__all__ = ["check_block", "project_qkv", "run_block", "run_blocks"]


def check_block(block: nn.Module) -> None:
    """Raise unless ``block`` computes what :func:`run_block` reproduces (a pre-norm timm
    ``Block`` with timm's ``Attention``, without overridden forwards)."""
    if not isinstance(block, Block) or type(block).forward is not Block.forward:
        raise TypeError(f"run_blocks runs timm.models.vision_transformer.Block, got {type(block).__name__}")
    attn = block.attn
    if not isinstance(attn, Attention) or type(attn).forward is not Attention.forward:
        raise TypeError(f"run_blocks runs timm's Attention, got {type(attn).__name__} in the block")


def _drop_path(module: nn.Module, residual: torch.Tensor, layout: PackedLayout) -> torch.Tensor:
    """timm's per-sample drop path with one draw per image, spread over that image's rows."""
    if not isinstance(module, DropPath):
        return module(residual)
    if not module.training or module.drop_prob == 0.0:
        return residual
    keep_prob = 1.0 - module.drop_prob
    keep = residual.new_empty(layout.batch_size).bernoulli_(keep_prob)  # (B,): timm's draw
    if keep_prob > 0.0 and module.scale_by_keep:
        keep.div_(keep_prob)
    return residual * keep.index_select(0, layout.batch_index()).unsqueeze(1)


def project_qkv(qkv: nn.Linear, x: torch.Tensor, heads: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """timm's fused qkv projection of packed rows ``x`` (T, C) -> q, k, v, each (T, H, D): views
    of one (T, 3, H, D) product (row stride 3 * H * D), which the ragged kernels read as given."""
    rows = x.shape[0]
    head_dim = qkv.out_features // 3 // heads
    return qkv(x).view(rows, 3, heads, head_dim).unbind(1)


def _attention(attn: Attention, x: torch.Tensor, layout: PackedLayout, impl: str) -> torch.Tensor:
    """timm ``Attention.forward`` on packed rows (T, C) -> (T, C_out)."""
    rows = x.shape[0]
    heads, head_dim = attn.num_heads, attn.head_dim
    gate = getattr(attn, "gate", None)
    gate = gate(x).sigmoid() if gate is not None else None
    q, k, v = project_qkv(attn.qkv, x, heads)  # each (T, H, D)
    q, k = attn.q_norm(q), attn.k_norm(k)
    dropout_p = attn.attn_drop.p if attn.training else 0.0
    out = packed_attention(q, k, v, layout, impl, dropout_p, attn.scale).reshape(rows, heads * head_dim)
    norm = getattr(attn, "norm", None)  # timm's optional scale norm (Identity by default)
    out = norm(out) if norm is not None else out
    if gate is not None:
        out = out * gate
    return attn.proj_drop(attn.proj(out))


def run_block(block: Block, x: torch.Tensor, layout: PackedLayout, attention: str = "auto") -> torch.Tensor:
    """One block on packed rows ``x`` (T, C) laid out by ``layout``; returns (T, C)."""
    x = x + _drop_path(block.drop_path1, block.ls1(_attention(block.attn, block.norm1(x), layout, attention)), layout)
    return x + _drop_path(block.drop_path2, block.ls2(block.mlp(block.norm2(x))), layout)


def run_blocks(blocks: Iterable[Block], tokens: TokenSet, attention: str = "auto") -> TokenSet:
    """Run ``blocks`` in order on the live tokens; the layout does not change in between, so its
    index tensors are built once for all of them. Each block's live lengths join ``history``."""
    x, layout = tokens.x, tokens.layout
    history = list(tokens.history)
    for block in blocks:
        check_block(block)
        x = run_block(block, x, layout, attention)
        history.append(layout.lengths)
    return tokens.with_features(x, tuple(history))
