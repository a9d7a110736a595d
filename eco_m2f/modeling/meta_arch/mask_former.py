"""Mask2Former as a meta-architecture: backbone -> pixel decoder -> masked-attention decoder.

Plain Mask2Former (Cheng et al. 2022), with the official module and key names. ECO-M2F, which
stops the pixel-decoder encoder at a per-image exit, builds on it in ``eco_m2f.eco``
(``ECOMaskFormer``); this class rejects the ECO keys so that a config asking for them fails here
instead of training or evaluating something else.
"""
from __future__ import annotations

from typing import Any, Dict, List, Mapping, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..backbone import build_backbone
from ..criterion import apply_loss_weights, build_criterion
from ..registry import META_ARCH_REGISTRY, SEM_SEG_HEADS_REGISTRY, lookup
from .base import SegmentationModel
from .image_list import ImageList

__all__ = ["MaskFormer"]

# The encoder the README and papers/004 report apart ("enc. GFLOPs"), as a module path.
ENCODER_SCOPE = "sem_seg_head.pixel_decoder.transformer.encoder"


def _eco_keys_set(cfg: Any) -> List[str]:
    """The ECO-M2F keys of ``cfg`` that ask for something plain Mask2Former does not do."""
    on = [("MODEL.ECO.ENABLED", cfg.MODEL.ECO.ENABLED), ("MODEL.ECO.GATE.ENABLED", cfg.MODEL.ECO.GATE.ENABLED),
          ("TEST.ECO.EXIT", cfg.TEST.ECO.EXIT)]
    return [f"{key} {value}" for key, value in on if value]


def _tasks(cfg: Any) -> List[str]:
    test = cfg.MODEL.MASK_FORMER.TEST
    tasks = [t for t, on in (("sem_seg", test.SEMANTIC_ON), ("panoptic_seg", test.PANOPTIC_ON),
                             ("instances", test.INSTANCE_ON)) if on]
    if not tasks:
        raise ValueError(
            "MODEL.MASK_FORMER.TEST.SEMANTIC_ON, PANOPTIC_ON and INSTANCE_ON are all False: "
            "the model would produce no output; turn at least one on"
        )
    return tasks


