"""Multi-scale deformable attention (Zhu et al., Deformable DETR), as Mask2Former's encoder uses it.

Four pieces:

* ``ms_deform_attn_core_pytorch``: the sampling core written with ``F.grid_sample``
  (bilinear, zero padding, ``align_corners=False``). It runs on any device, needs no
  compiled extension and is the numerical reference for faster kernels.
* the custom op ``eco_m2f::ms_deform_attn`` wrapping that core. It exists so that a JIT
  trace (fvcore's FLOP counter) sees the core as ONE node that a handle can count;
  ``DEFORMABLE_ATTENTION_FLOP_HANDLES`` holds that handle. Eager execution calls the
  core directly so that autograd differentiates through ``grid_sample`` natively
  (the op's own backward recomputes the forward, which training does not need).
* ``ms_deform_attn``: the dispatcher between that core and the fused Triton kernels of
  :mod:`.ms_deform_attn_triton` (``MODEL.SEM_SEG_HEAD.DEFORMABLE_ATTENTION_IMPL``);
* ``MSDeformAttn``: the module, with the official parameter names and initialisation
  (``sampling_offsets``, ``attention_weights``, ``value_proj``, ``output_proj``).
"""
from __future__ import annotations

import functools
import math
import os
from numbers import Number
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = [
    "DEFORMABLE_ATTENTION_FLOP_HANDLES",
    "DEFORMABLE_ATTENTION_IMPLS",
    "DEFORMABLE_ATTENTION_OP_NAME",
    "MSDeformAttn",
    "ms_deform_attn",
    "ms_deform_attn_core_pytorch",
    "ms_deform_attn_flop_count",
    "ms_deform_attn_flop_jit",
    "resolve_impl",
]

SpatialShapes = Union[torch.Tensor, Sequence[Tuple[int, int]]]

DEFORMABLE_ATTENTION_OP_NAME = "eco_m2f::ms_deform_attn"
# Implementations selectable by MODEL.SEM_SEG_HEAD.DEFORMABLE_ATTENTION_IMPL: "pytorch" (the
# grid_sample reference), "triton" (fused kernels of ms_deform_attn_triton.py, CUDA tensors only)
# and "auto" (triton for CUDA tensors when Triton is installed, pytorch otherwise).
DEFORMABLE_ATTENTION_IMPLS = ("auto", "pytorch", "triton")

# Multiply-adds per sampled value and channel: bilinear interpolation reads 4 neighbours
# (4 MACs), the attention weight multiplies the interpolated value into the sum (1 MAC).
_BILINEAR_MACS = 4
_WEIGHTED_SUM_MACS = 1


def _shapes_as_list(spatial_shapes: SpatialShapes) -> List[Tuple[int, int]]:
    """(H, W) per level as Python ints, from an (L, 2) tensor or a sequence of pairs."""
    if isinstance(spatial_shapes, torch.Tensor):
        if spatial_shapes.dim() != 2 or spatial_shapes.shape[1] != 2:
            raise ValueError(f"spatial_shapes must be an (L, 2) tensor, got shape {tuple(spatial_shapes.shape)}")
        return [(int(h), int(w)) for h, w in spatial_shapes.tolist()]
    return [(int(h), int(w)) for h, w in spatial_shapes]


