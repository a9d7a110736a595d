"""Mask2Former as a meta-architecture: backbone -> pixel decoder -> masked-attention decoder.

The same class is the ECO-M2F parent (papers/004): its pixel-decoder encoder can stop after
any layer in ``MODEL.ECO.EXITS``; step A trains every exit, a gate picks one per image.
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..registry import META_ARCH_REGISTRY, SEM_SEG_HEADS_REGISTRY
from .image_list import ImageList


@META_ARCH_REGISTRY.register()
class MaskFormer(nn.Module):
    """Universal segmentation with mask classification (Cheng et al. 2022)."""

    def __init__(self, cfg) -> None:
        super().__init__()
        from .. import build_backbone
        from ..criterion import build_criterion

        self.backbone = build_backbone(cfg)
        head_name = cfg.MODEL.SEM_SEG_HEAD.NAME
        self.sem_seg_head = SEM_SEG_HEADS_REGISTRY.get(head_name)(cfg, self.backbone.output_shape())
        self.criterion = build_criterion(cfg)
        self.weight_dict: Dict[str, float] = dict(self.criterion.weight_dict)

        mf = cfg.MODEL.MASK_FORMER
        self.num_queries = mf.NUM_OBJECT_QUERIES
        self.num_classes = cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES
        self.object_mask_threshold = mf.TEST.OBJECT_MASK_THRESHOLD
        self.overlap_threshold = mf.TEST.OVERLAP_THRESHOLD
        self.semantic_on = mf.TEST.SEMANTIC_ON
        self.panoptic_on = mf.TEST.PANOPTIC_ON
        self.instance_on = mf.TEST.INSTANCE_ON
        self.sem_seg_postprocess_before_inference = (
            mf.TEST.SEM_SEG_POSTPROCESSING_BEFORE_INFERENCE or self.panoptic_on or self.instance_on
        )
        self.test_topk_per_image = cfg.TEST.DETECTIONS_PER_IMAGE
        self.size_divisibility = mf.SIZE_DIVISIBILITY
        if self.size_divisibility < 0:
            self.size_divisibility = getattr(self.backbone, "size_divisibility", 32)
        self.input_format = cfg.INPUT.FORMAT
        self._metadata_name = cfg.DATASETS.TRAIN[0] if len(cfg.DATASETS.TRAIN) else None

        self.register_buffer("pixel_mean", torch.tensor(cfg.MODEL.PIXEL_MEAN).view(-1, 1, 1), False)
        self.register_buffer("pixel_std", torch.tensor(cfg.MODEL.PIXEL_STD).view(-1, 1, 1), False)
        self._init_eco(cfg)

    def _init_eco(self, cfg) -> None:
        """ECO-M2F settings: exits, step-A weights, the gate (papers/004)."""
        from ...eco.stochastic_depth import alpha_weights, validate_exits

        eco = cfg.MODEL.ECO
        num_layers = self.sem_seg_head.num_encoder_layers
        self.eco_exits = validate_exits(eco.EXITS, num_layers)
        self.eco_train = bool(eco.ENABLED)
        self.eco_alpha = alpha_weights(self.eco_exits, eco.ALPHA)
        # Step A leaves encoder layers past the deepest sampled depth without gradient: DDP must allow it.
        self.find_unused_parameters = self.eco_train
        self.test_exit: Optional[int] = int(cfg.TEST.ECO.EXIT) or None
        if self.test_exit is not None and not 1 <= self.test_exit <= num_layers:
            raise ValueError(f"TEST.ECO.EXIT {self.test_exit} is outside 1..{num_layers}")
        self.gate = None
        self.gate_weights_loaded = False
        if eco.GATE.ENABLED:
            from ..gating import ExitGate, load_gate_checkpoint

            self.gate = ExitGate.from_config(cfg, cfg.MODEL.SEM_SEG_HEAD.CONVS_DIM)
            if eco.GATE.WEIGHTS:
                state, _ = load_gate_checkpoint(eco.GATE.WEIGHTS)
                self.gate.load_state_dict(state)
                self.gate_weights_loaded = True
        self._depth_generator: Optional[torch.Generator] = None
        self._seed = int(cfg.SEED)

    def keys_loaded_elsewhere(self) -> set:
        """State-dict keys a checkpoint may lack because the model loaded them itself (MODEL.ECO.GATE.WEIGHTS)."""
        if self.gate is not None and self.gate_weights_loaded:
            return {f"gate.{k}" for k in self.gate.state_dict()}
        return set()

    # ------------------------------------------------------------------ helpers
    @property
    def device(self) -> torch.device:
        return self.pixel_mean.device

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

    def preprocess_image(self, batched_inputs: List[Dict[str, Any]]) -> ImageList:
        """Normalise (RGB/BGR as INPUT.FORMAT) and pad to the size divisibility."""
        images = [x["image"].to(self.device, non_blocking=True) for x in batched_inputs]
        images = [(x.float() - self.pixel_mean) / self.pixel_std for x in images]
        return ImageList.from_tensors(images, self.size_divisibility)

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
        losses = self.criterion(outputs, targets)
        out = {}
        for k, v in losses.items():
            if k in self.weight_dict:
                out[k] = v * self.weight_dict[k]
        return out

    # ------------------------------------------------------------------ forward
    def forward(self, batched_inputs: List[Dict[str, Any]], exit_layer: Optional[int] = None):
        """Losses in training mode; per-image predictions in eval mode (DESIGN.md section 3).

        In eval mode the encoder depth is, in order of precedence: ``exit_layer``, TEST.ECO.EXIT,
        the gate's choice per image (MODEL.ECO.GATE.ENABLED), full depth.
        """
        images = self.preprocess_image(batched_inputs)
        features = self.backbone(images.tensor)
        if self.training:
            targets = self.prepare_targets(batched_inputs, images)
            if self.eco_train:
                return self.stochastic_depth_losses(features, targets)
            return self.weighted_losses(self.sem_seg_head(features), targets)

        exit_layer = exit_layer if exit_layer is not None else self.test_exit
        if exit_layer is None and self.gate is not None:
            inputs = self.sem_seg_head.pixel_decoder.project_inputs(features)
            exits = self.gate.choose(self._pooled_s1(inputs.s1, images))
            outputs = self.sem_seg_head.forward_per_image_exit(features, exits, inputs=inputs)
            results = self.inference(outputs, batched_inputs, images)
            for r, k in zip(results, exits.tolist()):
                r["eco_exit"] = int(k)
            return results
        outputs = self.sem_seg_head(features, exit_layer=exit_layer)
        results = self.inference(outputs, batched_inputs, images)
        depth = exit_layer if exit_layer is not None else self.sem_seg_head.num_encoder_layers
        for r in results:
            r["eco_exit"] = int(depth)
        return results

    def extra_evaluators(self) -> list:
        """Evaluators of the model itself, run beside the dataset's: exits taken and GFLOPs spent."""
        from ...evaluation.efficiency import EfficiencyEvaluator

        return [EfficiencyEvaluator(self)]

    # ------------------------------------------------------------------ ECO-M2F
    def stochastic_depth_losses(self, features: Dict[str, torch.Tensor], targets: List[Dict[str, torch.Tensor]]) -> Dict[str, torch.Tensor]:
        """Step A (papers/004 Eq. 3): per image a depth K_i; every exit k <= K_i adds alpha_k L_k.

        The encoder runs once, cumulatively, up to the deepest sampled depth; at each exit the
        shared transformer decoder sees only the images whose K_i reaches it.
        """
        from ...eco.stochastic_depth import combine_exit_losses, sample_depths

        if self._depth_generator is None:
            from ...utils.comm import get_rank

            # one stream per process, so the images of different GPUs draw independent depths
            base = self._seed if self._seed >= 0 else torch.initial_seed() % 2**62
            self._depth_generator = torch.Generator()
            self._depth_generator.manual_seed(base + 1000003 * get_rank())
        depths = sample_depths(len(targets), self.eco_exits, self._depth_generator)
        needed = [k for k in self.eco_exits if k <= int(depths.max())]
        decoded = self.sem_seg_head.pixel_decoder.forward_features_multi_exit(features, needed)
        exit_losses: Dict[int, Dict[str, torch.Tensor]] = {}
        counts: Dict[int, int] = {}
        for k, (mask_features, _, multi_scale) in decoded.items():
            keep = (depths >= k).nonzero().flatten().tolist()
            counts[k] = len(keep)
            idx = torch.as_tensor(keep, device=mask_features.device)
            outputs = self.sem_seg_head.predictor(
                [x.index_select(0, idx) for x in multi_scale], mask_features.index_select(0, idx)
            )
            exit_losses[k] = self.weighted_losses(outputs, [targets[i] for i in keep])
        return combine_exit_losses(exit_losses, counts, len(targets), self.eco_alpha)

    @staticmethod
    def _pooled_s1(s1: torch.Tensor, images: ImageList) -> torch.Tensor:
        """z(s1) averaged over each image's own tokens, not the batch's padding.

        (s1 comes after the input projection's GroupNorm, which sees the padding, as in the
        official model; step B and evaluation both run at batch 1, so their z agree exactly.)
        """
        from ..gating import ExitGate

        h_pad, w_pad = images.tensor.shape[-2:]
        _, _, h5, w5 = s1.shape
        valid = torch.zeros((s1.shape[0], h5, w5), dtype=torch.bool, device=s1.device)
        for i, (h, w) in enumerate(images.image_sizes):
            valid[i, : -(-h * h5 // h_pad), : -(-w * w5 // w_pad)] = True  # ceil: partly covered tokens count
        return ExitGate.pool(s1, valid)

    @torch.no_grad()
    def gate_input(self, batched_inputs: List[Dict[str, Any]]) -> torch.Tensor:
        """z(s1) [B, CONVS_DIM]: the pooled res5 level after input projection (the gate's input)."""
        images = self.preprocess_image(batched_inputs)
        features = self.backbone(images.tensor)
        return self._pooled_s1(self.sem_seg_head.pixel_decoder.project_inputs(features).s1, images)

    @torch.no_grad()
    def forward_all_exits(
        self, batched_inputs: List[Dict[str, Any]], exits: List[int]
    ) -> Tuple[Dict[int, List[Dict[str, Any]]], torch.Tensor]:
        """Step B: predictions at every exit from ONE backbone + cumulative encoder pass, and z(s1)."""
        images = self.preprocess_image(batched_inputs)
        features = self.backbone(images.tensor)
        inputs = self.sem_seg_head.pixel_decoder.project_inputs(features)
        z = self._pooled_s1(inputs.s1, images)
        decoded = self.sem_seg_head.pixel_decoder.forward_features_multi_exit(features, exits, inputs=inputs)
        results = {}
        for k, (mask_features, _, multi_scale) in decoded.items():
            outputs = self.sem_seg_head.predictor(multi_scale, mask_features)
            results[k] = self.inference(outputs, batched_inputs, images)
        return results, z

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
