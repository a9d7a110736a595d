"""Transformer decoders: Mask2Former's masked-attention decoder."""
from .masked_attention_decoder import MultiScaleMaskedTransformerDecoder  # noqa: F401
