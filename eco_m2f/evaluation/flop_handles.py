"""fvcore FLOP handles for the operators fvcore does not count, and Detectron2's ignore list.

fvcore counts one fused multiply-add as one flop, for the operators it has a handle for
(convolutions, linear layers, matmul/bmm/einsum, norms, a few resamplings). Attention through
``F.scaled_dot_product_attention`` (timm blocks, our masked decoder) and ``nn.MultiheadAttention``'s
fused inference path are single operators it does not know: without the handles below they
count 0. Their cost is the two matrix products (and, for the fused path, the projections):

* ``aten::scaled_dot_product_attention(q, k, v, ...)``: q (..., L, E), k (..., S, E),
  v (..., S, Ev): ``prod(...) * L * S * (E + Ev)`` (q k^T, then the weights times v). Masks,
  scaling, softmax and dropout are elementwise and not counted, as fvcore counts no softmax.
* ``aten::_native_multi_head_attention(query, key, value, embed_dim, num_head, qkv_weight,
  qkv_bias, proj_weight, proj_bias, ...)``: query (B, L, E), key/value (B, S, E): the q, k, v
  projections ``B * (L + 2 S) * E * E``, the attention ``2 * B * L * S * E`` and the output
  projection ``B * L * E * E``.

``DETECTRON2_IGNORED_OPS`` is the list that Detectron2's ``FlopCountAnalysis``
(``detectron2/utils/analysis.py``) sets to "no flops": elementwise and reduction operators,
``aten::batch_norm`` among them (BatchNorm is folded into the convolution at inference).
Detectron2's FrozenBatchNorm2d runs ``F.batch_norm`` without gradients and ``x * scale + bias``
with them; torchvision's (ours) always runs the latter. Either way Detectron2's count gives it 0
flops, and so does ours. Every other operator without a handle is reported by name.
"""
from __future__ import annotations

from math import prod
from numbers import Number
from typing import Any, Dict, FrozenSet, List

from fvcore.nn.jit_handles import get_shape

__all__ = ["ATTENTION_FLOP_HANDLES", "DETECTRON2_IGNORED_OPS", "native_mha_flop_jit", "sdpa_flop_jit"]

DETECTRON2_IGNORED_OPS: FrozenSet[str] = frozenset(
    {
        "aten::add",
        "aten::add_",
        "aten::argmax",
        "aten::argsort",
        "aten::batch_norm",
        "aten::constant_pad_nd",
        "aten::div",
        "aten::div_",
        "aten::exp",
        "aten::log2",
        "aten::max_pool2d",
        "aten::meshgrid",
        "aten::mul",
        "aten::mul_",
        "aten::neg",
        "aten::nonzero_numpy",
        "aten::reciprocal",
        "aten::repeat_interleave",
        "aten::rsub",
        "aten::sigmoid",
        "aten::sigmoid_",
        "aten::softmax",
        "aten::sort",
        "aten::sqrt",
        "aten::sub",
        "torchvision::nms",
    }
)


def sdpa_flop_jit(inputs: List[Any], outputs: List[Any]) -> Number:
    """``aten::scaled_dot_product_attention``: ``prod(batch dims) * L * S * (E + Ev)``."""
    q, k, v = (get_shape(x) for x in inputs[:3])
    if len(q) < 2 or len(k) < 2 or len(v) < 2:
        raise ValueError(f"scaled_dot_product_attention with shapes q {q}, k {k}, v {v}: expected (..., L, E)")
    batch = prod(q[:-2])
    return batch * q[-2] * k[-2] * (q[-1] + v[-1])


def native_mha_flop_jit(inputs: List[Any], outputs: List[Any]) -> Number:
    """``aten::_native_multi_head_attention`` (nn.MultiheadAttention's fused inference path)."""
    query, key = get_shape(inputs[0]), get_shape(inputs[1])
    if len(query) != 3 or len(key) != 3:
        raise ValueError(f"_native_multi_head_attention with query {query}, key {key}: expected (B, T, E)")
    b, length, e = query
    src = key[1]
    projections = b * (length + 2 * src) * e * e + b * length * e * e
    return projections + 2 * b * length * src * e


# Use as FlopCountAnalysis(model, inputs).set_op_handle(**ATTENTION_FLOP_HANDLES)
ATTENTION_FLOP_HANDLES: Dict[str, Any] = {
    "aten::scaled_dot_product_attention": sdpa_flop_jit,
    "aten::_native_multi_head_attention": native_mha_flop_jit,
}