def ms_deform_attn_core_pytorch(
    value: torch.Tensor,
    spatial_shapes: SpatialShapes,
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
) -> torch.Tensor:
    """Sample every head's value map at the given locations and sum them with the attention weights.

    value: (N, S, M, D) with S = sum_l H_l * W_l (levels concatenated in ``spatial_shapes`` order);
    sampling_locations: (N, Lq, M, L, P, 2) as (x, y) in [0, 1] of each level's extent;
    attention_weights: (N, Lq, M, L, P). Returns (N, Lq, M * D) in ``value``'s dtype; mixed
    dtypes (bf16 values, float32 locations) are computed in the wider one.
    """
    shapes = _shapes_as_list(spatial_shapes)
    out_dtype = value.dtype
    compute = torch.promote_types(value.dtype, sampling_locations.dtype)
    value, sampling_locations = value.to(compute), sampling_locations.to(compute)
    attention_weights = attention_weights.to(compute)
    n, s, m, d = value.shape
    _, lq, _, num_levels, num_points, _ = sampling_locations.shape
    if len(shapes) != num_levels:
        raise ValueError(f"spatial_shapes has {len(shapes)} levels, sampling_locations {num_levels}")
    if sum(h * w for h, w in shapes) != s:
        raise ValueError(f"spatial_shapes {shapes} cover {sum(h * w for h, w in shapes)} tokens, value has {s}")
    value_list = value.split([h * w for h, w in shapes], dim=1)
    # grid_sample wants [-1, 1] coordinates of pixel edges (align_corners=False)
    sampling_grids = 2 * sampling_locations - 1
    sampled = []
    for lvl, (h, w) in enumerate(shapes):
        # (N, H*W, M, D) -> (N, H*W, M*D) -> (N, M*D, H*W) -> (N*M, D, H, W)
        value_l = value_list[lvl].flatten(2).transpose(1, 2).reshape(n * m, d, h, w)
        # (N, Lq, M, P, 2) -> (N, M, Lq, P, 2) -> (N*M, Lq, P, 2)
        grid_l = sampling_grids[:, :, :, lvl].transpose(1, 2).flatten(0, 1)
        # (N*M, D, Lq, P)
        sampled.append(F.grid_sample(value_l, grid_l, mode="bilinear", padding_mode="zeros", align_corners=False))
    # (N, Lq, M, L, P) -> (N, M, Lq, L, P) -> (N*M, 1, Lq, L*P)
    weights = attention_weights.transpose(1, 2).reshape(n * m, 1, lq, num_levels * num_points)
    # (N*M, D, Lq, L, P) -> (N*M, D, Lq, L*P) -> sum -> (N, M*D, Lq)
    output = (torch.stack(sampled, dim=-2).flatten(-2) * weights).sum(-1).view(n, m * d, lq)
    return output.transpose(1, 2).contiguous().to(out_dtype)


# --------------------------------------------------------------------------- custom op
@torch.library.custom_op(DEFORMABLE_ATTENTION_OP_NAME, mutates_args=())
def _ms_deform_attn_op(
    value: torch.Tensor,
    spatial_shapes: torch.Tensor,
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
) -> torch.Tensor:
    return ms_deform_attn_core_pytorch(value, spatial_shapes, sampling_locations, attention_weights)


@_ms_deform_attn_op.register_fake
def _ms_deform_attn_op_fake(value, spatial_shapes, sampling_locations, attention_weights):
    n, _, m, d = value.shape
    return value.new_empty(n, sampling_locations.shape[1], m * d)


def _ms_deform_attn_setup_context(ctx, inputs, output) -> None:
    ctx.save_for_backward(*inputs)


def _ms_deform_attn_backward(ctx, grad_output):
    # Recompute the core with autograd on; the op is only used where one node is needed
    # (tracing, future kernels), so the extra forward costs nothing in training.
    value, spatial_shapes, sampling_locations, attention_weights = ctx.saved_tensors
    with torch.enable_grad():
        inputs = [t.detach().requires_grad_(True) for t in (value, sampling_locations, attention_weights)]
        out = ms_deform_attn_core_pytorch(inputs[0], spatial_shapes, inputs[1], inputs[2])
        grads = torch.autograd.grad(out, inputs, grad_output, allow_unused=True)
    return grads[0], None, grads[1], grads[2]


torch.library.register_autograd(
    DEFORMABLE_ATTENTION_OP_NAME, _ms_deform_attn_backward, setup_context=_ms_deform_attn_setup_context
)


def _check_impl(impl: str) -> None:
    if impl not in DEFORMABLE_ATTENTION_IMPLS:
        raise ValueError(
            f"MODEL.SEM_SEG_HEAD.DEFORMABLE_ATTENTION_IMPL='{impl}' is not available; "
            f"choose one of {list(DEFORMABLE_ATTENTION_IMPLS)}"
        )


@functools.lru_cache(maxsize=None)
def _triton_kernel():
    """ms_deform_attn_triton, or None when Triton is not installed (imported once, on first use)."""
    try:
        from .ms_deform_attn_triton import ms_deform_attn_triton
    except ImportError:
        return None
    return ms_deform_attn_triton


