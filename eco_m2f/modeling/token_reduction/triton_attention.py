"""Ragged self-attention forward as a Triton kernel (the runtime's ``triton`` attention).

The flash varlen kernel that PyTorch ships is FlashAttention-2, written for Ampere: on Hopper it
spends about 1.7x the time per FLOP of cuDNN's dense attention at full length
(``results/token_runtime_h200/NOTES.md``), and that gap is most of what keeps ragged batches
from turning their FLOP cut into time. Triton compiles ``tl.dot`` to the chip's own matrix
instructions (wgmma on Hopper), so a kernel written here can close part of it.

One program handles ``BLOCK_M`` query rows of one head of one image: it reads the image's row
range from the offsets on the device (so a CUDA graph replays it for any lengths that fit its
grid), streams the image's keys and values in blocks of ``BLOCK_N`` with the online softmax of
FlashAttention (running max and sum in float32, exp2 with the scale folded into log2 e; only the
last, partial block of keys is masked), and writes its rows once. Programs past the end of their image run no key block. Inference only:
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
    several). Compiled for sm_90 at head dim 64 the default holds 127 registers per thread and
    spills none (4 warps would hold 242), its loads pipelined with cp.async and its products on
    wgmma (``tests/test_triton_attention.py``). On one H200 it took 51 us per call at mixed
    lengths against flash varlen's 69 us; 64 x 64 tiles on 4 warps were 2-14% faster alone but
    are not yet timed inside the graphs (``results/token_runtime_h200/NOTES.md``, run 3)."""

    block_m: int = 128
    block_n: int = 64
    num_warps: int = 8
    num_stages: int = 3

    def label(self) -> str:
        return f"m{self.block_m} n{self.block_n} w{self.num_warps} s{self.num_stages}"


DEFAULT_TRITON_ATTENTION = TritonAttentionConfig()


@triton.jit
def _load_rows(ptrs, row_ok, d_ok, MASK_ROWS: tl.constexpr, EVEN_D: tl.constexpr, DOT_F32: tl.constexpr):
    """(rows, BLOCK_D) values at ``ptrs``: masks only where the rows or the head dim need them."""
    if MASK_ROWS:
        x = tl.load(ptrs, mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    elif EVEN_D:
        x = tl.load(ptrs)
    else:
        x = tl.load(ptrs, mask=d_ok[None, :], other=0.0)
    if DOT_F32:
        x = x.to(tl.float32)
    return x


@triton.jit
def _attend(q, acc, l_i, m_i, k_ptrs, v_ptrs, col_ok, d_ok, qk_scale,
            MASK_COLS: tl.constexpr, EVEN_D: tl.constexpr, DOT_F32: tl.constexpr):
    """One block of keys and values into the running (acc, l_i, m_i) of the online softmax."""
    k = _load_rows(k_ptrs, col_ok, d_ok, MASK_COLS, EVEN_D, DOT_F32)
    s = tl.dot(q, tl.trans(k)) * qk_scale  # (BLOCK_M, BLOCK_N) float32, log2 units
    if MASK_COLS:
        s = tl.where(col_ok[None, :], s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    p = tl.exp2(s - m_new[:, None])
    alpha = tl.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, 1)
    v = _load_rows(v_ptrs, col_ok, d_ok, MASK_COLS, EVEN_D, DOT_F32)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
    return acc, l_i, m_new


@triton.jit
def _varlen_attention_fwd(
    q_ptr, k_ptr, v_ptr, o_ptr, offsets_ptr, qk_scale,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_ot, stride_oh,
    D: tl.constexpr, BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    DOT_F32: tl.constexpr,
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
    q = _load_rows(q_ptr + (start + rows)[:, None] * stride_qt + head * stride_qh + d[None, :], row_ok, d_ok, True, EVEN_D, DOT_F32)
    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)  # running row max (log2 units)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)  # running sum of exp2
    acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    # a program past its image runs no key block; the full blocks need no column mask, the
    # last, partial one does
    stop = tl.where(first < length, length, 0)
    full = (stop // BLOCK_N) * BLOCK_N
    cols = tl.arange(0, BLOCK_N)
    k_ptrs = k_ptr + (start + cols)[:, None] * stride_kt + head * stride_kh + d[None, :]
    v_ptrs = v_ptr + (start + cols)[:, None] * stride_vt + head * stride_vh + d[None, :]
    for _ in range(0, full, BLOCK_N):
        acc, l_i, m_i = _attend(q, acc, l_i, m_i, k_ptrs, v_ptrs, cols, d_ok, qk_scale, False, EVEN_D, DOT_F32)
        k_ptrs += BLOCK_N * stride_kt
        v_ptrs += BLOCK_N * stride_vt
    if full < stop:
        col_ok = (full + cols) < stop
        acc, l_i, m_i = _attend(q, acc, l_i, m_i, k_ptrs, v_ptrs, col_ok, d_ok, qk_scale, True, EVEN_D, DOT_F32)
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
    block_d = max(16, triton.next_power_of_2(head_dim))
    _varlen_attention_fwd[grid](
        q, k, v, out, offsets, float(scale) * _LOG2E,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), out.stride(0), out.stride(1),
        D=head_dim, BLOCK_D=block_d, EVEN_D=block_d == head_dim, BLOCK_M=config.block_m, BLOCK_N=config.block_n,
        DOT_F32=interpreted(), num_warps=config.num_warps, num_stages=config.num_stages,
    )
    return out
