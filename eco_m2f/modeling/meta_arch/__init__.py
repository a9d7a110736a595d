"""Meta-architectures: whole models built from the config by ``MODEL.META_ARCHITECTURE``."""
from .mask_former import MaskFormer  # noqa: F401
from .segmenter import Segmenter  # noqa: F401