def _triton_interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def resolve_impl(impl: str, device: torch.device) -> str:
    """The implementation that ``impl`` means for tensors on ``device``: "pytorch" or "triton".

    "triton" on a device it cannot run on, or without Triton installed, is an error rather than
    a silent fallback; "auto" falls back to "pytorch".
    """
    _check_impl(impl)
    usable = device.type == "cuda" or _triton_interpreted()
    if impl == "auto":
        return "triton" if usable and _triton_kernel() is not None else "pytorch"
    if impl == "triton":
        if _triton_kernel() is None:
            raise RuntimeError(
                "MODEL.SEM_SEG_HEAD.DEFORMABLE_ATTENTION_IMPL='triton' but Triton is not installed; "
                "install it (pip install triton) or use 'auto' / 'pytorch'"
            )
        if not usable:
            raise ValueError(
                f"MODEL.SEM_SEG_HEAD.DEFORMABLE_ATTENTION_IMPL='triton' needs CUDA tensors, got {device.type}; "
                "use 'auto' (picks the kernel on GPU) or 'pytorch'"
            )
    return impl


def ms_deform_attn(
    value: torch.Tensor,
    spatial_shapes: SpatialShapes,
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
    impl: str = "auto",
    use_op: Optional[bool] = None,
) -> torch.Tensor:
    """The deformable-attention core through the chosen implementation; same shapes as the pytorch core.

    ``use_op`` None routes through the custom op only while JIT-tracing (so fvcore counts it);
    the op computes with the reference, and both implementations do the same FLOPs.
    """
    _check_impl(impl)
    if use_op is None:
        use_op = torch.jit.is_tracing()
    if use_op:
        if not isinstance(spatial_shapes, torch.Tensor):
            spatial_shapes = torch.as_tensor(_shapes_as_list(spatial_shapes), dtype=torch.long, device=value.device)
        return _ms_deform_attn_op(value, spatial_shapes, sampling_locations, attention_weights)
    if resolve_impl(impl, value.device) == "triton":
        return _triton_kernel()(value, _shapes_as_list(spatial_shapes), sampling_locations, attention_weights)
    return ms_deform_attn_core_pytorch(value, spatial_shapes, sampling_locations, attention_weights)


# --------------------------------------------------------------------------- FLOPs
def ms_deform_attn_flop_count(
    batch: int, num_queries: int, num_heads: int, head_dim: int, num_levels: int, num_points: int
) -> int:
    """FLOPs (fvcore convention: one multiply-add = one flop) of the sampling core.

    Per query, head, level, point and channel: 4 for the bilinear interpolation, 1 for the
    attention-weighted sum. The linear projections are separate ops that fvcore counts itself.
    """
    per_sample = _BILINEAR_MACS + _WEIGHTED_SUM_MACS
    return batch * num_queries * num_heads * head_dim * num_levels * num_points * per_sample


def ms_deform_attn_flop_jit(inputs: List[Any], outputs: List[Any]) -> Number:
    """fvcore handle for ``eco_m2f::ms_deform_attn`` (inputs: value, spatial_shapes, locations, weights)."""
    from fvcore.nn.jit_handles import get_shape

    n, _, m, d = get_shape(inputs[0])
    _, lq, _, num_levels, num_points, _ = get_shape(inputs[2])
    return ms_deform_attn_flop_count(n, lq, m, d, num_levels, num_points)


# Use as FlopCountAnalysis(model, inputs).set_op_handle(**DEFORMABLE_ATTENTION_FLOP_HANDLES)
DEFORMABLE_ATTENTION_FLOP_HANDLES: Dict[str, Any] = {DEFORMABLE_ATTENTION_OP_NAME: ms_deform_attn_flop_jit}


