"""Self-attention within each image of a packed batch whose images hold different token counts.

Every backend takes packed ``q, k, v`` (T, H, D), rows laid out by a
:class:`~.packing.PackedLayout`, and returns the packed output (T, H, D); a token attends to
the tokens of its own image only. They differ in how the ragged batch meets the kernel:

* ``padded``: scatter into ``B x H x L_max x D`` and pass a key-padding mask to
  ``scaled_dot_product_attention`` (any device; pays for ``L_max`` per image);
* ``jagged``: nested jagged tensors through ``scaled_dot_product_attention``, which runs
  flash / memory-efficient attention on the packed rows (CUDA) or the math kernel (CPU);
* ``flash``: the flash varlen kernel that the jagged path ends in, called as the aten op
  ``_flash_attention_forward`` without the nested-tensor wrapping (the least Python per
  block; CUDA, fp16/bf16; differentiable, with attention dropout);
* ``varlen``: ``torch.nn.attention.varlen.varlen_attn``, the public wrapper of the same kernel
  (CUDA, fp16/bf16, no attention dropout, torch >= 2.10; with torch 2.11 on an H200 it ran the
  flash kernel, later torch sends images over 128 tokens to cuDNN on Hopper and Blackwell);
* ``flex``: FlexAttention on the whole packed sequence with a per-image block mask, built once
  per layout and compiled on CUDA (no attention dropout; forward only on CPU);
* ``triton``: the project's own ragged kernel (:mod:`.triton_attention`), written so that
  Triton compiles it to Hopper's matrix instructions (CUDA fp16/bf16, or CPU under Triton's
  interpreter; inference only: no backward, no attention dropout).

cuDNN's ragged attention is not offered: with torch 2.11 on an H200 its capture into a CUDA
graph fails and leaves the process's CUDA context broken (``results/token_runtime_h200/NOTES.md``).

A :class:`~.packing.StaticLayout` (the device offsets of a CUDA graph) runs a backend that reads
them (``flash``, ``varlen``, ``triton``); off CUDA, where no graph replays, code shaped for one is
checked through one masked attention over all rows.

When all images hold the same number of tokens the packed rows already form a dense batch, so
every backend runs plain ``scaled_dot_product_attention`` on a view, exactly as timm's
``Attention`` does. ``auto`` picks :data:`DEFAULT_CUDA_ATTENTION` on CUDA (the fastest in
``scripts/benchmark_token_runtime.py``) when it applies, ``padded`` elsewhere.
"""
from __future__ import annotations

import functools
import inspect
from typing import Callable, Dict, Tuple

import torch
import torch.nn.functional as F

from .packing import PackedLayout, StaticLayout

__all__ = [
    "ATTENTION_IMPLS",
    "DEFAULT_CUDA_ATTENTION",
    "DEVICE_OFFSET_IMPLS",
    "attention_unavailable",
    "packed_attention",
    "resolve_attention",
]

#: Names accepted wherever an attention implementation is chosen.
ATTENTION_IMPLS = ("auto", "padded", "jagged", "flash", "varlen", "flex", "triton")
#: Backends that read the image offsets from a device tensor (so a CUDA graph can replay them).
DEVICE_OFFSET_IMPLS = ("flash", "varlen", "triton")
#: The ``auto`` choice on CUDA; fallbacks follow in order where it does not apply.
DEFAULT_CUDA_ATTENTION = "flash"
_CUDA_FALLBACKS = ("jagged", "padded")

AttentionFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, PackedLayout, float, float], torch.Tensor]


# ---------------------------------------------------------------------- backends
def _dense(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: PackedLayout, dropout_p: float, scale: float) -> torch.Tensor:
    """Equal lengths: the packed rows are a (B, L) batch; timm's own SDPA call on a view."""
    b, n = layout.batch_size, layout.max_len
    h, d = q.shape[1:]

    def batch(t: torch.Tensor) -> torch.Tensor:
        return t.view(b, n, h, d).transpose(1, 2)  # (B, H, L, D)

    out = F.scaled_dot_product_attention(batch(q), batch(k), batch(v), dropout_p=dropout_p, scale=scale)
    return out.transpose(1, 2).reshape(b * n, h, d)


def _sdpa_key_mask(layout: PackedLayout) -> torch.Tensor:
    """(B, 1, 1, L_max) the keys that exist. Padded query rows attend to real keys and are
    dropped after; an image without tokens sees one zero key, so that no row is fully masked
    (kernels differ in what they return for such rows)."""
    mask = layout.key_padding_mask(True).clone()
    mask[:, 0] = True
    return mask.view(layout.batch_size, 1, 1, layout.max_len)


