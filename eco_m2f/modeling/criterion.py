"""Mask2Former's set-prediction loss: classification with a down-weighted "no object" class,
plus point-sampled sigmoid BCE and dice on the Hungarian-matched masks, at every decoder layer.

The criterion returns unweighted losses; the caller multiplies each by ``weight_dict[name]``
and drops names absent from it (``apply_loss_weights``), as the official meta-architecture does.
"""
from __future__ import annotations

import itertools
from typing import Any, Mapping, Sequence, Union

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from ..utils import comm
from ..utils.device import to_device
from .matcher import HungarianMatcher
from .point_sampling import (
    calculate_uncertainty,
    get_uncertain_point_coords_with_randomness,
    point_sample,
)

__all__ = [
    "SetCriterion",
    "apply_loss_weights",
    "build_criterion",
    "build_matcher",
    "build_weight_dict",
    "dice_loss",
    "dice_per_mask",
    "sigmoid_ce_loss",
    "sigmoid_ce_per_mask",
]


def dice_per_mask(inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Dice loss of each mask, ``[M]``, from ``[M, P]`` logits and ``[M, P]`` targets in ``[0, 1]``."""
    inputs = inputs.sigmoid().flatten(1)
    targets = targets.flatten(1)
    numerator = 2 * (inputs * targets).sum(-1)
    denominator = inputs.sum(-1) + targets.sum(-1)
    return 1 - (numerator + 1) / (denominator + 1)


def sigmoid_ce_per_mask(inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Sigmoid BCE of each mask averaged over its points, ``[M]`` (shapes as :func:`dice_per_mask`)."""
    return F.binary_cross_entropy_with_logits(inputs, targets, reduction="none").mean(1)


def dice_loss(inputs: torch.Tensor, targets: torch.Tensor, num_masks: float) -> torch.Tensor:
    """Dice loss summed over masks and divided by ``num_masks`` (the batch-wide normaliser).

    Args:
        inputs: ``[M, P]`` logits.
        targets: ``[M, P]`` in ``[0, 1]``.
    """
    return dice_per_mask(inputs, targets).sum() / num_masks


def sigmoid_ce_loss(inputs: torch.Tensor, targets: torch.Tensor, num_masks: float) -> torch.Tensor:
    """Sigmoid BCE averaged over points, summed over masks, divided by ``num_masks``.

    Args:
        inputs: ``[M, P]`` logits.
        targets: ``[M, P]`` in ``[0, 1]``.
    """
    return sigmoid_ce_per_mask(inputs, targets).sum() / num_masks


class _DeviceMatch:
    """A layer's matching as device index tensors, from one non-blocking copy: the matcher's
    CPU indices moved image by image (``.to(device)`` per image, three times per layer) would
    stop the CPU until the GPU caught up at every copy. ``counts`` (targets per image, host)
    adds each match's row among all the batch's targets."""

    def __init__(self, indices: list[tuple[torch.Tensor, torch.Tensor]], device: torch.device,
                 counts: Sequence[int]) -> None:
        if len(counts) != len(indices):
            raise ValueError(f"SetCriterion: {len(indices)} matchings for {len(counts)} images")
        empty = torch.empty(0, dtype=torch.int64)
        src = torch.cat([s for s, _ in indices]) if indices else empty
        tgt = torch.cat([t for _, t in indices]) if indices else empty
        batch = torch.cat([torch.full_like(s, i) for i, (s, _) in enumerate(indices)]) if indices else empty
        starts = torch.tensor([0] + list(itertools.accumulate(counts))[:-1], dtype=torch.int64)
        rows = tgt + starts[batch] if indices else empty  # row among the batch's concatenated targets
        on_device = to_device(torch.stack([batch, src, tgt, rows]).long(), device)  # (4, M)
        self.batch_idx, self.src_idx, self.tgt_row = on_device[0], on_device[1], on_device[3]  # (M,) each
        self.tgt_idx = on_device[2].split([len(s) for s, _ in indices])  # per image (M_i,)
        self.count = int(src.numel())

    @classmethod
    def of(cls, indices: "Matching", targets: Sequence[Mapping[str, torch.Tensor]], device: torch.device) -> "_DeviceMatch":
        return indices if isinstance(indices, cls) else cls(indices, device, [len(t["labels"]) for t in targets])


#: a layer's matching: the matcher's per-image (query, target) CPU indices, or their device form
Matching = Union[list[tuple[torch.Tensor, torch.Tensor]], _DeviceMatch]


def _matched_target_masks(targets: Sequence[Mapping[str, torch.Tensor]], match: _DeviceMatch,
                          device: torch.device) -> torch.Tensor:
    """The matched target masks of the batch in matching order, as fp32 ``[M, 1, H, W]``.

    Images whose masks are smaller than the largest are zero-padded at the bottom/right (where
    the padded image is), so normalised point coordinates stay aligned with the predictions.
    Only the matched masks are converted to float, which bounds the memory by ``M``.
    """
    h = max(t["masks"].shape[-2] for t in targets)
    w = max(t["masks"].shape[-1] for t in targets)
    selected = []
    for t, tgt_idx in zip(targets, match.tgt_idx):
        m = t["masks"][tgt_idx.to(t["masks"].device)].to(device=device, dtype=torch.float32)  # [M_i, H_i, W_i]
        if m.shape[-2:] != (h, w):
            m = F.pad(m, (0, w - m.shape[-1], 0, h - m.shape[-2]))
        selected.append(m)
    return torch.cat(selected)[:, None]


class SetCriterion(nn.Module):
    """Loss of Mask2Former given Hungarian-matched predictions.

    Args:
        num_classes: number of real classes C (logits have C + 1 entries, the last is "no object").
        matcher: a ``HungarianMatcher``.
        weight_dict: loss name -> weight; kept for the caller (see ``apply_loss_weights``).
        eos_coef: class weight of "no object" in the cross-entropy.
        losses: subset of ``["labels", "masks"]``.
        num_points: points sampled per matched mask.
        oversample_ratio: candidates per point for importance sampling.
        importance_sample_ratio: fraction of points chosen by uncertainty.
    """

    _LOSSES = ("labels", "masks")

    def __init__(
        self,
        num_classes: int,
        matcher: nn.Module,
        weight_dict: Mapping[str, float],
        eos_coef: float,
        losses: Sequence[str] = ("labels", "masks"),
        num_points: int = 112 * 112,
        oversample_ratio: float = 3.0,
        importance_sample_ratio: float = 0.75,
    ) -> None:
        super().__init__()
        unknown = [name for name in losses if name not in self._LOSSES]
        if unknown:
            raise ValueError(f"SetCriterion: unknown losses {unknown}; known: {list(self._LOSSES)}")
        if num_classes <= 0:
            raise ValueError(f"SetCriterion: num_classes must be > 0, got {num_classes}")
        if num_points <= 0:
            raise ValueError(f"SetCriterion: num_points must be > 0, got {num_points}")
        self.num_classes = num_classes
        self.matcher = matcher
        self.weight_dict = dict(weight_dict)
        self.eos_coef = eos_coef
        self.losses = list(losses)
        empty_weight = torch.ones(num_classes + 1)
        empty_weight[-1] = eos_coef
        # Persistent: checkpoints of the official model hold "criterion.empty_weight".
        self.register_buffer("empty_weight", empty_weight)
        self.num_points = num_points
        self.oversample_ratio = oversample_ratio
        self.importance_sample_ratio = importance_sample_ratio

    # -- individual losses -------------------------------------------------------------------

    def _target_classes(self, src_logits: torch.Tensor, targets: Sequence[Mapping[str, torch.Tensor]],
                        match: _DeviceMatch) -> torch.Tensor:
        """The class each query is trained towards, ``[B, Q]``: its matched target's, else "no object"."""
        if src_logits.shape[-1] != self.num_classes + 1:
            raise ValueError(
                f"SetCriterion: pred_logits has {src_logits.shape[-1]} classes, expected num_classes + 1 = "
                f"{self.num_classes + 1}"
            )
        device = src_logits.device
        labels = torch.cat([t["labels"] for t in targets]).to(device)  # (N_total,), no copy once on the device
        target_classes = torch.full(src_logits.shape[:2], self.num_classes, dtype=torch.int64, device=device)
        target_classes[match.batch_idx, match.src_idx] = labels[match.tgt_row]
        return target_classes

    def _point_logits_and_labels(self, pred_masks: torch.Tensor, targets: Sequence[Mapping[str, torch.Tensor]],
                                 match: _DeviceMatch) -> tuple[torch.Tensor, torch.Tensor]:
        """Predicted logits and target values ``[M, P]`` of the matched masks at importance-sampled points."""
        device = pred_masks.device
        src_masks = pred_masks[match.batch_idx, match.src_idx].float()[:, None]  # [M, 1, h, w]
        target_masks = _matched_target_masks(targets, match, device)  # [M, 1, H, W]
        with torch.no_grad():
            point_coords = get_uncertain_point_coords_with_randomness(
                src_masks,
                calculate_uncertainty,
                self.num_points,
                self.oversample_ratio,
                self.importance_sample_ratio,
            )  # [M, P, 2]
            point_labels = point_sample(target_masks, point_coords, align_corners=False).squeeze(1)  # [M, P]
        point_logits = point_sample(src_masks, point_coords, align_corners=False).squeeze(1)  # [M, P]
        return point_logits, point_labels

    def loss_labels(self, outputs: Mapping[str, Any], targets: Sequence[Mapping[str, torch.Tensor]],
                    indices: Matching, num_masks: float) -> dict[str, torch.Tensor]:
        """Cross-entropy over C + 1 classes; unmatched queries target "no object" (weight eos_coef)."""
        src_logits = outputs["pred_logits"].float()  # [B, Q, C+1]
        match = _DeviceMatch.of(indices, targets, src_logits.device)
        target_classes = self._target_classes(src_logits, targets, match)
        loss_ce = F.cross_entropy(src_logits.transpose(1, 2), target_classes, self.empty_weight)
        return {"loss_ce": loss_ce}

    def loss_masks(self, outputs: Mapping[str, Any], targets: Sequence[Mapping[str, torch.Tensor]],
                   indices: Matching, num_masks: float) -> dict[str, torch.Tensor]:
        """Sigmoid BCE and dice of matched masks on importance-sampled points."""
        pred_masks = outputs["pred_masks"]  # [B, Q, h, w]
        match = _DeviceMatch.of(indices, targets, pred_masks.device)
        if match.count == 0:
            # No targets anywhere in the batch: keep the graph (DDP) with an exact zero.
            zero = pred_masks.float().sum() * 0.0
            return {"loss_mask": zero, "loss_dice": zero.clone()}
        point_logits, point_labels = self._point_logits_and_labels(pred_masks, targets, match)
        return {
            "loss_mask": sigmoid_ce_loss(point_logits, point_labels, num_masks),
            "loss_dice": dice_loss(point_logits, point_labels, num_masks),
        }

    def _grouped_losses(self, outputs: Mapping[str, Any], targets: Sequence[Mapping[str, torch.Tensor]],
                        match: _DeviceMatch, group: torch.Tensor, num_masks: torch.Tensor) -> dict[str, torch.Tensor]:
        """One layer's losses per group, ``{name: [G]}``: what :meth:`loss_labels` and
        :meth:`loss_masks` give on each group's images alone (``group`` [B] on the device, group
        index of each image; ``num_masks`` [G] each group's normaliser)."""
        num_groups = num_masks.numel()
        out: dict[str, torch.Tensor] = {}

        def per_group(values: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
            return values.new_zeros(num_groups).index_add(0, index, values)

        if "labels" in self.losses:
            src_logits = outputs["pred_logits"].float()  # [B, Q, C+1]
            target_classes = self._target_classes(src_logits, targets, match)  # [B, Q]
            # F.cross_entropy's weighted mean, taken per group: sum of w_y * nll over sum of w_y
            nll = F.cross_entropy(src_logits.transpose(1, 2), target_classes, self.empty_weight, reduction="none")
            weight = self.empty_weight[target_classes]  # [B, Q]
            out["loss_ce"] = per_group(nll.sum(1), group) / per_group(weight.sum(1), group)
        if "masks" in self.losses:
            pred_masks = outputs["pred_masks"]
            if match.count == 0:
                zero = pred_masks.float().sum() * 0.0 + num_masks.new_zeros(num_groups)
                out.update(loss_mask=zero, loss_dice=zero.clone())
            else:
                point_logits, point_labels = self._point_logits_and_labels(pred_masks, targets, match)
                mask_group = group[match.batch_idx]  # (M,)
                out["loss_mask"] = per_group(sigmoid_ce_per_mask(point_logits, point_labels), mask_group) / num_masks
                out["loss_dice"] = per_group(dice_per_mask(point_logits, point_labels), mask_group) / num_masks
        return out

    # -- helpers -------------------------------------------------------------------------------

    def get_loss(self, loss: str, outputs: Mapping[str, Any], targets: Sequence[Mapping[str, torch.Tensor]],
                 indices: Matching, num_masks: float) -> dict[str, torch.Tensor]:
        if loss == "labels":
            return self.loss_labels(outputs, targets, indices, num_masks)
        if loss == "masks":
            return self.loss_masks(outputs, targets, indices, num_masks)
        raise ValueError(f"SetCriterion: unknown loss '{loss}'; known: {list(self._LOSSES)}")

    def get_num_masks(self, targets: Sequence[Mapping[str, torch.Tensor]], device: torch.device) -> float:
        """Target masks per process, averaged over processes, at least 1 (the loss normaliser)."""
        num_masks = float(sum(len(t["labels"]) for t in targets))
        world_size = comm.get_world_size()
        if world_size == 1:
            return max(num_masks, 1.0)  # known on the host: no device round trip
        total = torch.as_tensor([num_masks], dtype=torch.float32, device=device)
        dist.all_reduce(total)
        return torch.clamp(total / world_size, min=1).item()

    def get_num_masks_per_group(self, targets: Sequence[Mapping[str, torch.Tensor]], groups: Sequence[int],
                                all_groups: Sequence[int], device: torch.device) -> torch.Tensor:
        """:meth:`get_num_masks` of each group of ``all_groups``, ``[G]`` on ``device``: one reduction
        over processes for all groups, of the same length on every process."""
        position = {g: j for j, g in enumerate(all_groups)}
        counts = [0.0] * len(all_groups)
        for t, g in zip(targets, groups):
            counts[position[g]] += len(t["labels"])
        total = torch.tensor(counts, dtype=torch.float32)
        world_size = comm.get_world_size()
        if world_size > 1:
            total = total.to(device)
            dist.all_reduce(total)
            total = total / world_size
        return to_device(total.clamp(min=1), device)

    # -- forward -------------------------------------------------------------------------------

    def forward(self, outputs: Mapping[str, Any], targets: Sequence[Mapping[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """Compute every loss for the final prediction and each ``aux_outputs`` entry.

        Args:
            outputs: ``{"pred_logits": [B, Q, C+1], "pred_masks": [B, Q, h, w],
                "aux_outputs": [{"pred_logits", "pred_masks"}, ...]}`` (aux optional).
            targets: per image ``{"labels": int64 [N], "masks": bool/float [N, Hpad, Wpad]}``.

        Returns:
            Unweighted scalar losses: ``loss_ce``, ``loss_mask``, ``loss_dice`` and, for aux
            output ``i``, ``loss_ce_{i}``, ``loss_mask_{i}``, ``loss_dice_{i}``.
        """
        outputs_without_aux = {k: v for k, v in outputs.items() if k != "aux_outputs"}
        device = outputs["pred_logits"].device
        counts = [len(t["labels"]) for t in targets]
        indices = _DeviceMatch(self.matcher(outputs_without_aux, targets), device, counts)
        num_masks = self.get_num_masks(targets, device)

        losses: dict[str, torch.Tensor] = {}
        for loss in self.losses:
            losses.update(self.get_loss(loss, outputs, targets, indices, num_masks))
        for i, aux_outputs in enumerate(outputs.get("aux_outputs", None) or []):
            indices = _DeviceMatch(self.matcher(aux_outputs, targets), device, counts)
            for loss in self.losses:
                l_dict = self.get_loss(loss, aux_outputs, targets, indices, num_masks)
                losses.update({f"{k}_{i}": v for k, v in l_dict.items()})
        return losses

    def forward_groups(self, outputs: Mapping[str, Any], targets: Sequence[Mapping[str, torch.Tensor]],
                       groups: Sequence[int], all_groups: Sequence[int] | None = None) -> dict[int, dict[str, torch.Tensor]]:
        """The losses :meth:`forward` gives on each group's images alone, from one pass over the batch.

        ``groups[b]`` names image b's group (ECO step A: the exit whose prediction it is, so the
        decoder and the criterion run once for all exits). Every term keeps its group's own
        normaliser: the class weights of the group's queries, the group's target masks (averaged
        over processes). ``all_groups`` (default: the groups present) fixes the one reduction over
        processes, so processes with different groups present still reduce alike. Returns
        ``{group: losses}`` for the groups present, the names as :meth:`forward`'s.
        """
        if len(groups) != len(targets):
            raise ValueError(f"SetCriterion.forward_groups: {len(groups)} group ids for {len(targets)} images")
        present = sorted(set(groups))
        all_groups = list(all_groups) if all_groups is not None else present
        missing = [g for g in present if g not in all_groups]
        if missing:
            raise ValueError(f"SetCriterion.forward_groups: groups {missing} are not in all_groups {all_groups}")
        device = outputs["pred_logits"].device
        position = {g: j for j, g in enumerate(all_groups)}
        group = to_device(torch.tensor([position[g] for g in groups], dtype=torch.int64), device)  # (B,)
        num_masks = self.get_num_masks_per_group(targets, groups, all_groups, device)  # (G,)
        counts = [len(t["labels"]) for t in targets]

        per_layer: dict[str, torch.Tensor] = {}
        layers = [{k: v for k, v in outputs.items() if k != "aux_outputs"}, *(outputs.get("aux_outputs", None) or [])]
        for i, layer in enumerate(layers):
            match = _DeviceMatch(self.matcher(layer, targets), device, counts)
            suffix = "" if i == 0 else f"_{i - 1}"
            for name, value in self._grouped_losses(layer, targets, match, group, num_masks).items():
                per_layer[name + suffix] = value
        return {g: {name: value[position[g]] for name, value in per_layer.items()} for g in present}

    def extra_repr(self) -> str:
        return (
            f"num_classes={self.num_classes}, eos_coef={self.eos_coef}, losses={self.losses}, "
            f"num_points={self.num_points}, oversample_ratio={self.oversample_ratio}, "
            f"importance_sample_ratio={self.importance_sample_ratio}, weight_dict={self.weight_dict}"
        )


def build_weight_dict(class_weight: float, mask_weight: float, dice_weight: float, dec_layers: int,
                      deep_supervision: bool) -> dict[str, float]:
    """Loss weights as the official meta-architecture builds them.

    With deep supervision, the ``dec_layers - 1`` auxiliary predictions (the learnable-query
    prediction and all but the last decoder layer) get ``_{i}`` copies of the three weights.
    """
    weight_dict = {"loss_ce": class_weight, "loss_mask": mask_weight, "loss_dice": dice_weight}
    if deep_supervision:
        aux: dict[str, float] = {}
        for i in range(dec_layers - 1):
            aux.update({f"{k}_{i}": v for k, v in weight_dict.items()})
        weight_dict.update(aux)
    return weight_dict


def apply_loss_weights(losses: Mapping[str, torch.Tensor], weight_dict: Mapping[str, float]) -> dict[str, torch.Tensor]:
    """Multiply each loss by its weight; losses without a weight are dropped (official behaviour)."""
    return {k: v * weight_dict[k] for k, v in losses.items() if k in weight_dict}


def build_matcher(cfg) -> HungarianMatcher:
    """``HungarianMatcher`` with the loss weights as costs (as the official configs)."""
    mf = cfg.MODEL.MASK_FORMER
    return HungarianMatcher(
        cost_class=mf.CLASS_WEIGHT,
        cost_mask=mf.MASK_WEIGHT,
        cost_dice=mf.DICE_WEIGHT,
        num_points=mf.TRAIN_NUM_POINTS,
    )


def build_criterion(cfg) -> SetCriterion:
    """``SetCriterion`` from ``MODEL.MASK_FORMER.*`` and ``MODEL.SEM_SEG_HEAD.NUM_CLASSES``."""
    mf = cfg.MODEL.MASK_FORMER
    weight_dict = build_weight_dict(
        mf.CLASS_WEIGHT, mf.MASK_WEIGHT, mf.DICE_WEIGHT, mf.DEC_LAYERS, mf.DEEP_SUPERVISION
    )
    return SetCriterion(
        cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES,
        matcher=build_matcher(cfg),
        weight_dict=weight_dict,
        eos_coef=mf.NO_OBJECT_WEIGHT,
        losses=["labels", "masks"],
        num_points=mf.TRAIN_NUM_POINTS,
        oversample_ratio=mf.OVERSAMPLE_RATIO,
        importance_sample_ratio=mf.IMPORTANCE_SAMPLE_RATIO,
    )
