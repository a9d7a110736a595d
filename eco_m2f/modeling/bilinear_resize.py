"""Bilinear resizing as two small matrix products (``align_corners=False``, no antialiasing).

``F.interpolate(..., mode="bilinear")`` runs one CUDA thread per output pixel that loops over
every channel of every image; upsampling a Segmenter's 16-class logits from 64 x 64 to
1024 x 1024 for a batch of 8 takes it about 1.2 ms on an H200, some 20 times what writing the
output costs. Bilinear interpolation is separable: every output row mixes two input rows and
every output column two input columns, with the same weights as PyTorch's kernel. So
``out = R_h @ x @ R_w^T`` with interpolation matrices R (out x in, two non-zeros per row),
batched over images and channels: two GEMMs. They remain the path on the CPU and wherever a
gradient is needed; in CUDA inference one Triton kernel (:mod:`.bilinear_resize_triton`) reads
the four neighbours of every output pixel instead, bound by writing the output, where the
products spend 64 multiply-adds per pixel of a 16x upsampling in float32.
"""
from __future__ import annotations

import functools
import importlib.util
from collections import OrderedDict
from typing import Sequence, Tuple

import torch

__all__ = ["bilinear_resize", "interpolation_matrix"]

#: Recently used matrices. Bounded: evaluating a dataset of many image sizes (ADE20K) would
#: otherwise keep two matrices per size on the device for good.
_MATRICES: "OrderedDict[Tuple[int, int, torch.device, torch.dtype], torch.Tensor]" = OrderedDict()
MAX_CACHED = 64


def interpolation_matrix(size_in: int, size_out: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """(size_out, size_in) weights of 1-D linear interpolation as ``F.interpolate`` computes them
    with ``align_corners=False`` and no scale factor: source ``(o + 0.5) * in / out - 0.5``,
    clamped at 0, its two neighbours weighted by distance (the right one clamped at the edge)."""
    if size_in < 1 or size_out < 1:
        raise ValueError(f"interpolation sizes must be >= 1, got {size_in} -> {size_out}")
    key = (int(size_in), int(size_out), torch.device(device), dtype)
    if key in _MATRICES:
        _MATRICES.move_to_end(key)
    else:
        scale = size_in / size_out
        source = ((torch.arange(size_out, dtype=torch.float64) + 0.5) * scale - 0.5).clamp(min=0)
        left = source.floor().long().clamp(max=size_in - 1)
        right = (left + 1).clamp(max=size_in - 1)
        weight = (source - left.double()).clamp(max=1)
        m = torch.zeros(size_out, size_in, dtype=torch.float64)
        rows = torch.arange(size_out)
        m.index_put_((rows, left), 1 - weight, accumulate=True)
        m.index_put_((rows, right), weight, accumulate=True)
        _MATRICES[key] = m.to(device=device, dtype=dtype)
        while len(_MATRICES) > MAX_CACHED:
            _MATRICES.popitem(last=False)
    return _MATRICES[key]


@functools.lru_cache(maxsize=None)
def _triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def _triton_applies(maps: torch.Tensor) -> bool:
    """CUDA maps without a gradient to track, and triton installed."""
    return maps.is_cuda and not (torch.is_grad_enabled() and maps.requires_grad) and _triton_available()


def bilinear_resize(maps: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """B x C x h x w -> B x C x H x W, equal to ``F.interpolate(maps, size, mode="bilinear",
    align_corners=False)`` up to the rounding of a different summation order (the Triton
    kernel in CUDA inference, the interpolation matrices elsewhere)."""
    if maps.dim() != 4:
        raise ValueError(f"bilinear_resize expects B x C x h x w maps, got {tuple(maps.shape)}")
    b, c, h, w = maps.shape
    out_h, out_w = int(size[0]), int(size[1])
    if not maps.is_floating_point():
        raise ValueError(f"bilinear_resize needs floating-point maps, got {maps.dtype}")
    if _triton_applies(maps):
        from .bilinear_resize_triton import bilinear_resize_triton

        return bilinear_resize_triton(maps, (out_h, out_w))
    rows = interpolation_matrix(h, out_h, maps.device, maps.dtype)  # H x h
    cols = interpolation_matrix(w, out_w, maps.device, maps.dtype)  # W x w
    # in the maps' own dtype, as F.interpolate (autocast would cast float32 maps down)
    with torch.autocast(maps.device.type, enabled=False):
        x = torch.matmul(maps.reshape(b * c, h, w), cols.t())  # (B*C) x h x W
        x = torch.matmul(rows, x)  # (B*C) x H x W
    return x.view(b, c, out_h, out_w)
