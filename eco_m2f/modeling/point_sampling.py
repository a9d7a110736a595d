"""Point sampling on mask logits (PointRend's trick, used by Mask2Former's matcher and loss).

Mask2Former never compares whole masks: predictions live at 1/4 of the padded input while
targets live at full padded resolution. Both are sampled at the same points given in
normalised ``[0, 1] x [0, 1]`` coordinates, so the resolution difference disappears and the
loss costs ``O(num_points)`` per mask instead of ``O(H * W)``.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

__all__ = [
    "point_sample",
    "calculate_uncertainty",
    "get_uncertain_point_coords_with_randomness",
]


def point_sample(input: torch.Tensor, point_coords: torch.Tensor, **kwargs) -> torch.Tensor:
    """Bilinearly sample ``input`` at points given in ``[0, 1]`` image coordinates.

    A thin wrapper of ``F.grid_sample`` (which wants ``[-1, 1]``) with Detectron2's semantics:
    ``(0, 0)`` is the top-left corner of the top-left pixel and ``(1, 1)`` the bottom-right
    corner of the bottom-right pixel when ``align_corners=False`` (the default here).
    Coordinates are ``(x, y)``.

    Args:
        input: ``[N, C, H, W]``.
        point_coords: ``[N, P, 2]`` or ``[N, Hgrid, Wgrid, 2]``.
        **kwargs: forwarded to ``F.grid_sample`` (``align_corners``, ``mode``, ``padding_mode``).

    Returns:
        ``[N, C, P]`` or ``[N, C, Hgrid, Wgrid]``.
    """
    if input.dim() != 4:
        raise ValueError(f"point_sample: input must be [N, C, H, W], got shape {tuple(input.shape)}")
    if point_coords.shape[-1] != 2 or point_coords.dim() not in (3, 4):
        raise ValueError(
            f"point_sample: point_coords must be [N, P, 2] or [N, Hg, Wg, 2], got {tuple(point_coords.shape)}"
        )
    if point_coords.shape[0] != input.shape[0]:
        raise ValueError(
            f"point_sample: batch sizes differ (input {input.shape[0]}, point_coords {point_coords.shape[0]})"
        )
    kwargs.setdefault("align_corners", False)
    flat = point_coords.dim() == 3
    if flat:
        point_coords = point_coords.unsqueeze(2)  # [N, P, 2] -> [N, P, 1, 2]
    grid = 2.0 * point_coords.to(input.dtype) - 1.0
    output = F.grid_sample(input, grid, **kwargs)
    if flat:
        output = output.squeeze(3)  # [N, C, P, 1] -> [N, C, P]
    return output


def calculate_uncertainty(logits: torch.Tensor) -> torch.Tensor:
    """Uncertainty of binary mask logits: ``-|logit|`` (highest at the decision boundary).

    Args:
        logits: ``[R, 1, ...]`` class-agnostic mask logits.
    """
    if logits.shape[1] != 1:
        raise ValueError(f"calculate_uncertainty expects one channel, got shape {tuple(logits.shape)}")
    return -torch.abs(logits)


def get_uncertain_point_coords_with_randomness(
    coarse_logits: torch.Tensor,
    uncertainty_func: Callable[[torch.Tensor], torch.Tensor],
    num_points: int,
    oversample_ratio: float,
    importance_sample_ratio: float,
) -> torch.Tensor:
    """Pick ``num_points`` points per mask, biased towards uncertain regions (PointRend training).

    ``int(num_points * oversample_ratio)`` candidates are drawn uniformly; the
    ``int(importance_sample_ratio * num_points)`` most uncertain of them (by ``uncertainty_func``
    on the bilinearly sampled logits) are kept and the rest is filled with fresh uniform points.

    Args:
        coarse_logits: ``[N, 1, H, W]`` (one channel, class-agnostic) or ``[N, C, H, W]`` where
            ``uncertainty_func`` reduces to ``[N, 1, P]``.
        uncertainty_func: maps sampled logits ``[N, C, P]`` to uncertainties ``[N, 1, P]``.
        num_points: points per mask.
        oversample_ratio: >= 1.
        importance_sample_ratio: in ``[0, 1]``.

    Returns:
        ``[N, num_points, 2]`` coordinates in ``[0, 1]``, on ``coarse_logits``' device.
    """
    if oversample_ratio < 1:
        raise ValueError(f"oversample_ratio must be >= 1, got {oversample_ratio}")
    if not 0 <= importance_sample_ratio <= 1:
        raise ValueError(f"importance_sample_ratio must be in [0, 1], got {importance_sample_ratio}")
    num_boxes = coarse_logits.shape[0]
    device = coarse_logits.device
    num_sampled = int(num_points * oversample_ratio)
    point_coords = torch.rand(num_boxes, num_sampled, 2, device=device)
    point_logits = point_sample(coarse_logits, point_coords, align_corners=False)
    # Uncertainty is computed on the sampled logits rather than on the coarse grid, so that two
    # nearby candidates with the same coarse value are not systematically preferred.
    point_uncertainties = uncertainty_func(point_logits)  # [N, 1, num_sampled]
    num_uncertain = int(importance_sample_ratio * num_points)
    num_random = num_points - num_uncertain
    idx = torch.topk(point_uncertainties[:, 0, :], k=num_uncertain, dim=1)[1]  # [N, num_uncertain]
    idx = idx + num_sampled * torch.arange(num_boxes, dtype=torch.long, device=device)[:, None]
    point_coords = point_coords.view(-1, 2)[idx.view(-1), :].view(num_boxes, num_uncertain, 2)
    if num_random > 0:
        point_coords = torch.cat(
            [point_coords, torch.rand(num_boxes, num_random, 2, device=device)], dim=1
        )
    return point_coords
