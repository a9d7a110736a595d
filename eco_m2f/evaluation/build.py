"""Choose the evaluators of a dataset, as Mask2Former's ``train_net.build_evaluator`` does."""
from __future__ import annotations

import os
from typing import Any

from .evaluator import DatasetEvaluator, DatasetEvaluators

__all__ = ["build_evaluators"]

_PANOPTIC_TYPES = (
    "coco_panoptic_seg",
    "ade20k_panoptic_seg",
    "cityscapes_panoptic_seg",
    "mapillary_vistas_panoptic_seg",
)


def build_evaluators(cfg: Any, dataset_name: str, output_dir: str | os.PathLike | None = None) -> DatasetEvaluators:
    """Evaluators for ``dataset_name`` from ``metadata.evaluator_type`` and ``MODEL.MASK_FORMER.TEST.*_ON``.

    * ``sem_seg``: semantic (mIoU); ``coco``: mask AP.
    * ``coco_panoptic_seg``: PQ if PANOPTIC_ON; mask AP if INSTANCE_ON and the metadata has
      ``json_file``; mIoU if SEMANTIC_ON and the metadata has ``sem_seg_root``.
    * ``ade20k_panoptic_seg``: mIoU always (as Mask2Former), PQ if PANOPTIC_ON, mask AP if
      INSTANCE_ON and ``json_file``.
    * ``cityscapes_panoptic_seg``: cityscapesscripts semantic / instance / panoptic as enabled.
    * ``cityscapes_sem_seg``, ``cityscapes_instance``: the corresponding cityscapesscripts evaluator.

    ``output_dir`` defaults to ``OUTPUT_DIR/inference``. Raises ``NotImplementedError`` when
    nothing applies (e.g. every task disabled), naming the evaluator type.
    """
    from ..data.catalog import MetadataCatalog

    if output_dir is None:
        output_dir = os.path.join(cfg.OUTPUT_DIR, "inference")
    metadata = MetadataCatalog.get(dataset_name)
    evaluator_type = metadata.get("evaluator_type", None)
    test = cfg.MODEL.MASK_FORMER.TEST
    evaluators: list[DatasetEvaluator] = []

    if evaluator_type in ("sem_seg", "ade20k_panoptic_seg"):
        from .semantic import SemSegEvaluator

        evaluators.append(SemSegEvaluator(dataset_name, output_dir=output_dir))
    if evaluator_type == "coco":
        from .instance import COCOEvaluator

        evaluators.append(COCOEvaluator(dataset_name, output_dir=output_dir))

    if evaluator_type in _PANOPTIC_TYPES and test.PANOPTIC_ON:
        if evaluator_type == "cityscapes_panoptic_seg":
            from .cityscapes import CityscapesPanopticEvaluator

            evaluators.append(CityscapesPanopticEvaluator(dataset_name, output_dir))
        else:
            from .panoptic import COCOPanopticEvaluator

            evaluators.append(COCOPanopticEvaluator(dataset_name, output_dir))

    if evaluator_type in ("coco_panoptic_seg", "ade20k_panoptic_seg") and test.INSTANCE_ON and metadata.get(
        "json_file", None
    ):
        from .instance import COCOEvaluator

        evaluators.append(COCOEvaluator(dataset_name, output_dir=output_dir))
    if evaluator_type == "coco_panoptic_seg" and test.SEMANTIC_ON and metadata.get("sem_seg_root", None):
        from .semantic import SemSegEvaluator

        evaluators.append(SemSegEvaluator(dataset_name, output_dir=output_dir))

    if evaluator_type == "cityscapes_sem_seg":
        from .cityscapes import CityscapesSemSegEvaluator

        evaluators.append(CityscapesSemSegEvaluator(dataset_name))
    if evaluator_type == "cityscapes_instance":
        from .cityscapes import CityscapesInstanceEvaluator

        evaluators.append(CityscapesInstanceEvaluator(dataset_name))
    if evaluator_type == "cityscapes_panoptic_seg":
        from .cityscapes import CityscapesInstanceEvaluator, CityscapesSemSegEvaluator

        if test.SEMANTIC_ON:
            evaluators.append(CityscapesSemSegEvaluator(dataset_name))
        if test.INSTANCE_ON:
            evaluators.append(CityscapesInstanceEvaluator(dataset_name))

    if not evaluators:
        raise NotImplementedError(
            f"no evaluator for dataset {dataset_name!r} with evaluator_type {evaluator_type!r} and "
            f"MODEL.MASK_FORMER.TEST PANOPTIC_ON={test.PANOPTIC_ON} SEMANTIC_ON={test.SEMANTIC_ON} "
            f"INSTANCE_ON={test.INSTANCE_ON}"
        )
    return DatasetEvaluators(evaluators)
