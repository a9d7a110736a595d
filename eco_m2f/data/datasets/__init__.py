"""Builtin datasets (COCO panoptic, COCO-Stuff-10k, Cityscapes, ADE20K, PASCAL-Context 59, synthetic panoptic and
semantic); importing registers them."""
from . import builtin  # noqa: F401  (registers the builtin datasets)
from .synthetic import ensure_synthetic_dataset, generate_synthetic_dataset  # noqa: F401
from .synthetic_semantic import ensure_synthetic_semantic_dataset, generate_synthetic_semantic_dataset  # noqa: F401
