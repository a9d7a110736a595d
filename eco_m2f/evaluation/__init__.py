"""Evaluators (PQ, mIoU, mask AP, Cityscapes, the CTS policy, cost), the inference loop and FLOPs, with Detectron2's conventions.

Submodules load on first use (``eco_m2f.evaluation.SemSegEvaluator`` imports
``.semantic``), so pycocotools / cityscapesscripts load only when needed. Label PNGs are read
with ``eco_m2f.data.io``, the project's one reader of dataset files.
"""
from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "build_evaluators": "build",
    "EfficiencyEvaluator": "efficiency",
    "FlopCounter": "flops",
    "count_flops": "flops",
    "do_test": "testing",
    "DatasetEvaluator": "evaluator",
    "DatasetEvaluators": "evaluator",
    "inference_on_dataset": "evaluator",
    "inference_context": "evaluator",
    "COCOPanopticEvaluator": "panoptic",
    "PQStat": "pq",
    "PQStatCat": "pq",
    "pq_single_image": "pq",
    "pq_for_model_output": "pq",
    "panoptic_categories": "pq",
    "pq_compute": "pq_compute",
    "pq_compute_per_image": "pq_compute",
    "SemSegEvaluator": "semantic",
    "confusion_matrix": "semantic",
    "sem_seg_metrics": "semantic",
    "COCOEvaluator": "instance",
    "CityscapesSemSegEvaluator": "cityscapes",
    "CityscapesInstanceEvaluator": "cityscapes",
    "CityscapesPanopticEvaluator": "cityscapes",
    "PolicyEvaluator": "policy",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = list(_LAZY)