@META_ARCH_REGISTRY.register()
class MaskFormer(SegmentationModel):
    """Universal segmentation with mask classification (Cheng et al. 2022).

    Tasks: ``MODEL.MASK_FORMER.TEST.{SEMANTIC,PANOPTIC,INSTANCE}_ON``. Eval outputs carry an empty
    cost record (``"cost": {}``): the network's cost depends only on the padded input size.
    """

    #: Subclasses that implement the ``MODEL.ECO`` / ``TEST.ECO`` keys set this to True.
    accepts_eco_config = False

    def __init__(self, cfg: Any) -> None:
        if not self.accepts_eco_config:
            eco = _eco_keys_set(cfg)
            if eco:
                raise ValueError(
                    f"MODEL.META_ARCHITECTURE '{cfg.MODEL.META_ARCHITECTURE}' is plain Mask2Former, but the config "
                    f"sets {', '.join(eco)}: ECO-M2F exits, step A and the gate belong to "
                    "MODEL.META_ARCHITECTURE 'ECOMaskFormer' (config files written by step C before it existed "
                    "say 'MaskFormer': change that line)"
                )
        mf = cfg.MODEL.MASK_FORMER
        backbone = build_backbone(cfg)
        size_divisibility = mf.SIZE_DIVISIBILITY
        if size_divisibility < 0:
            size_divisibility = getattr(backbone, "size_divisibility", 32)
        super().__init__(cfg, size_divisibility=size_divisibility, tasks=_tasks(cfg))
        self.backbone = backbone
        head_cls = lookup(SEM_SEG_HEADS_REGISTRY, cfg.MODEL.SEM_SEG_HEAD.NAME, "MODEL.SEM_SEG_HEAD.NAME")
        self.sem_seg_head = head_cls(cfg, self.backbone.output_shape())
        self.criterion = build_criterion(cfg)
        self.weight_dict: Dict[str, float] = dict(self.criterion.weight_dict)

        self.num_queries = mf.NUM_OBJECT_QUERIES
        self.num_classes = cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES
        self.object_mask_threshold = mf.TEST.OBJECT_MASK_THRESHOLD
        self.overlap_threshold = mf.TEST.OVERLAP_THRESHOLD
        self.semantic_on = "sem_seg" in self.tasks
        self.panoptic_on = "panoptic_seg" in self.tasks
        self.instance_on = "instances" in self.tasks
        self.sem_seg_postprocess_before_inference = (
            mf.TEST.SEM_SEG_POSTPROCESSING_BEFORE_INFERENCE or self.panoptic_on or self.instance_on
        )
        self.test_topk_per_image = cfg.TEST.DETECTIONS_PER_IMAGE
        self._metadata_name = cfg.DATASETS.TRAIN[0] if len(cfg.DATASETS.TRAIN) else None

    # ------------------------------------------------------------------ contract
    def network(self, images: torch.Tensor, cost: Optional[Mapping[str, Any]] = None) -> Dict[str, torch.Tensor]:
        """Backbone + head on a normalised padded batch: the final class and mask logits."""
        out = self.sem_seg_head(self.backbone(images))
        return {"pred_logits": out["pred_logits"], "pred_masks": out["pred_masks"]}

    def flop_scopes(self) -> Dict[str, str]:
        return {"encoder": ENCODER_SCOPE}

    def benchmark_stages(self) -> Dict[str, Tuple[nn.Module, str]]:
        return {"backbone": (self.backbone, "forward"), **self.sem_seg_head.benchmark_stages()}

    # ------------------------------------------------------------------ helpers
    @property
    def thing_ids(self) -> List[int]:
        """Contiguous ids of the thing classes, from the training dataset's metadata."""
        if not hasattr(self, "_thing_ids"):
            ids: List[int] = []
            if self._metadata_name is not None:
                from ...data.catalog import MetadataCatalog

                meta = MetadataCatalog.get(self._metadata_name)
                mapping = meta.get("thing_dataset_id_to_contiguous_id", None)
                if mapping is None and (self.panoptic_on or self.instance_on):
                    raise KeyError(
                        f"Dataset '{self._metadata_name}' has no thing_dataset_id_to_contiguous_id metadata, "
                        "which panoptic/instance inference needs"
                    )
                ids = sorted(mapping.values()) if mapping else []
            self._thing_ids = ids
        return self._thing_ids

    def prepare_targets(self, batched_inputs: List[Dict[str, Any]], images: ImageList) -> List[Dict[str, torch.Tensor]]:
        """Per image: class labels and binary masks padded to the batch's padded size."""
        h_pad, w_pad = images.tensor.shape[-2:]
        targets = []
        for x in batched_inputs:
            inst = x["instances"]
            masks = inst["gt_masks"].to(self.device)
            padded = torch.zeros((masks.shape[0], h_pad, w_pad), dtype=masks.dtype, device=self.device)
            padded[:, : masks.shape[1], : masks.shape[2]] = masks
            targets.append({"labels": inst["gt_classes"].to(self.device), "masks": padded})
        return targets

    def weighted_losses(self, outputs: Dict[str, Any], targets: List[Dict[str, torch.Tensor]]) -> Dict[str, torch.Tensor]:
        """The criterion's losses multiplied by their weights (losses without a weight dropped)."""
        return apply_loss_weights(self.criterion(outputs, targets), self.weight_dict)

    # ------------------------------------------------------------------ forward
    def forward(self, batched_inputs: List[Dict[str, Any]]):
        """Losses in training mode; per-image predictions in eval mode (DESIGN.md section 3)."""
        images = self.preprocess_image(batched_inputs)
        features = self.backbone(images.tensor)
        if self.training:
            return self.losses(features, self.prepare_targets(batched_inputs, images))
        outputs, costs = self.predict(features, images)
        results = self.inference(outputs, batched_inputs, images)
        for result, cost in zip(results, costs):
            result["cost"] = cost
        return results

    def losses(self, features: Dict[str, torch.Tensor], targets: List[Dict[str, torch.Tensor]]) -> Dict[str, torch.Tensor]:
        """The weighted training losses of a batch."""
        return self.weighted_losses(self.sem_seg_head(features), targets)

    def predict(self, features: Dict[str, torch.Tensor], images: ImageList) -> Tuple[Dict[str, Any], List[Dict[str, Any]]]:
        """The head's predictions for a batch in eval mode and one cost record per image."""
        return self.sem_seg_head(features), [{} for _ in images.image_sizes]

    def inference(self, outputs: Dict[str, Any], batched_inputs: List[Dict[str, Any]], images: ImageList) -> List[Dict[str, Any]]:
        """Turn class and mask logits into sem_seg / panoptic_seg / instances at the original size."""
        from ..postprocess import instance_inference, panoptic_inference, sem_seg_postprocess, semantic_inference

        mask_cls_results = outputs["pred_logits"]
        mask_pred_results = F.interpolate(
            outputs["pred_masks"], size=images.tensor.shape[-2:], mode="bilinear", align_corners=False
        )
        processed: List[Dict[str, Any]] = []
        for mask_cls, mask_pred, x, image_size in zip(
            mask_cls_results, mask_pred_results, batched_inputs, images.image_sizes
        ):
            height = x.get("height", image_size[0])
            width = x.get("width", image_size[1])
            result: Dict[str, Any] = {}
            if self.sem_seg_postprocess_before_inference:
                mask_pred = sem_seg_postprocess(mask_pred, image_size, height, width)
                mask_cls = mask_cls.to(mask_pred)
            if self.semantic_on:
                sem = semantic_inference(mask_cls, mask_pred)
                if not self.sem_seg_postprocess_before_inference:
                    sem = sem_seg_postprocess(sem, image_size, height, width)
                result["sem_seg"] = sem
            if self.panoptic_on:
                result["panoptic_seg"] = panoptic_inference(
                    mask_cls,
                    mask_pred,
                    num_classes=self.num_classes,
                    thing_ids=self.thing_ids,
                    object_mask_threshold=self.object_mask_threshold,
                    overlap_threshold=self.overlap_threshold,
                )
            if self.instance_on:
                result["instances"] = instance_inference(
                    mask_cls,
                    mask_pred,
                    num_classes=self.num_classes,
                    test_topk_per_image=self.test_topk_per_image,
                    thing_ids=self.thing_ids if self.panoptic_on else None,
                )
            processed.append(result)
        return processed
