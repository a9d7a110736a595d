"""Ragged self-attention forward as a Triton kernel (the runtime's ``triton`` attention).

The flash varlen kernel that PyTorch ships is FlashAttention-2, written for Ampere: on Hopper it
spends about 1.7x the time per FLOP of cuDNN's dense attention at full length
(``results/token_runtime_h200/NOTES.md``), and that gap is most of what keeps ragged batches
from turning their FLOP cut into time. Triton compiles ``tl.dot`` to the chip's own matrix
instructions (wgmma on Hopper), so a kernel written here can close part of it.

One program handles ``BLOCK_M`` query rows of one head of one image: it reads the image's row
range from the offsets on the device (so a CUDA graph replays it for any lengths that fit its
grid), streams the image's keys and values in blocks of ``BLOCK_N`` with the online softmax of
FlashAttention (running max and sum in float32, exp2 with the scale folded into log2 e), and
writes its rows once. Programs past the end of their image run no key block. Inference only:
no backward, no attention dropout. Runs on CUDA fp16/bf16 tensors, or under Triton's
interpreter (``TRITON_INTERPRET=1``, set before this module is imported), which is how the CPU
tests check it.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

__all__ = ["TritonAttentionConfig", "DEFAULT_TRITON_ATTENTION", "interpreted", "varlen_attention_triton"]

_LOG2E = 1.0 / math.log(2.0)


@dataclass(frozen=True)
class TritonAttentionConfig:
    """Tile sizes and launch settings of the kernel (``scripts/profile_token_runtime.py`` times
    several; the default is a common choice for head dim 64, not yet tuned on a GPU)."""

    block_m: int = 128
    block_n: int = 64
    num_warps: int = 4
    num_stages: int = 3

    def label(self) -> str:
        return f"m{self.block_m} n{self.block_n} w{self.num_warps} s{self.num_stages}"


DEFAULT_TRITON_ATTENTION = TritonAttentionConfig()


@triton.jit
def _varlen_attention_fwd(
    q_ptr, k_ptr, v_ptr, o_ptr, offsets_ptr, qk_scale,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_ot, stride_oh,
    D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DOT_F32: tl.constexpr,
):
    pid_m = tl.program_id(0)
    image = tl.program_id(1)
    head = tl.program_id(2).to(tl.int64)
    start = tl.load(offsets_ptr + image).to(tl.int64)
    length = tl.load(offsets_ptr + image + 1).to(tl.int64) - start
    first = pid_m * BLOCK_M
    rows = first + tl.arange(0, BLOCK_M)
    row_ok = rows < length
    d = tl.arange(0, BLOCK_D)
    d_ok = d < D
    q = tl.load(q_ptr + (start + rows)[:, None] * stride_qt + head * stride_qh + d[None, :],
                mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    if DOT_F32:
        q = q.to(tl.float32)
    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)  # running row max (log2 units)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)  # running sum of exp2
    acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    stop = tl.where(first < length, length, 0)  # no key block for a program past its image
    for key0 in range(0, stop, BLOCK_N):
        cols = key0 + tl.arange(0, BLOCK_N)
        col_ok = cols < length
        kv_mask = col_ok[:, None] & d_ok[None, :]
        k = tl.load(k_ptr + (start + cols)[:, None] * stride_kt + head * stride_kh + d[None, :], mask=kv_mask, other=0.0)
        if DOT_F32:
            k = k.to(tl.float32)
        s = tl.dot(q, tl.trans(k)) * qk_scale  # (BLOCK_M, BLOCK_N), float32
        s = tl.where(col_ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.exp2(s - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_ptr + (start + cols)[:, None] * stride_vt + head * stride_vh + d[None, :], mask=kv_mask, other=0.0)
        if DOT_F32:
            v = v.to(tl.float32)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new
    acc = acc / tl.where(row_ok, l_i, 1.0)[:, None]
    tl.store(o_ptr + (start + rows)[:, None] * stride_ot + head * stride_oh + d[None, :], acc.to(o_ptr.dtype.element_ty),
             mask=row_ok[:, None] & d_ok[None, :])


def interpreted() -> bool:
    """Whether Triton runs kernels in its interpreter: its ``tl.dot`` of fp16/bf16 values is
    wrong there, so the kernel then multiplies in float32 (on a GPU the matrix instructions
    multiply the half-precision values and accumulate in float32)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def varlen_attention_triton(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, offsets: torch.Tensor, max_len: int, scale: float,
    config: TritonAttentionConfig = DEFAULT_TRITON_ATTENTION,
) -> torch.Tensor:
    """softmax(q k^T * scale) v within each image: packed (T, H, D) q, k, v (any row and head
    strides, contiguous head dim; e.g. views of one (T, 3, H, D) projection), ``offsets``
    (B + 1,) int32 on the same device, ``max_len`` at least the longest image (it sizes the
    grid only). Returns (T, H, D) in q's dtype."""
    if q.dim() != 3 or k.shape != q.shape or v.shape != q.shape:
        raise ValueError(f"q, k, v must be (T, H, D) of one shape, got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if offsets.dtype != torch.int32 or offsets.dim() != 1 or offsets.device != q.device:
        raise ValueError(f"offsets must be a 1-d int32 tensor on {q.device}, got {offsets.dtype} {tuple(offsets.shape)} on {offsets.device}")
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    total, heads, head_dim = q.shape
    out = torch.empty((total, heads, head_dim), dtype=q.dtype, device=q.device)
    images = offsets.numel() - 1
    if total == 0 or images <= 0 or max_len <= 0:
        return out
    grid = (triton.cdiv(int(max_len), config.block_m), images, heads)
    _varlen_attention_fwd[grid](
        q, k, v, out, offsets, float(scale) * _LOG2E,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), out.stride(0), out.stride(1),
        D=head_dim, BLOCK_D=max(16, triton.next_power_of_2(head_dim)), BLOCK_M=config.block_m, BLOCK_N=config.block_n,
        DOT_F32=interpreted(), num_warps=config.num_warps, num_stages=config.num_stages,
    )
    return out