def _padded(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: PackedLayout, dropout_p: float, scale: float) -> torch.Tensor:
    b, width = layout.batch_size, layout.max_len
    h, d = q.shape[1:]
    rows = layout.pad_rows(True)  # (T,) row of each packed token in (B * L_max)

    def pad(t: torch.Tensor) -> torch.Tensor:
        return t.new_zeros(b * width, h, d).index_copy(0, rows, t).view(b, width, h, d).transpose(1, 2)  # (B, H, L, D)

    mask = layout.cached("sdpa_key_mask", lambda: _sdpa_key_mask(layout))
    out = F.scaled_dot_product_attention(pad(q), pad(k), pad(v), attn_mask=mask, dropout_p=dropout_p, scale=scale)
    return out.transpose(1, 2).reshape(b * width, h, d).index_select(0, rows)


def _jagged(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: PackedLayout, dropout_p: float, scale: float) -> torch.Tensor:
    offsets = layout.offsets(torch.long)  # one tensor per layout: q, k and v share its ragged size
    contiguous = q.device.type != "cuda"  # the CPU math kernel wants contiguous rows

    def nested(t: torch.Tensor) -> torch.Tensor:
        t = t.contiguous() if contiguous else t
        nt = torch.nested.nested_tensor_from_jagged(t, offsets, min_seqlen=layout.min_len, max_seqlen=layout.max_len)
        return nt.transpose(1, 2)  # (B, H, j, D)

    out = F.scaled_dot_product_attention(nested(q), nested(k), nested(v), dropout_p=dropout_p, scale=scale)
    return out.transpose(1, 2).values()  # (T, H, D)


def _flash(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: PackedLayout, dropout_p: float, scale: float) -> torch.Tensor:
    cu = layout.offsets(torch.int32)
    out = torch.ops.aten._flash_attention_forward(
        q, k, v, cu, cu, layout.max_len, layout.max_len, dropout_p, False, False, scale=scale
    )
    return out[0]  # (T, H, D); the rest is logsumexp and dropout state for the backward


@functools.lru_cache(maxsize=None)
def _varlen_fn() -> Tuple[Callable, bool]:
    from torch.nn.attention.varlen import varlen_attn

    return varlen_attn, "scale" in inspect.signature(varlen_attn).parameters


def _varlen(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: PackedLayout, dropout_p: float, scale: float) -> torch.Tensor:
    if dropout_p > 0:
        raise ValueError("attention 'varlen' has no attention dropout; use 'jagged' or 'padded' when training with attn_drop > 0")
    fn, takes_scale = _varlen_fn()
    cu = layout.offsets(torch.int32)
    if takes_scale:
        return fn(q, k, v, cu, cu, layout.max_len, layout.max_len, scale=scale)
    if abs(scale - q.shape[-1] ** -0.5) > 1e-12:
        raise ValueError(f"this torch's varlen_attn has no scale argument; attention scale {scale} is not 1/sqrt(head_dim)")
    return fn(q, k, v, cu, cu, layout.max_len, layout.max_len)


@functools.lru_cache(maxsize=None)
def _flex_fn(device_type: str) -> Callable:
    from torch.nn.attention.flex_attention import flex_attention

    if device_type == "cuda":
        return torch.compile(flex_attention, dynamic=True)
    return flex_attention


def _flex_block_mask(layout: PackedLayout):
    from torch.nn.attention.flex_attention import create_block_mask

    image = layout.batch_index()  # (T,)

    def same_image(b, h, q_idx, kv_idx):
        return image[q_idx] == image[kv_idx]

    return create_block_mask(same_image, None, None, layout.total, layout.total, device=layout.device)


def _flex(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: PackedLayout, dropout_p: float, scale: float) -> torch.Tensor:
    if dropout_p > 0:
        raise ValueError("attention 'flex' has no attention dropout; use 'jagged' or 'padded' when training with attn_drop > 0")
    if q.device.type != "cuda" and torch.is_grad_enabled() and q.requires_grad:
        raise ValueError("attention 'flex' has no backward on CPU; use 'padded' or 'jagged' to train on CPU")
    block_mask = layout.cached("flex_block_mask", lambda: _flex_block_mask(layout))

    def whole(t: torch.Tensor) -> torch.Tensor:
        return t.transpose(0, 1).unsqueeze(0)  # (1, H, T, D): the batch as one sequence

    out = _flex_fn(q.device.type)(whole(q), whole(k), whole(v), block_mask=block_mask, scale=scale)
    return out[0].transpose(0, 1)  # (T, H, D)


@functools.lru_cache(maxsize=None)
def _triton_module():
    from . import triton_attention

    return triton_attention


def _triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: PackedLayout, dropout_p: float, scale: float) -> torch.Tensor:
    if dropout_p > 0:
        raise ValueError("attention 'triton' has no attention dropout; use 'flash', 'jagged' or 'padded' when training with attn_drop > 0")
    if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)):
        raise ValueError("attention 'triton' is inference only (no backward); train with 'flash', 'jagged' or 'padded'")
    return _triton_module().varlen_attention_triton(q, k, v, layout.offsets(torch.int32), layout.max_len, scale)


