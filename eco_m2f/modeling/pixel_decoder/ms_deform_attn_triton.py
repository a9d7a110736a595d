"""Multi-scale deformable attention as fused Triton kernels (forward and backward).

The grid_sample reference writes every bilinear sample to memory, (N*M, D, Lq, L*P) values,
before the attention-weighted sum reads them back: at 1024x1024 and batch 8 that is about
2 GB per encoder layer. Here one program handles BLOCK_Q queries of one head of one image,
gathers the four neighbours of each sampling point straight from ``value`` (D contiguous
channels per read) and accumulates the weighted sum in float32 registers, so only the output
is written. Same arguments, layout and semantics as
:func:`~.ms_deform_attn.ms_deform_attn_core_pytorch` (bilinear, zero padding,
``align_corners=False``); the backward kernel scatters value gradients with float32 atomics.

Runs on CUDA tensors, or on CPU tensors under Triton's interpreter (``TRITON_INTERPRET=1``,
set before this module is imported), which is how the CPU tests check it.
"""
from __future__ import annotations

import functools
from typing import List, Tuple

import torch
import triton
import triton.language as tl

__all__ = ["ms_deform_attn_triton"]

_BLOCK_Q = 64


@triton.jit
def _corner_ptrs(base_ptr, token_base, d, dmask, xx, yy, w, h, qmask, MD: tl.constexpr):
    """Pointers to the D channels of pixel (yy, xx) of one level for every query, and the mask
    that drops pixels outside the map (zero padding): (BLOCK_Q, BLOCK_D) each."""
    valid = qmask & (xx >= 0) & (xx < w) & (yy >= 0) & (yy < h)
    tok = token_base + (yy * w + xx).to(tl.int64)
    return base_ptr + tok[:, None] * MD + d[None, :], valid[:, None] & dmask[None, :]


@triton.jit
def _corner(value_ptr, token_base, d, dmask, xx, yy, w, h, qmask, MD: tl.constexpr):
    """The value rows of corner (yy, xx) for every query: (BLOCK_Q, BLOCK_D) float32, 0 outside the map."""
    ptrs, mask = _corner_ptrs(value_ptr, token_base, d, dmask, xx, yy, w, h, qmask, MD)
    return tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _point(loc_ptr, attn_ptr, idx, qmask, w, h):
    """Sampling point ``idx`` of every query: its top-left neighbour (x0, y0), the fractions
    (lx, ly) towards the next pixel and its attention weight a, all (BLOCK_Q,)."""
    # pixel coordinates: align_corners=False puts pixel i's centre at (i + 0.5) / size
    x = tl.load(loc_ptr + 2 * idx, mask=qmask, other=0.0).to(tl.float32) * w - 0.5
    y = tl.load(loc_ptr + 2 * idx + 1, mask=qmask, other=0.0).to(tl.float32) * h - 0.5
    a = tl.load(attn_ptr + idx, mask=qmask, other=0.0).to(tl.float32)
    x0f = tl.floor(x)
    y0f = tl.floor(y)
    return x0f.to(tl.int32), y0f.to(tl.int32), x - x0f, y - y0f, a


@triton.jit
def _ms_deform_attn_fwd(
    value_ptr, shapes_ptr, starts_ptr, loc_ptr, attn_ptr, out_ptr,
    S, Lq,
    M: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr, L: tl.constexpr, P: tl.constexpr,
    BLOCK_Q: tl.constexpr,
):
    pid_q = tl.program_id(0)
    m = tl.program_id(1)
    n = tl.program_id(2).to(tl.int64)
    q = pid_q * BLOCK_Q + tl.arange(0, BLOCK_Q)
    qmask = q < Lq
    d = tl.arange(0, BLOCK_D)
    dmask = d < D
    # (N, Lq, M, L, P[, 2]) index of (n, q, m, l=0, p=0)
    sample0 = ((n * Lq + q) * M + m) * (L * P)
    value_head = value_ptr + n * S * M * D + m * D  # value[n, token, m, :] = value_head + token * M * D
    acc = tl.zeros((BLOCK_Q, BLOCK_D), dtype=tl.float32)
    for lvl in tl.static_range(L):
        h = tl.load(shapes_ptr + 2 * lvl)
        w = tl.load(shapes_ptr + 2 * lvl + 1)
        start = tl.load(starts_ptr + lvl).to(tl.int64)
        for pt in tl.static_range(P):
            idx = sample0 + lvl * P + pt
            x0, y0, lx, ly, a = _point(loc_ptr, attn_ptr, idx, qmask, w, h)
            v = _corner(value_head, start, d, dmask, x0, y0, w, h, qmask, M * D)
            acc += (a * (1 - lx) * (1 - ly))[:, None] * v
            v = _corner(value_head, start, d, dmask, x0 + 1, y0, w, h, qmask, M * D)
            acc += (a * lx * (1 - ly))[:, None] * v
            v = _corner(value_head, start, d, dmask, x0, y0 + 1, w, h, qmask, M * D)
            acc += (a * (1 - lx) * ly)[:, None] * v
            v = _corner(value_head, start, d, dmask, x0 + 1, y0 + 1, w, h, qmask, M * D)
            acc += (a * lx * ly)[:, None] * v
    out_ptrs = out_ptr + ((n * Lq + q) * M + m)[:, None] * D + d[None, :]
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=qmask[:, None] & dmask[None, :])


