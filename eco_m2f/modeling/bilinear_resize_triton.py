"""Bilinear resizing (``align_corners=False``) as one Triton kernel that reads the four
neighbours of every output pixel and writes it once.

Why: the interpolation-matrix products of :mod:`.bilinear_resize` spend 64 multiply-adds per
output pixel of a 16x upsampling where two rows and two columns are needed, in float32 without
tensor cores: on one H100 the larger product took 0.52 ms of a Segmenter ViT-S's 17.5 ms batch
of 8 at 1024 x 1024 (``scripts/profile_token_reduction.py``), a cost that no token reduction
removes. Written directly, the resize is bound by writing its output.

One program computes ``BLOCK_W`` output pixels of one output row of one map: the source row
``(y + 0.5) * h / H - 0.5`` clamped at 0, its two neighbour rows (the lower one clamped at the
edge) weighted by the distance, the same for the columns, in float32, as PyTorch's kernel does.
Inference only (no backward); CUDA tensors, or Triton's interpreter (``TRITON_INTERPRET=1``
before triton is imported), which is how the CPU tests check it.
"""
from __future__ import annotations

from typing import Sequence

import torch
import triton
import triton.language as tl

__all__ = ["bilinear_resize_triton"]


@triton.jit
def _bilinear_fwd(x_ptr, out_ptr, h, w, out_h, out_w, scale_h, scale_w, BLOCK_W: tl.constexpr):
    plane = tl.program_id(0).to(tl.int64)  # image x channel
    oy = tl.program_id(1)
    ox = tl.program_id(2) * BLOCK_W + tl.arange(0, BLOCK_W)
    inside = ox < out_w
    sy = tl.maximum((oy.to(tl.float32) + 0.5) * scale_h - 0.5, 0.0)
    y0 = tl.minimum(sy.to(tl.int32), h - 1)  # floor: sy >= 0
    y1 = tl.minimum(y0 + 1, h - 1)
    wy = tl.minimum(sy - y0.to(tl.float32), 1.0)
    sx = tl.maximum((ox.to(tl.float32) + 0.5) * scale_w - 0.5, 0.0)
    x0 = tl.minimum(sx.to(tl.int32), w - 1)
    x1 = tl.minimum(x0 + 1, w - 1)
    wx = tl.minimum(sx - x0.to(tl.float32), 1.0)
    top = x_ptr + plane * h * w + y0 * w
    bottom = x_ptr + plane * h * w + y1 * w
    a = tl.load(top + x0, mask=inside, other=0.0).to(tl.float32)
    b = tl.load(top + x1, mask=inside, other=0.0).to(tl.float32)
    c = tl.load(bottom + x0, mask=inside, other=0.0).to(tl.float32)
    d = tl.load(bottom + x1, mask=inside, other=0.0).to(tl.float32)
    upper = a + (b - a) * wx
    lower = c + (d - c) * wx
    value = upper + (lower - upper) * wy
    tl.store(out_ptr + plane * out_h * out_w + oy * out_w + ox, value.to(out_ptr.dtype.element_ty), mask=inside)


def bilinear_resize_triton(maps: torch.Tensor, size: Sequence[int], block_w: int = 1024) -> torch.Tensor:
    """B x C x h x w -> B x C x H x W in ``maps``' dtype, ``F.interpolate(..., mode="bilinear",
    align_corners=False)`` up to float32 rounding (no gradient)."""
    if maps.dim() != 4:
        raise ValueError(f"bilinear_resize_triton expects B x C x h x w maps, got {tuple(maps.shape)}")
    b, c, h, w = maps.shape
    out_h, out_w = int(size[0]), int(size[1])
    if min(h, w, out_h, out_w) < 1:
        raise ValueError(f"bilinear_resize_triton: sizes must be >= 1, got {(h, w)} -> {(out_h, out_w)}")
    if out_h > 65535:
        raise ValueError(f"bilinear_resize_triton: at most 65535 output rows, got {out_h}")
    x = maps.contiguous()
    out = torch.empty((b, c, out_h, out_w), dtype=maps.dtype, device=maps.device)
    if b * c == 0:
        return out
    block = min(int(block_w), triton.next_power_of_2(out_w))
    grid = (b * c, out_h, triton.cdiv(out_w, block))
    _bilinear_fwd[grid](x, out, h, w, out_h, out_w, h / out_h, w / out_w, BLOCK_W=block, num_warps=4 if block >= 512 else 1)
    return out
