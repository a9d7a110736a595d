"""Mask-classification inference: semantic, panoptic and instance outputs of one image.

Inputs are one image's class logits ``mask_cls`` (Q, K+1; the last class is "no object")
and mask logits ``mask_pred`` (Q, H, W). The rules are the official MaskFormer ones, so
the outputs match the official evaluators' inputs.
"""
from __future__ import annotations

from typing import Any, Collection, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

__all__ = ["instance_inference", "panoptic_inference", "sem_seg_postprocess", "semantic_inference"]


def sem_seg_postprocess(result: torch.Tensor, img_size: Sequence[int], output_height: int, output_width: int) -> torch.Tensor:
    """Crop the padding off a (C, H_pad, W_pad) prediction and resize it to the original image size.

    img_size: (h, w) of the image inside the padded batch; output size: the original size.
    """
    result = result[:, : img_size[0], : img_size[1]].expand(1, -1, -1, -1)
    return F.interpolate(result, size=(output_height, output_width), mode="bilinear", align_corners=False)[0]


def semantic_inference(mask_cls: torch.Tensor, mask_pred: torch.Tensor) -> torch.Tensor:
    """Per-pixel class scores (K, H, W): sum over queries of class probability x mask probability."""
    probs = F.softmax(mask_cls, dim=-1)[..., :-1]
    return torch.einsum("qc,qhw->chw", probs, mask_pred.sigmoid())


def panoptic_inference(
    mask_cls: torch.Tensor,
    mask_pred: torch.Tensor,
    num_classes: int,
    thing_ids: Collection[int],
    object_mask_threshold: float,
    overlap_threshold: float,
) -> Tuple[torch.Tensor, List[Dict[str, Any]]]:
    """Panoptic map (H, W) int32 (0 = void) and segments_info [{id, isthing, category_id}].

    Queries predicting "no object" or with confidence <= object_mask_threshold are dropped;
    each pixel goes to the query maximising score x mask probability; a query keeps its
    segment only if that leaves at least overlap_threshold of its own (prob >= 0.5) mask;
    segments of the same stuff class are merged. category_id is the contiguous class id.
    """
    scores, labels = F.softmax(mask_cls, dim=-1).max(-1)
    mask_prob = mask_pred.sigmoid()
    keep = labels.ne(num_classes) & (scores > object_mask_threshold)
    cur_scores = scores[keep]
    cur_classes = labels[keep]
    cur_masks = mask_prob[keep]
    cur_prob_masks = cur_scores.view(-1, 1, 1) * cur_masks

    h, w = cur_masks.shape[-2:]
    panoptic_seg = torch.zeros((h, w), dtype=torch.int32, device=cur_masks.device)
    segments_info: List[Dict[str, Any]] = []
    if cur_masks.shape[0] == 0:
        return panoptic_seg, segments_info

    things = {int(t) for t in thing_ids}
    cur_mask_ids = cur_prob_masks.argmax(0)
    stuff_memory: Dict[int, int] = {}
    current_segment_id = 0
    for k in range(cur_classes.shape[0]):
        pred_class = int(cur_classes[k].item())
        isthing = pred_class in things
        owned = cur_mask_ids == k
        own_mask = cur_masks[k] >= 0.5
        mask_area = owned.sum().item()
        original_area = own_mask.sum().item()
        mask = owned & own_mask
        if mask_area > 0 and original_area > 0 and mask.sum().item() > 0:
            if mask_area / original_area < overlap_threshold:
                continue
            if not isthing:
                if pred_class in stuff_memory:
                    panoptic_seg[mask] = stuff_memory[pred_class]
                    continue
                stuff_memory[pred_class] = current_segment_id + 1
            current_segment_id += 1
            panoptic_seg[mask] = current_segment_id
            segments_info.append({"id": current_segment_id, "isthing": bool(isthing), "category_id": pred_class})
    return panoptic_seg, segments_info


def instance_inference(
    mask_cls: torch.Tensor,
    mask_pred: torch.Tensor,
    num_classes: int,
    test_topk_per_image: int,
    thing_ids: Optional[Collection[int]] = None,
) -> Dict[str, torch.Tensor]:
    """Top-k (query, class) pairs as instances: {"pred_masks" (N, H, W) bool, "scores" (N,), "pred_classes" (N,)}.

    score = class probability x mean mask probability inside the binarised (logit > 0) mask.
    With ``thing_ids`` (panoptic models), pairs of stuff classes are dropped after the top-k.
    Instances come in decreasing class probability (the official code leaves the order unspecified).
    """
    num_queries = mask_cls.shape[0]
    scores = F.softmax(mask_cls, dim=-1)[:, :-1]
    if scores.shape[1] != num_classes:
        raise ValueError(f"mask_cls has {scores.shape[1] + 1} classes, expected num_classes + 1 = {num_classes + 1}")
    labels = torch.arange(num_classes, device=mask_cls.device).unsqueeze(0).repeat(num_queries, 1).flatten(0, 1)
    k = min(test_topk_per_image, scores.numel())
    scores_per_image, topk_indices = scores.flatten(0, 1).topk(k, sorted=True)
    labels_per_image = labels[topk_indices]
    query_indices = topk_indices // num_classes
    mask_pred = mask_pred[query_indices]
    if thing_ids is not None:
        things = torch.as_tensor(sorted(int(t) for t in thing_ids), dtype=labels_per_image.dtype, device=labels_per_image.device)
        keep = torch.isin(labels_per_image, things)
        scores_per_image = scores_per_image[keep]
        labels_per_image = labels_per_image[keep]
        mask_pred = mask_pred[keep]
    binary = (mask_pred > 0).float()
    # average mask probability inside the predicted mask
    mask_scores = (mask_pred.sigmoid().flatten(1) * binary.flatten(1)).sum(1) / (binary.flatten(1).sum(1) + 1e-6)
    return {
        "pred_masks": binary.bool(),
        "scores": scores_per_image * mask_scores,
        "pred_classes": labels_per_image,
    }