@triton.jit
def _scatter_corner(grad_value_ptr, token_base, d, dmask, xx, yy, w, h, qmask, contrib, MD: tl.constexpr):
    ptrs, mask = _corner_ptrs(grad_value_ptr, token_base, d, dmask, xx, yy, w, h, qmask, MD)
    # relaxed: a pure accumulation needs no ordering, and acquire-release atomics are much slower
    tl.atomic_add(ptrs, contrib, mask=mask, sem="relaxed")


@triton.jit
def _ms_deform_attn_bwd(
    value_ptr, shapes_ptr, starts_ptr, loc_ptr, attn_ptr, grad_out_ptr,
    grad_value_ptr, grad_loc_ptr, grad_attn_ptr,
    S, Lq,
    M: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr, L: tl.constexpr, P: tl.constexpr,
    BLOCK_Q: tl.constexpr,
):
    pid_q = tl.program_id(0)
    m = tl.program_id(1)
    n = tl.program_id(2).to(tl.int64)
    q = pid_q * BLOCK_Q + tl.arange(0, BLOCK_Q)
    qmask = q < Lq
    d = tl.arange(0, BLOCK_D)
    dmask = d < D
    sample0 = ((n * Lq + q) * M + m) * (L * P)
    head_offset = n * S * M * D + m * D
    value_head = value_ptr + head_offset
    grad_value_head = grad_value_ptr + head_offset
    go_ptrs = grad_out_ptr + ((n * Lq + q) * M + m)[:, None] * D + d[None, :]
    go = tl.load(go_ptrs, mask=qmask[:, None] & dmask[None, :], other=0.0).to(tl.float32)
    for lvl in tl.static_range(L):
        h = tl.load(shapes_ptr + 2 * lvl)
        w = tl.load(shapes_ptr + 2 * lvl + 1)
        start = tl.load(starts_ptr + lvl).to(tl.int64)
        for pt in tl.static_range(P):
            idx = sample0 + lvl * P + pt
            x0, y0, lx, ly, a = _point(loc_ptr, attn_ptr, idx, qmask, w, h)
            # s_c = <grad_out, value at corner c>; the sample is sum_c w_c v_c with bilinear w_c
            v = _corner(value_head, start, d, dmask, x0, y0, w, h, qmask, M * D)
            s00 = tl.sum(go * v, axis=1)
            v = _corner(value_head, start, d, dmask, x0 + 1, y0, w, h, qmask, M * D)
            s01 = tl.sum(go * v, axis=1)
            v = _corner(value_head, start, d, dmask, x0, y0 + 1, w, h, qmask, M * D)
            s10 = tl.sum(go * v, axis=1)
            v = _corner(value_head, start, d, dmask, x0 + 1, y0 + 1, w, h, qmask, M * D)
            s11 = tl.sum(go * v, axis=1)
            grad_a = (1 - lx) * (1 - ly) * s00 + lx * (1 - ly) * s01 + (1 - lx) * ly * s10 + lx * ly * s11
            # d sample / d x (pixels), then chain rule through x = loc_x * w - 0.5
            dx = (1 - ly) * (s01 - s00) + ly * (s11 - s10)
            dy = (1 - lx) * (s10 - s00) + lx * (s11 - s01)
            tl.store(grad_attn_ptr + idx, grad_a, mask=qmask)
            tl.store(grad_loc_ptr + 2 * idx, a * dx * w, mask=qmask)
            tl.store(grad_loc_ptr + 2 * idx + 1, a * dy * h, mask=qmask)
            _scatter_corner(grad_value_head, start, d, dmask, x0, y0, w, h, qmask,
                            (a * (1 - lx) * (1 - ly))[:, None] * go, M * D)
            _scatter_corner(grad_value_head, start, d, dmask, x0 + 1, y0, w, h, qmask,
                            (a * lx * (1 - ly))[:, None] * go, M * D)
            _scatter_corner(grad_value_head, start, d, dmask, x0, y0 + 1, w, h, qmask,
                            (a * (1 - lx) * ly)[:, None] * go, M * D)
            _scatter_corner(grad_value_head, start, d, dmask, x0 + 1, y0 + 1, w, h, qmask,
                            (a * lx * ly)[:, None] * go, M * D)


