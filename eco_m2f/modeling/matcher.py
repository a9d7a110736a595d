"""Hungarian matching between predicted queries and ground-truth segments (Mask2Former).

Each image's queries are assigned one-to-one to its targets by minimising
``cost_class * (-p(target class)) + cost_mask * BCE + cost_dice * dice``, where the mask terms
are computed on ``num_points`` points sampled uniformly (the same points for predictions and
targets) instead of on whole masks. Unmatched queries are trained towards "no object".
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment

from .point_sampling import point_sample

__all__ = ["HungarianMatcher", "batch_dice_loss", "batch_sigmoid_ce_loss"]


def batch_dice_loss(inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Pairwise dice loss between every prediction and every target.

    Args:
        inputs: ``[Nq, P]`` mask logits.
        targets: ``[Nt, P]`` binary (or soft) target values in ``[0, 1]``.

    Returns:
        ``[Nq, Nt]`` with ``1 - (2 * <sigmoid(x), t> + 1) / (sum sigmoid(x) + sum t + 1)``;
        the +1 keeps an empty target against an empty prediction at zero cost.
    """
    inputs = inputs.sigmoid().flatten(1)
    targets = targets.flatten(1)
    numerator = 2 * torch.einsum("nc,mc->nm", inputs, targets)
    denominator = inputs.sum(-1)[:, None] + targets.sum(-1)[None, :]
    return 1 - (numerator + 1) / (denominator + 1)


