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

from ..utils.device import to_device
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
                    masks: torch.Tensor, point_coords: torch.Tensor | None = None) -> torch.Tensor:
        """Matching cost of one image (the reference that :meth:`batch_costs` computes for all).

        Args:
            pred_logits: ``[Q, C + 1]``.
            pred_masks: ``[Q, h, w]`` logits.
            labels: ``[N]`` int64.
            masks: ``[N, H, W]`` (any resolution; sampled at the same normalised points).
            point_coords: ``[P, 2]`` points in ``[0, 1]``; drawn uniformly when not given.

        Returns:
            ``[Q, N]`` fp32 cost.
        """
        if point_coords is None:
            point_coords = torch.rand(self.num_points, 2, device=pred_masks.device)
        return self._costs(pred_logits[None], pred_masks[None], labels[None], masks[None], point_coords[None])[0]

    def batch_costs(self, pred_logits: torch.Tensor, pred_masks: torch.Tensor,
                    targets: Sequence[Mapping[str, torch.Tensor]], point_coords: torch.Tensor) -> list[torch.Tensor | None]:
        """Matching costs of every image of a batch: ``[Q, N_b]`` per image (None without targets).

        The images' cost matrices are computed together, as batched products over their targets
        padded to the largest count; only sampling each image's target masks runs image by image
        (as many float masks at a time as the reference holds). ``point_coords`` ``[B, P, 2]``
        gives each image its points.
        """
        images = [b for b, t in enumerate(targets) if t["labels"].numel() > 0]
        out: list[torch.Tensor | None] = [None] * len(targets)
        if not images:
            return out
        if len(images) < len(targets):  # drop the images without targets (index copied without a sync)
            rows = to_device(torch.tensor(images), pred_logits.device)
            pred_logits, pred_masks, point_coords = (t.index_select(0, rows) for t in (pred_logits, pred_masks, point_coords))
        counts = [targets[b]["labels"].numel() for b in images]
        width = max(counts)
        labels = torch.stack([F.pad(targets[b]["labels"].to(pred_logits.device), (0, width - n)) for b, n in zip(images, counts)])
        costs = self._costs(pred_logits, pred_masks, labels, [targets[b]["masks"] for b in images], point_coords)
        for g, (b, n) in enumerate(zip(images, counts)):
            out[b] = costs[g, :, :n]
        return out

    def _costs(self, pred_logits: torch.Tensor, pred_masks: torch.Tensor, labels: torch.Tensor,
               masks: Sequence[torch.Tensor], point_coords: torch.Tensor) -> torch.Tensor:
        """``[G, Q, C+1]`` logits, ``[G, Q, h, w]`` mask logits, ``[G, N]`` labels (padded), per image
        its ``[N_g, H_g, W_g]`` targets and ``[G, P, 2]`` points -> ``[G, Q, N]`` fp32 costs (columns
        past an image's N_g are padding)."""
        width = labels.shape[1]
        with torch.autocast(device_type=pred_logits.device.type, enabled=False):
            out_prob = pred_logits.float().softmax(-1)  # [G, Q, C+1]
            # -p(class): 1 - p would give the same assignment; the constant is dropped.
            cost_class = -out_prob.gather(2, labels[:, None, :].expand(-1, out_prob.shape[1], -1))  # [G, Q, N]
            out_points = point_sample(pred_masks.float(), point_coords, align_corners=False)  # [G, Q, P]
            # each image's targets as float at its own size, one image at a time (as the reference)
            tgt_points = torch.cat([
                F.pad(point_sample(m.to(device=out_points.device, dtype=torch.float32)[None], c[None], align_corners=False),
                      (0, 0, 0, width - m.shape[0]))  # [1, N_g, P] -> [1, N, P]
                for m, c in zip(masks, point_coords)
            ])  # [G, N, P]
            num_points = out_points.shape[-1]
            pos = F.binary_cross_entropy_with_logits(out_points, torch.ones_like(out_points), reduction="none")
            neg = F.binary_cross_entropy_with_logits(out_points, torch.zeros_like(out_points), reduction="none")
            cost_mask = (pos @ tgt_points.transpose(1, 2) + neg @ (1 - tgt_points).transpose(1, 2)) / num_points
            sig = out_points.sigmoid()
            numerator = 2 * sig @ tgt_points.transpose(1, 2)
            denominator = sig.sum(-1)[:, :, None] + tgt_points.sum(-1)[:, None, :]
            cost_dice = 1 - (numerator + 1) / (denominator + 1)
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
        point_coords = torch.rand(bs, self.num_points, 2, device=pred_masks.device)  # uniform, per image
        costs = self.batch_costs(pred_logits, pred_masks, targets, point_coords)
        # all cost matrices come to the host in one copy: a copy per image would stop the CPU
        # until the GPU caught up, B times per layer
        present = [c.reshape(-1) for c in costs if c is not None]
        flat = torch.cat(present).cpu() if present else torch.empty(0)
        indices, start = [], 0
        for b, cost in enumerate(costs):
            if cost is None:
                empty = torch.empty(0, dtype=torch.int64)
                indices.append((empty, empty.clone()))
                continue
            block = flat[start:start + cost.numel()].view(num_queries, -1)
            start += cost.numel()
            if not torch.isfinite(block).all():
                raise FloatingPointError(f"HungarianMatcher: non-finite matching cost in image {b}")
            row, col = linear_sum_assignment(block.numpy())
            indices.append((torch.as_tensor(row, dtype=torch.int64), torch.as_tensor(col, dtype=torch.int64)))
        return indices

    def extra_repr(self) -> str:
        return (f"cost_class={self.cost_class}, cost_mask={self.cost_mask}, cost_dice={self.cost_dice}, "
                f"num_points={self.num_points}")
