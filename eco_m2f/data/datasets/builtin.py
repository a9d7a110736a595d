"""Register every builtin dataset (no disk access: loaders and paths resolve when used)."""
from __future__ import annotations

from .ade20k import register_ade20k
from .cityscapes import register_cityscapes
from .coco_panoptic import register_coco_panoptic
from .coco_stuff import register_coco_stuff_10k
from .pascal_context import register_pascal_context_59
from .synthetic import register_synthetic
from .synthetic_semantic import register_synthetic_semantic


def register_all_builtin() -> None:
    """Idempotent: names already in the catalog are skipped."""
    register_coco_panoptic()
    register_cityscapes()
    register_ade20k()
    register_coco_stuff_10k()
    register_pascal_context_59()
    register_synthetic()
    register_synthetic_semantic()


register_all_builtin()
