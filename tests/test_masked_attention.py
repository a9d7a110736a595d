"""Masked cross-attention: the per-image-mask SDPA path equals nn.MultiheadAttention with per-head masks."""
from __future__ import annotations

import pytest
import torch

from eco_m2f.modeling.transformer_decoder.masked_attention_decoder import (
    CrossAttentionLayer,
    masked_multihead_attention,
)


def _inputs(q=7, s=30, b=3, c=16, heads=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    tgt = torch.randn(q, b, c, generator=g)
    memory = torch.randn(s, b, c, generator=g)
    pos = torch.randn(s, b, c, generator=g)
    query_pos = torch.randn(q, b, c, generator=g)
    mask = torch.rand(b, q, s, generator=g) < 0.6
    mask[0, 0] = False  # one row with nothing masked
    return tgt, memory, pos, query_pos, mask


@pytest.mark.parametrize("normalize_before", [False, True])
def test_per_image_mask_equals_per_head_mask(normalize_before):
    torch.manual_seed(0)
    layer = CrossAttentionLayer(d_model=16, nhead=4, normalize_before=normalize_before)
    tgt, memory, pos, query_pos, mask = _inputs()
    per_head = mask.repeat_interleave(4, dim=0)  # (B*heads, Q, S) in nn.MultiheadAttention's order
    fast = layer(tgt, memory, memory_mask=mask, pos=pos, query_pos=query_pos)
    reference = layer(tgt, memory, memory_mask=per_head, pos=pos, query_pos=query_pos)
    assert fast.shape == (7, 3, 16)
    torch.testing.assert_close(fast, reference, atol=1e-5, rtol=1e-5)
    # and against a direct call of nn.MultiheadAttention
    x = layer.norm(tgt) if normalize_before else tgt
    direct = layer.multihead_attn(x + query_pos, memory + pos, memory, attn_mask=per_head)[0]
    torch.testing.assert_close(masked_multihead_attention(layer.multihead_attn, x + query_pos, memory + pos, memory, mask), direct,
                               atol=1e-5, rtol=1e-5)


def test_masking_changes_the_result_and_gradients_match():
    torch.manual_seed(1)
    layer = CrossAttentionLayer(d_model=16, nhead=4)
    tgt, memory, pos, query_pos, mask = _inputs(seed=1)
    masked = layer(tgt, memory, memory_mask=mask, pos=pos, query_pos=query_pos)
    unmasked = layer(tgt, memory, memory_mask=None, pos=pos, query_pos=query_pos)
    assert (masked - unmasked).abs().max() > 1e-2

    grads = []
    for m in (mask, mask.repeat_interleave(4, dim=0)):
        layer.zero_grad()
        layer(tgt, memory, memory_mask=m, pos=pos, query_pos=query_pos).square().sum().backward()
        grads.append(layer.multihead_attn.in_proj_weight.grad.clone())
    torch.testing.assert_close(grads[0], grads[1], atol=1e-5, rtol=1e-5)
