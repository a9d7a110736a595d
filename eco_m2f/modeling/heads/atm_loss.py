"""SegViT's loss for one ATM level: query k is class k, so the targets need no matching.

Per image, the classes present in the semantic map (ignore label excluded) are the positives:
their queries' class target is the class, every other query's is "no object" (weight
``no_object_weight`` in the cross-entropy). Each present class's mask logits, upsampled to the
targets' size, meet its binary map (pixels of that class; ignored pixels count as background, as
in SegViT) through the sigmoid focal loss (mean over pixels) and the dice loss, both summed over
masks and divided by the number of present classes over the whole (distributed) batch.
"""
from __future__ import annotations

from typing import Dict

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torchvision.ops import sigmoid_focal_loss

from ..criterion import dice_loss
from .vit_decode_head import resize_logits

__all__ = ["ATMLoss", "present_classes"]


def present_classes(targets: torch.Tensor, num_classes: int, ignore_value: int) -> torch.Tensor:
    """B x H x W labels -> B x K bool: which classes occur in each image (ignore label excluded)."""
    b = targets.shape[0]
    valid = targets != ignore_value
    flat = (targets + num_classes * torch.arange(b, device=targets.device).view(b, 1, 1))[valid]
    return torch.bincount(flat, minlength=b * num_classes).view(b, num_classes) > 0


def _global_mean_count(count: torch.Tensor) -> float:
    """The number of masks averaged over processes (at least 1), as DETR-style losses normalise."""
    count = count.detach().float()
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(count)
        count = count / dist.get_world_size()
    return max(float(count), 1.0)


class ATMLoss(nn.Module):
    """{"loss_ce", "loss_mask", "loss_dice"} of one level, each with its weight applied."""

    def __init__(
        self, num_classes: int, ignore_value: int = 255, class_weight: float = 1.0, mask_weight: float = 20.0,
        dice_weight: float = 1.0, no_object_weight: float = 0.1, focal_alpha: float = 0.25, focal_gamma: float = 2.0,
    ) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.ignore_value = ignore_value
        self.class_weight, self.mask_weight, self.dice_weight = class_weight, mask_weight, dice_weight
        self.focal_alpha, self.focal_gamma = focal_alpha, focal_gamma
        empty_weight = torch.ones(num_classes + 1)
        empty_weight[-1] = no_object_weight
        self.register_buffer("empty_weight", empty_weight, persistent=False)

    def forward(self, pred_logits: torch.Tensor, mask_logits: torch.Tensor, targets: torch.Tensor) -> Dict[str, torch.Tensor]:
        """pred_logits B x K x (K+1), mask_logits B x K x h x w (any size), targets B x H x W."""
        k = self.num_classes
        present = present_classes(targets, k, self.ignore_value)  # B x K
        query_class = torch.arange(k, device=targets.device).expand_as(present)
        class_targets = torch.where(present, query_class, torch.full_like(query_class, k))  # B x K
        loss_ce = F.cross_entropy(pred_logits.transpose(1, 2), class_targets, weight=self.empty_weight.to(pred_logits))

        image, cls = present.nonzero(as_tuple=True)  # M positives
        num_masks = _global_mean_count(present.sum())
        src = resize_logits(mask_logits[image, cls].unsqueeze(1), targets.shape[-2:]).flatten(1)  # M x HW
        tgt = (targets[image] == cls.view(-1, 1, 1)).flatten(1).to(src.dtype)  # M x HW
        focal = sigmoid_focal_loss(src, tgt, alpha=self.focal_alpha, gamma=self.focal_gamma, reduction="none")
        loss_mask = focal.mean(1).sum() / num_masks
        loss_dice = dice_loss(src, tgt, num_masks)
        return {
            "loss_ce": loss_ce * self.class_weight,
            "loss_mask": loss_mask * self.mask_weight,
            "loss_dice": loss_dice * self.dice_weight,
        }