@functools.lru_cache(maxsize=64)
def _level_tables_cached(shapes: Tuple[Tuple[int, int], ...], device: torch.device) -> Tuple[torch.Tensor, torch.Tensor]:
    starts, total = [], 0
    for h, w in shapes:
        starts.append(total)
        total += h * w
    return (
        torch.tensor(shapes, dtype=torch.int32, device=device),
        torch.tensor(starts, dtype=torch.int64, device=device),
    )


def _level_tables(shapes: List[Tuple[int, int]], device: torch.device) -> Tuple[torch.Tensor, torch.Tensor]:
    """(L, 2) int32 shapes and (L,) int64 start offsets on ``device``; cached (bounded), as every
    encoder layer of a pass asks for the same ones."""
    return _level_tables_cached(tuple(tuple(s) for s in shapes), device)


def _grid(lq: int, m: int, n: int):
    return (triton.cdiv(lq, _BLOCK_Q), m, n)


class _MSDeformAttnFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, value, shapes, sampling_locations, attention_weights):
        n, s, m, d = value.shape
        _, lq, _, num_levels, num_points, _ = sampling_locations.shape
        shapes_t, starts_t = _level_tables(shapes, value.device)
        value = value.contiguous()
        loc = sampling_locations.float().contiguous()
        attn = attention_weights.contiguous()
        out = value.new_empty(n, lq, m, d)
        if out.numel():
            _ms_deform_attn_fwd[_grid(lq, m, n)](
                value, shapes_t, starts_t, loc, attn, out, s, lq,
                M=m, D=d, BLOCK_D=triton.next_power_of_2(d), L=num_levels, P=num_points, BLOCK_Q=_BLOCK_Q,
            )
        ctx.save_for_backward(value, loc, attn)
        ctx.shapes = shapes
        ctx.loc_dtype = sampling_locations.dtype
        return out.view(n, lq, m * d)

    @staticmethod
    def backward(ctx, grad_out):
        value, loc, attn = ctx.saved_tensors
        n, s, m, d = value.shape
        _, lq, _, num_levels, num_points, _ = loc.shape
        shapes_t, starts_t = _level_tables(ctx.shapes, value.device)
        grad_value = torch.zeros(value.shape, dtype=torch.float32, device=value.device)
        grad_loc = torch.empty(loc.shape, dtype=torch.float32, device=value.device)
        grad_attn = torch.empty(attn.shape, dtype=torch.float32, device=value.device)
        if grad_out.numel():
            _ms_deform_attn_bwd[_grid(lq, m, n)](
                value, shapes_t, starts_t, loc, attn, grad_out.contiguous(), grad_value, grad_loc, grad_attn, s, lq,
                M=m, D=d, BLOCK_D=triton.next_power_of_2(d), L=num_levels, P=num_points, BLOCK_Q=_BLOCK_Q,
            )
        return grad_value.to(value.dtype), None, grad_loc.to(ctx.loc_dtype), grad_attn.to(attn.dtype)


def ms_deform_attn_triton(
    value: torch.Tensor,
    spatial_shapes: List[Tuple[int, int]],
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
) -> torch.Tensor:
    """The deformable-attention core on the fused kernels; (N, Lq, M * D) in ``value``'s dtype.

    value: (N, S, M, D); spatial_shapes: (H, W) per level; sampling_locations: (N, Lq, M, L, P, 2)
    as (x, y) in [0, 1] (read as float32); attention_weights: (N, Lq, M, L, P).
    """
    return _MSDeformAttnFunction.apply(value, [tuple(s) for s in spatial_shapes], sampling_locations, attention_weights)