def batch_sigmoid_ce_loss(inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Pairwise sigmoid binary cross-entropy averaged over points.

    BCE is linear in the target, so the pairwise matrix is two matrix products of the
    per-point "target = 1" and "target = 0" losses with the targets, never materialising
    ``[Nq, Nt, P]``.

    Args:
        inputs: ``[Nq, P]`` mask logits.
        targets: ``[Nt, P]`` target values in ``[0, 1]``.

    Returns:
        ``[Nq, Nt]``.
    """
    num_points = inputs.shape[1]
    pos = F.binary_cross_entropy_with_logits(inputs, torch.ones_like(inputs), reduction="none")
    neg = F.binary_cross_entropy_with_logits(inputs, torch.zeros_like(inputs), reduction="none")
    loss = torch.einsum("nc,mc->nm", pos, targets) + torch.einsum("nc,mc->nm", neg, 1 - targets)
    return loss / num_points


def _check_targets(targets: Sequence[Mapping[str, Any]], batch_size: int) -> None:
    if len(targets) != batch_size:
        raise ValueError(f"HungarianMatcher: {len(targets)} targets for a batch of {batch_size} predictions")
    for i, t in enumerate(targets):
        for key in ("labels", "masks"):
            if key not in t:
                raise KeyError(f"HungarianMatcher: targets[{i}] has no '{key}' (keys: {sorted(t)})")
        if t["masks"].dim() != 3 or t["masks"].shape[0] != t["labels"].shape[0]:
            raise ValueError(
                f"HungarianMatcher: targets[{i}]: masks must be [N, H, W] with N = len(labels) = "
                f"{t['labels'].shape[0]}, got {tuple(t['masks'].shape)}"
            )


class HungarianMatcher(nn.Module):
    """One-to-one assignment of queries to targets, per image, with point-sampled mask costs.

    Args:
        cost_class: weight of ``-softmax(logits)[target class]``.
        cost_mask: weight of the point-averaged sigmoid BCE.
        cost_dice: weight of the dice loss.
        num_points: uniformly sampled points per image (shared by predictions and targets).
    """

    def __init__(
        self, cost_class: float = 1.0, cost_mask: float = 1.0, cost_dice: float = 1.0, num_points: int = 0
    ) -> None:
        super().__init__()
        if cost_class == 0 and cost_mask == 0 and cost_dice == 0:
            raise ValueError("HungarianMatcher: all costs are 0 (cost_class, cost_mask, cost_dice)")
        if num_points <= 0:
            raise ValueError(f"HungarianMatcher: num_points must be > 0, got {num_points}")
        self.cost_class = cost_class
        self.cost_mask = cost_mask
        self.cost_dice = cost_dice
        self.num_points = num_points

    def cost_matrix(self, pred_logits: torch.Tensor, pred_masks: torch.Tensor, labels: torch.Tensor,
                    masks: torch.Tensor) -> torch.Tensor:
        """Matching cost of one image.

        Args:
            pred_logits: ``[Q, C + 1]``.
            pred_masks: ``[Q, h, w]`` logits.
            labels: ``[N]`` int64.
            masks: ``[N, H, W]`` (any resolution; sampled at the same normalised points).

        Returns:
            ``[Q, N]`` fp32 cost.
        """
        with torch.autocast(device_type=pred_logits.device.type, enabled=False):
            out_prob = pred_logits.float().softmax(-1)  # [Q, C+1]
            # -p(class): 1 - p would give the same assignment; the constant is dropped.
            cost_class = -out_prob[:, labels]  # [Q, N]

            out_mask = pred_masks.float()[:, None]  # [Q, 1, h, w]
            tgt_mask = masks.to(device=out_mask.device, dtype=torch.float32)[:, None]  # [N, 1, H, W]
            point_coords = torch.rand(1, self.num_points, 2, device=out_mask.device)
            tgt_points = point_sample(
                tgt_mask, point_coords.repeat(tgt_mask.shape[0], 1, 1), align_corners=False
            ).squeeze(1)  # [N, P]
            out_points = point_sample(
                out_mask, point_coords.repeat(out_mask.shape[0], 1, 1), align_corners=False
            ).squeeze(1)  # [Q, P]

            cost_mask = batch_sigmoid_ce_loss(out_points, tgt_points)
            cost_dice = batch_dice_loss(out_points, tgt_points)
            return self.cost_mask * cost_mask + self.cost_class * cost_class + self.cost_dice * cost_dice

    @torch.no_grad()
    def forward(
        self, outputs: Mapping[str, torch.Tensor], targets: Sequence[Mapping[str, torch.Tensor]]
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Match every image of the batch.

        Args:
            outputs: ``{"pred_logits": [B, Q, C+1], "pred_masks": [B, Q, h, w]}``.
            targets: per image ``{"labels": int64 [N], "masks": bool/float [N, H, W]}``.

        Returns:
            Per image ``(pred_idx, tgt_idx)``, int64 CPU tensors of length ``min(Q, N)``;
            query ``pred_idx[k]`` is matched to target ``tgt_idx[k]``.
        """
        pred_logits = outputs["pred_logits"]
        pred_masks = outputs["pred_masks"]
        bs, num_queries = pred_logits.shape[:2]
        if pred_masks.shape[:2] != (bs, num_queries):
            raise ValueError(
                f"HungarianMatcher: pred_logits {tuple(pred_logits.shape)} and pred_masks "
                f"{tuple(pred_masks.shape)} disagree on batch/queries"
            )
        _check_targets(targets, bs)
        indices = []
        for b in range(bs):
            labels = targets[b]["labels"].to(pred_logits.device)
            if labels.numel() == 0:
                empty = torch.empty(0, dtype=torch.int64)
                indices.append((empty, empty.clone()))
                continue
            cost = self.cost_matrix(pred_logits[b], pred_masks[b], labels, targets[b]["masks"])
            cost = cost.reshape(num_queries, -1).cpu()
            if not torch.isfinite(cost).all():
                raise FloatingPointError(f"HungarianMatcher: non-finite matching cost in image {b}")
            row, col = linear_sum_assignment(cost.numpy())
            indices.append((torch.as_tensor(row, dtype=torch.int64), torch.as_tensor(col, dtype=torch.int64)))
        return indices

    def extra_repr(self) -> str:
        return (f"cost_class={self.cost_class}, cost_mask={self.cost_mask}, cost_dice={self.cost_dice}, "
                f"num_points={self.num_points}")
