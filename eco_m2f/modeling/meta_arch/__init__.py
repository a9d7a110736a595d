"""Meta-architectures: whole models built from the config by ``MODEL.META_ARCHITECTURE``."""
from .mask_former import MaskFormer  # noqa: F401
from .segmenter import Segmenter  # noqa: F401
from .token_sharing_policy import TokenSharingPolicy  # noqa: F401