_BACKENDS: Dict[str, AttentionFn] = {"padded": _padded, "jagged": _jagged, "flash": _flash, "varlen": _varlen, "flex": _flex,
                                     "triton": _triton}


# ---------------------------------------------------------------------- choice
def attention_unavailable(impl: str, device: torch.device, dtype: torch.dtype, dropout: bool = False) -> str:
    """Why ``impl`` cannot run tensors of ``device`` / ``dtype`` (empty string when it can)."""
    if impl not in _BACKENDS:
        return f"unknown attention implementation '{impl}'; known: {list(ATTENTION_IMPLS)}"
    interpreted = False  # Triton's interpreter runs the triton kernel on CPU tensors of any float dtype
    if impl == "triton":
        try:
            interpreted = _triton_module().interpreted()
        except ImportError as e:
            return f"'triton' needs the triton package ({e})"
    if impl in DEVICE_OFFSET_IMPLS and not interpreted and (device.type != "cuda" or dtype not in (torch.float16, torch.bfloat16)):
        return f"'{impl}' needs CUDA fp16/bf16 tensors, got {device.type} {dtype}"
    if impl == "varlen":
        try:
            _varlen_fn()
        except ImportError:
            return f"'varlen' needs torch.nn.attention.varlen (torch >= 2.10), this is torch {torch.__version__}"
    if impl == "flex":
        try:
            _flex_fn(device.type)
        except ImportError:
            return f"'flex' needs torch.nn.attention.flex_attention (torch >= 2.5), this is torch {torch.__version__}"
    if impl in ("varlen", "flex", "triton") and dropout:
        return f"'{impl}' has no attention dropout"
    return ""


@functools.lru_cache(maxsize=64)
def resolve_attention(impl: str, device_type: str, dtype: torch.dtype, dropout: bool = False) -> str:
    """The backend that ``impl`` names for tensors of this device type and dtype: ``auto`` picks
    :data:`DEFAULT_CUDA_ATTENTION` (or the first fallback that applies) on CUDA, ``padded``
    elsewhere; an explicit name that cannot run raises a ValueError saying why."""
    device = torch.device(device_type)
    if impl == "auto":
        if device.type != "cuda":
            return "padded"
        for name in (DEFAULT_CUDA_ATTENTION,) + _CUDA_FALLBACKS:
            if not attention_unavailable(name, device, dtype, dropout):
                return name
        return "padded"
    reason = attention_unavailable(impl, device, dtype, dropout)
    if reason:
        raise ValueError(f"attention implementation '{impl}' cannot run here: {reason}")
    return impl


def packed_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    layout: PackedLayout,
    impl: str = "auto",
    dropout_p: float = 0.0,
    scale: float | None = None,
) -> torch.Tensor:
    """softmax(q k^T * scale) v within each image: packed (T, H, D) in, (T, H, D) out. A layout
    of equal lengths runs the dense kernel on a view; others go through backend ``impl`` (a
    :class:`~.packing.StaticLayout` with ``uniform`` False takes ``impl`` at any lengths)."""
    if scale is None:
        scale = q.shape[-1] ** -0.5
    if layout.uniform:
        return _dense(q, k, v, layout, dropout_p, scale)
    name = resolve_attention(impl, q.device.type, q.dtype, dropout_p > 0)
    if isinstance(layout, StaticLayout) and name not in DEVICE_OFFSET_IMPLS:
        if q.is_cuda:
            raise ValueError(f"attention '{name}' needs the host lengths of a PackedLayout; a StaticLayout "
                             f"(a CUDA graph's device offsets) takes one of {list(DEVICE_OFFSET_IMPLS)}")
        return _static_masked(q, k, v, layout, dropout_p, scale)
    return _BACKENDS[name](q, k, v, layout, dropout_p, scale)


def _static_masked(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: StaticLayout, dropout_p: float,
                   scale: float) -> torch.Tensor:
    """A :class:`~.packing.StaticLayout` off CUDA (code shaped for a CUDA graph, checked on the
    CPU): one attention over all rows whose mask keeps every row within its image, the images
    found from the device offsets (rows past them form one more image). Quadratic in the rows."""
    rows = q.shape[0]
    offsets = layout.offsets(torch.int32).long()
    image = torch.searchsorted(offsets[1:].contiguous(), torch.arange(rows, device=q.device), right=True)  # (T,)
    mask = image.view(-1, 1) == image.view(1, -1)  # (T, T) True = may attend

    def whole(t: torch.Tensor) -> torch.Tensor:
        return t.transpose(0, 1).unsqueeze(0)  # (1, H, T, D)

    out = F.scaled_dot_product_attention(whole(q), whole(k), whole(v), attn_mask=mask, dropout_p=dropout_p, scale=scale)
    return out[0].transpose(0, 1)  # (T, H, D)
