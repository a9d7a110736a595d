"""GFLOPs of a segmentation network with fvcore, total and pixel-decoder encoder.

Counted on the network proper (backbone + head on the padded, normalised image), as the
papers report it; post-processing into panoptic/instance outputs is excluded. fvcore does
not know the deformable-attention op, so its handle is registered here.
"""
from __future__ import annotations

import logging
from typing import Any, Dict, Hashable, Optional, Tuple

import torch
import torch.nn as nn

logger = logging.getLogger(__name__)

ENCODER_SCOPE = "sem_seg_head.pixel_decoder.transformer.encoder"


class _NetworkOnly(nn.Module):
    """Backbone + head of a MaskFormer-style model, from a padded normalised image tensor."""

    def __init__(self, model: nn.Module, exit_layer: Optional[int]) -> None:
        super().__init__()
        self.model = model
        self.exit_layer = exit_layer

    def forward(self, images: torch.Tensor):
        features = self.model.backbone(images)
        out = self.model.sem_seg_head(features, exit_layer=self.exit_layer)
        return out["pred_logits"], out["pred_masks"]


def flop_handles() -> Dict[str, Any]:
    """fvcore op handles for the project's custom ops (deformable attention)."""
    from ..modeling.pixel_decoder.ms_deform_attn import DEFORMABLE_ATTENTION_FLOP_HANDLES

    return dict(DEFORMABLE_ATTENTION_FLOP_HANDLES)


def count_network_flops(model: nn.Module, images: torch.Tensor, exit_layer: Optional[int] = None) -> Dict[str, float]:
    """GFLOPs of one forward pass on ``images`` (B x 3 x H x W, already padded), per image.

    Returns {"total": ..., "encoder": ...} in GFLOPs (fvcore counts one fused multiply-add as one flop,
    the convention of Detectron2 and Mask2Former's reports).
    """
    from fvcore.nn import FlopCountAnalysis

    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            analysis = FlopCountAnalysis(_NetworkOnly(model, exit_layer), (images,))
            analysis.set_op_handle(**flop_handles())
            analysis.unsupported_ops_warnings(False)
            analysis.uncalled_modules_warnings(False)
            total = analysis.total()
            by_module = analysis.by_module()
            encoder = by_module.get("model." + ENCODER_SCOPE, 0)
    finally:
        model.train(was_training)
    batch = images.shape[0]
    return {"total": total / batch / 1e9, "encoder": encoder / batch / 1e9}


class FlopCache:
    """GFLOPs per (padded input size, exit): the network's cost depends on nothing else.

    Averaging over a dataset then needs one fvcore trace per distinct (size, exit), not per image.
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self._cache: Dict[Hashable, Dict[str, float]] = {}

    def get(self, padded_hw: Tuple[int, int], exit_layer: Optional[int]) -> Dict[str, float]:
        key = (int(padded_hw[0]), int(padded_hw[1]), exit_layer)
        if key not in self._cache:
            device = next(self.model.parameters()).device
            images = torch.zeros((1, 3, key[0], key[1]), device=device)
            self._cache[key] = count_network_flops(self.model, images, exit_layer)
        return self._cache[key]
