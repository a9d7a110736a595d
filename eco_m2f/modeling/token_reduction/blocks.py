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

from .attention import PACKED_QKV_IMPLS, packed_attention, resolve_attention
from .packing import PackedLayout
from .token_set import TokenSet

__all__ = ["check_block", "project_qkv", "run_block", "run_blocks", "wants_packed_qkv"]


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


def wants_packed_qkv(impl: str, x: torch.Tensor, dropout: bool = False) -> bool:
    """Whether the attention that ``impl`` resolves to for the qkv projection of ``x`` (in the
    autocast dtype, if autocast is on) reads token-packed q, k, v."""
    if impl in PACKED_QKV_IMPLS:
        return True
    if impl != "auto":
        return False
    device_type = x.device.type
    dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else x.dtype
    return resolve_attention(impl, device_type, dtype, dropout) in PACKED_QKV_IMPLS


def project_qkv(qkv: nn.Linear, x: torch.Tensor, heads: int, packed: bool = False) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """timm's fused qkv projection of packed rows ``x`` (T, C) -> q, k, v, each (T, H, D).

    By default they are views of one (T, 3, H, D) product (row stride 3 * H * D). ``packed``
    writes them instead into one (3, T, H, D) buffer with three GEMMs over the weight's thirds,
    each with its bias in the GEMM epilogue, so every one is token-packed without a copy
    (inference only: ``out=`` GEMMs record no gradient, so with autograd on this falls back to
    the views, which the backend then copies).
    """
    rows = x.shape[0]
    inner = qkv.out_features // 3
    head_dim = inner // heads
    weight, bias = qkv.weight, qkv.bias
    recording = torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)
    if not packed or recording:
        return qkv(x).view(rows, 3, heads, head_dim).unbind(1)
    device_type = x.device.type
    dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else x.dtype
    with torch.autocast(device_type, enabled=False):  # the out= GEMMs take one dtype; cast as autocast would
        x, weight = x.to(dtype), weight.to(dtype).view(3, inner, x.shape[1])  # weight thirds (3, inner, C)
        out = x.new_empty(3, rows, inner)
        for i in range(3):
            if bias is None:
                torch.mm(x, weight[i].t(), out=out[i])
            else:
                torch.addmm(bias[i * inner : (i + 1) * inner].to(dtype), x, weight[i].t(), out=out[i])
    return out.view(3, rows, heads, head_dim).unbind(0)


def _attention(attn: Attention, x: torch.Tensor, layout: PackedLayout, impl: str) -> torch.Tensor:
    """timm ``Attention.forward`` on packed rows (T, C) -> (T, C_out)."""
    rows = x.shape[0]
    heads, head_dim = attn.num_heads, attn.head_dim
    gate = getattr(attn, "gate", None)
    gate = gate(x).sigmoid() if gate is not None else None
    dropout = attn.training and attn.attn_drop.p > 0
    packed = not layout.uniform and wants_packed_qkv(impl, x, dropout)
    q, k, v = project_qkv(attn.qkv, x, heads, packed)  # each (T, H, D)
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
