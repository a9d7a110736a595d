"""Segmentation heads: Mask2Former's MaskFormerHead and the decode heads of the ViT segmenters."""
from .atm import ATMHead  # noqa: F401
from .mask_former_head import MaskFormerHead  # noqa: F401
from .segmenter_linear import SegmenterLinearHead  # noqa: F401
from .segmenter_mask_transformer import SegmenterMaskTransformerHead  # noqa: F401
from .setr import SETRNaiveHead, SETRPUPHead  # noqa: F401
from .vit_decode_head import ViTDecodeHead  # noqa: F401
