"""Pixel decoders: Mask2Former's multi-scale deformable-attention decoder with ECO-M2F encoder exits."""
from .ms_deform_attn import (  # noqa: F401
    DEFORMABLE_ATTENTION_FLOP_HANDLES,
    DEFORMABLE_ATTENTION_OP_NAME,
    MSDeformAttn,
    ms_deform_attn,
    ms_deform_attn_core_pytorch,
    ms_deform_attn_flop_count,
)
from .msdeform_encoder import EncoderInputs, MSDeformAttnTransformerEncoderOnly  # noqa: F401
from .msdeform_pixel_decoder import MSDeformAttnPixelDecoder  # noqa: F401
from .position_encoding import PositionEmbeddingSine  # noqa: F401
