"""Per-image FLOPs of ViT blocks from live token counts, with fvcore's conventions.

A block's cost on a sequence of n tokens is ``per_token * n + per_pair * n**2``: norms, qkv,
proj and MLP scale with n, attention scores and their weighted sum with n**2. Knowing the two
coefficients of each block, a model puts an image's "gflops" into its cost record from the
token set's ``history`` without tracing anything. The coefficients follow fvcore's rules, so the
result equals fvcore's count of the same dense computation: one multiply-add is one flop, a
``Linear`` costs in * out per token (bias not counted), a ``LayerNorm`` 5 per element (4 without
affine), elementwise ops (GELU, residual adds, LayerScale, softmax) nothing. A leaf module with
parameters outside these rules is refused rather than counted as zero.

``SDPA_FLOP_HANDLES`` gives fvcore the handle it lacks for ``scaled_dot_product_attention``
(fvcore is imported only when the handle is called).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Dict, Iterable, List, Sequence

import torch.nn as nn
from timm.layers import LayerScale

__all__ = ["BlockCost", "SDPA_FLOP_HANDLES", "block_cost", "blocks_flops", "sdpa_flop_jit"]


@dataclass(frozen=True)
class BlockCost:
    """FLOPs of one block on n tokens: ``per_token * n + per_pair * n * n``."""

    per_token: int
    per_pair: int

    def __call__(self, n: int) -> int:
        return self.per_token * n + self.per_pair * n * n


def _norm_flops(norm: nn.Module, elements: int) -> int:
    if isinstance(norm, nn.Identity):
        return 0
    if isinstance(norm, nn.LayerNorm):
        return (5 if norm.elementwise_affine else 4) * elements
    raise TypeError(f"no FLOP rule for norm layer {type(norm).__name__}")


def _token_wise_flops(module: nn.Module) -> int:
    """FLOPs per token of a token-wise module (norm, MLP, LayerScale) by fvcore's rules."""
    total = 0
    for sub in module.modules():
        if isinstance(sub, nn.Linear):
            total += sub.in_features * sub.out_features
        elif isinstance(sub, nn.LayerNorm):
            total += _norm_flops(sub, math.prod(sub.normalized_shape))
        elif isinstance(sub, LayerScale):
            continue  # elementwise
        elif not list(sub.children()) and any(True for _ in sub.parameters(recurse=False)):
            raise TypeError(f"no FLOP rule for {type(sub).__name__} (it has parameters) in {type(module).__name__}")
    return total


def block_cost(block: nn.Module) -> BlockCost:
    """The two FLOP coefficients of a timm ViT ``Block``."""
    attn = block.attn
    heads, head_dim = attn.num_heads, attn.head_dim
    inner = heads * head_dim
    per_token = _token_wise_flops(block.norm1) + _token_wise_flops(block.norm2) + _token_wise_flops(block.mlp)
    per_token += attn.qkv.in_features * attn.qkv.out_features + attn.proj.in_features * attn.proj.out_features
    per_token += _norm_flops(attn.q_norm, inner) + _norm_flops(attn.k_norm, inner)
    per_token += _norm_flops(getattr(attn, "norm", nn.Identity()), inner)
    gate = getattr(attn, "gate", None)
    if gate is not None:
        per_token += gate.in_features * gate.out_features
    # scores q k^T: head_dim per head and pair; weighted sum of values: the same again
    return BlockCost(per_token=per_token, per_pair=2 * inner)


def blocks_flops(blocks: Iterable[nn.Module], lengths_per_block: Sequence[Sequence[int]]) -> List[int]:
    """FLOPs per image of ``blocks`` where block i saw ``lengths_per_block[i][b]`` tokens in
    image b (prefix included), e.g. ``blocks_flops(vit.blocks, tokens.history)``."""
    costs = [block_cost(b) for b in blocks]
    if len(costs) != len(lengths_per_block):
        raise ValueError(f"{len(costs)} blocks but lengths for {len(lengths_per_block)} block runs")
    if not costs:
        return []
    batch = len(lengths_per_block[0])
    return [sum(cost(int(lengths[b])) for cost, lengths in zip(costs, lengths_per_block)) for b in range(batch)]


def sdpa_flop_jit(inputs: List[Any], outputs: List[Any]) -> int:
    """fvcore handle for ``aten::scaled_dot_product_attention``: (q k^T) + (weights v) multiply-adds,
    i.e. batch * heads * L * S * (D + D_v) for q (..., L, D), k (..., S, D), v (..., S, D_v)."""
    from fvcore.nn.jit_handles import get_shape

    q, k, v = (get_shape(t) for t in inputs[:3])
    batch = 1
    for size in q[:-2]:
        batch *= size
    return batch * q[-2] * k[-2] * (q[-1] + v[-1])


#: Use as ``FlopCountAnalysis(model, inputs).set_op_handle(**SDPA_FLOP_HANDLES)``.
SDPA_FLOP_HANDLES: Dict[str, Any] = {"aten::scaled_dot_product_attention": sdpa_flop_jit}
