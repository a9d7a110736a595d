"""Choose the evaluators of a dataset for a model's tasks, as Mask2Former's ``train_net.build_evaluator`` does."""
from __future__ import annotations

import os
from typing import Any, Iterable

from .evaluator import DatasetEvaluator, DatasetEvaluators

__all__ = ["build_evaluators"]

_PANOPTIC_TYPES = (
    "coco_panoptic_seg",
    "ade20k_panoptic_seg",
    "cityscapes_panoptic_seg",
    "mapillary_vistas_panoptic_seg",
)


def build_evaluators(
    cfg: Any, dataset_name: str, output_dir: str | os.PathLike | None, tasks: Iterable[str]
) -> DatasetEvaluators:
    """Evaluators for ``dataset_name`` from ``metadata.evaluator_type`` and the model's ``tasks``.

    ``tasks`` is what the model outputs (``SegmentationModel.tasks``: ``sem_seg``,
    ``panoptic_seg``, ``instances``); an evaluator is added when its task is there:

    * ``sem_seg``: mIoU; ``coco``: mask AP.
    * ``coco_panoptic_seg``: PQ; mask AP if the metadata has ``json_file``; mIoU if it has
      ``sem_seg_root``.
    * ``ade20k_panoptic_seg``: mIoU always (as Mask2Former: every model it evaluates there outputs
      ``sem_seg``), PQ, mask AP if ``json_file``.
    * ``cityscapes_panoptic_seg``: cityscapesscripts panoptic / semantic / instance.
    * ``cityscapes_sem_seg``, ``cityscapes_instance``: the corresponding cityscapesscripts evaluator.
    * task ``policy`` (the CTS policy network) on any dataset with semantic labels: the policy's
      superpatch accuracy against targets made from those labels.

    ``output_dir`` None means ``OUTPUT_DIR/inference``. Raises ``NotImplementedError`` when
    nothing applies, naming the evaluator type and the tasks.
    """
    from ..data.catalog import MetadataCatalog

    if output_dir is None:
        output_dir = os.path.join(cfg.OUTPUT_DIR, "inference")
    tasks = frozenset(tasks)
    metadata = MetadataCatalog.get(dataset_name)
    evaluator_type = metadata.get("evaluator_type", None)
    semantic, panoptic, instance = "sem_seg" in tasks, "panoptic_seg" in tasks, "instances" in tasks
    evaluators: list[DatasetEvaluator] = []

    if (evaluator_type == "sem_seg" and semantic) or evaluator_type == "ade20k_panoptic_seg":
        from .semantic import SemSegEvaluator

        evaluators.append(SemSegEvaluator(dataset_name, output_dir=output_dir))
    if evaluator_type == "coco" and instance:
        from .instance import COCOEvaluator

        evaluators.append(COCOEvaluator(dataset_name, output_dir=output_dir))

    if evaluator_type in _PANOPTIC_TYPES and panoptic:
        if evaluator_type == "cityscapes_panoptic_seg":
            from .cityscapes import CityscapesPanopticEvaluator

            evaluators.append(CityscapesPanopticEvaluator(dataset_name, output_dir))
        else:
            from .panoptic import COCOPanopticEvaluator

            evaluators.append(COCOPanopticEvaluator(dataset_name, output_dir))

    if evaluator_type in ("coco_panoptic_seg", "ade20k_panoptic_seg") and instance and metadata.get("json_file", None):
        from .instance import COCOEvaluator

        evaluators.append(COCOEvaluator(dataset_name, output_dir=output_dir))
    if evaluator_type == "coco_panoptic_seg" and semantic and metadata.get("sem_seg_root", None):
        from .semantic import SemSegEvaluator

        evaluators.append(SemSegEvaluator(dataset_name, output_dir=output_dir))

    if evaluator_type in ("cityscapes_sem_seg", "cityscapes_panoptic_seg") and semantic:
        from .cityscapes import CityscapesSemSegEvaluator

        evaluators.append(CityscapesSemSegEvaluator(dataset_name))
    if evaluator_type in ("cityscapes_instance", "cityscapes_panoptic_seg") and instance:
        from .cityscapes import CityscapesInstanceEvaluator

        evaluators.append(CityscapesInstanceEvaluator(dataset_name))

    if "policy" in tasks and (evaluator_type in ("sem_seg", "cityscapes_sem_seg") or metadata.get("sem_seg_root", None)):
        from .policy import PolicyEvaluator

        evaluators.append(PolicyEvaluator.from_config(cfg, dataset_name, output_dir))

    if not evaluators:
        raise NotImplementedError(
            f"no evaluator for dataset {dataset_name!r} with evaluator_type {evaluator_type!r} and the model's "
            f"tasks {sorted(tasks)}"
        )
    return DatasetEvaluators(evaluators)
