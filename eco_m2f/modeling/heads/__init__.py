"""Segmentation heads: pixel decoder + transformer decoder (Mask2Former's MaskFormerHead)."""
from .mask_former_head import MaskFormerHead  # noqa: F401
