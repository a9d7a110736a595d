"""Builtin datasets (COCO panoptic, Cityscapes, ADE20K, synthetic); importing registers them."""
from . import builtin  # noqa: F401  (registers the builtin datasets)
from .synthetic import ensure_synthetic_dataset, generate_synthetic_dataset  # noqa: F401