# --------------------------------------------------------------------------- module
class MSDeformAttn(nn.Module):
    """Multi-scale deformable attention: each query samples n_points per head and level around its reference point."""

    def __init__(
        self,
        d_model: int = 256,
        n_levels: int = 4,
        n_heads: int = 8,
        n_points: int = 4,
        impl: str = "auto",
    ) -> None:
        super().__init__()
        if d_model % n_heads != 0:
            raise ValueError(f"d_model ({d_model}) must be divisible by n_heads ({n_heads})")
        _check_impl(impl)
        self.d_model = d_model
        self.n_levels = n_levels
        self.n_heads = n_heads
        self.n_points = n_points
        self.impl = impl

        self.sampling_offsets = nn.Linear(d_model, n_heads * n_levels * n_points * 2)
        self.attention_weights = nn.Linear(d_model, n_heads * n_levels * n_points)
        self.value_proj = nn.Linear(d_model, d_model)
        self.output_proj = nn.Linear(d_model, d_model)
        self._reset_parameters()

    def _reset_parameters(self) -> None:
        """Official init: offsets start on a ring of directions (one per head), growing with the point index."""
        nn.init.constant_(self.sampling_offsets.weight, 0.0)
        thetas = torch.arange(self.n_heads, dtype=torch.float32) * (2.0 * math.pi / self.n_heads)
        grid_init = torch.stack([thetas.cos(), thetas.sin()], -1)
        # (M, 2) normalised so the larger coordinate is 1 -> (M, L, P, 2)
        grid_init = (grid_init / grid_init.abs().max(-1, keepdim=True)[0]).view(self.n_heads, 1, 1, 2)
        grid_init = grid_init.repeat(1, self.n_levels, self.n_points, 1)
        for i in range(self.n_points):
            grid_init[:, :, i, :] *= i + 1
        with torch.no_grad():
            self.sampling_offsets.bias.copy_(grid_init.view(-1))
        nn.init.constant_(self.attention_weights.weight, 0.0)
        nn.init.constant_(self.attention_weights.bias, 0.0)
        nn.init.xavier_uniform_(self.value_proj.weight)
        nn.init.constant_(self.value_proj.bias, 0.0)
        nn.init.xavier_uniform_(self.output_proj.weight)
        nn.init.constant_(self.output_proj.bias, 0.0)

    def forward(
        self,
        query: torch.Tensor,
        reference_points: torch.Tensor,
        input_flatten: torch.Tensor,
        input_spatial_shapes: SpatialShapes,
        input_level_start_index: Optional[torch.Tensor] = None,
        input_padding_mask: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """Attend from ``query`` to the flattened multi-level ``input_flatten``.

        query: (N, Lq, C); reference_points: (N or 1, Lq, L, 2) as (x, y) in [0, 1], or
        (N or 1, Lq, L, 4) as boxes (cx, cy, w, h); input_flatten: (N, S, C);
        input_spatial_shapes: (L, 2) (H, W) per level; input_padding_mask: (N, S), True = padding.
        ``input_level_start_index`` is accepted for the official signature; levels are contiguous.
        Returns (N, Lq, C).
        """
        n, lq, _ = query.shape
        _, s, _ = input_flatten.shape
        shapes = _shapes_as_list(input_spatial_shapes)
        if len(shapes) != self.n_levels:
            raise ValueError(f"MSDeformAttn built for {self.n_levels} levels, got spatial shapes {shapes}")
        if sum(h * w for h, w in shapes) != s:
            raise ValueError(f"spatial shapes {shapes} do not cover the {s} input tokens")

        value = self.value_proj(input_flatten)
        if input_padding_mask is not None:
            value = value.masked_fill(input_padding_mask[..., None], 0.0)
        # (N, S, C) -> (N, S, M, C/M)
        value = value.view(n, s, self.n_heads, self.d_model // self.n_heads)
        # (N, Lq, M, L, P, 2); locations are kept in float32 whatever autocast does (a bf16
        # location in [0, 1] is only 1/256 precise: half a pixel on a 128-wide level)
        sampling_offsets = self.sampling_offsets(query).float().view(n, lq, self.n_heads, self.n_levels, self.n_points, 2)
        # softmax over all levels and points of a head: (N, Lq, M, L*P) -> (N, Lq, M, L, P)
        attention_weights = self.attention_weights(query).view(n, lq, self.n_heads, self.n_levels * self.n_points)
        attention_weights = F.softmax(attention_weights, -1).view(n, lq, self.n_heads, self.n_levels, self.n_points)

        if reference_points.shape[-1] == 2:
            # offsets are in pixels of each level: divide by (W, H)
            offset_normalizer = torch.tensor([[w, h] for h, w in shapes], dtype=torch.float32, device=sampling_offsets.device)
            sampling_locations = (
                reference_points[:, :, None, :, None, :].float()
                + sampling_offsets / offset_normalizer[None, None, None, :, None, :]
            )
        elif reference_points.shape[-1] == 4:
            sampling_locations = (
                reference_points[:, :, None, :, None, :2].float()
                + sampling_offsets / self.n_points * reference_points[:, :, None, :, None, 2:].float() * 0.5
            )
        else:
            raise ValueError(f"reference_points must end in 2 or 4 coordinates, got {reference_points.shape[-1]}")
        if sampling_locations.shape[0] != n:
            sampling_locations = sampling_locations.expand(n, *sampling_locations.shape[1:])

        output = ms_deform_attn(value, shapes, sampling_locations, attention_weights, impl=self.impl)
        return self.output_proj(output)
