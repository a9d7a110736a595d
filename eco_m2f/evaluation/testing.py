"""Evaluating a model on every dataset of ``DATASETS.TEST``, and the printed/logged results.

Used by ``train_net.py --eval-only``, by periodic evaluation during training and by the ECO
scripts, so the numbers printed at the end of training, by a later ``--eval-only`` run and in an
exit table are the same code path. The evaluators are those of the dataset and the model's
``tasks`` (:func:`~eco_m2f.evaluation.build.build_evaluators`), plus the efficiency evaluator,
which reports the ``"cost"`` task when the model's outputs carry cost records.
"""
from __future__ import annotations

import json
import logging
import math
import os
from collections import OrderedDict
from typing import Any, Dict, Mapping

import torch
import torch.nn as nn

from ..utils import comm
from ..utils.file_io import atomic_write_text
from ..utils.modules import unwrap_model

__all__ = ["do_test", "flatten_results", "format_results_table"]

logger = logging.getLogger("eco_m2f.engine")


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.3f}"
    return str(value)


def format_results_table(dataset_name: str, results: Mapping[str, Any]) -> str:
    """Per task (``panoptic_seg``, ``sem_seg``, ``segm``...): a table of the summary metrics, a
    table of the per-category ones (``IoU-road``, ``AP-car``...: one row per category), and
    Detectron2's ``copypaste:`` lines of the summary metrics for spreadsheets."""
    from tabulate import tabulate

    lines = [f"Evaluation results for {dataset_name}:"]
    for task, metrics in results.items():
        if not isinstance(metrics, Mapping):
            lines.append(f"{task}: {_fmt(metrics)}")
            continue
        scalars = {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        summary = {k: v for k, v in scalars.items() if "-" not in k}
        per_category: "OrderedDict[str, Dict[str, Any]]" = OrderedDict()
        prefixes: list = []
        for k, v in scalars.items():
            if "-" in k:
                prefix, category = k.split("-", 1)
                if prefix not in prefixes:
                    prefixes.append(prefix)
                per_category.setdefault(category, {})[prefix] = v
        if not scalars:
            continue
        lines.append(f"{task}:")
        if summary:
            lines.append(tabulate([[_fmt(v) for v in summary.values()]], headers=list(summary.keys()),
                                  tablefmt="pipe", stralign="left", disable_numparse=True))
        if per_category:
            rows = [[cat] + [_fmt(vals.get(p, "")) for p in prefixes] for cat, vals in per_category.items()]
            lines.append(tabulate(rows, headers=["category", *prefixes], tablefmt="pipe",
                                  disable_numparse=True))
        if summary:
            lines.append(f"copypaste: Task: {task}")
            lines.append("copypaste: " + ",".join(summary.keys()))
            lines.append("copypaste: " + ",".join(f"{float(v):.4f}" for v in summary.values()))
    return "\n".join(lines)


def _to_json(obj: Any) -> Any:
    if isinstance(obj, Mapping):
        return {str(k): _to_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_to_json(v) for v in obj]
    if isinstance(obj, torch.Tensor):
        return obj.tolist()
    if hasattr(obj, "item") and callable(obj.item):  # numpy scalars
        return obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return str(obj)
    return obj


def flatten_results(results: Mapping[str, Any], prefix: str = "") -> Dict[str, float]:
    """``{"a": {"b": 1.0}}`` -> ``{"a/b": 1.0}`` keeping only numbers (for loggers)."""
    flat: Dict[str, float] = {}
    for k, v in results.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            flat.update(flatten_results(v, key + "/"))
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            flat[key] = float(v)
    return flat


def do_test(cfg, model: nn.Module) -> Dict[str, Dict[str, Any]]:
    """Run ``model`` over every ``DATASETS.TEST`` dataset and score it.

    For each name: ``build_detection_test_loader(cfg, name)`` + ``build_evaluators(cfg, name,
    OUTPUT_DIR/inference/<name>, model.tasks)`` + the efficiency evaluator + ``inference_on_dataset``. On the main process the tables are
    logged and ``OUTPUT_DIR/inference/<name>/results.json`` written. Returns
    ``{dataset_name: {task: {metric: value}}}`` (empty dicts on the other ranks).
    The caller puts the model in eval mode (``inference_on_dataset`` also does).
    """
    from ..data import build_detection_test_loader
    from .build import build_evaluators
    from ..visualization.evaluator import build_visualization_evaluator
    from .efficiency import EfficiencyEvaluator
    from .evaluator import DatasetEvaluators, inference_on_dataset

    net = unwrap_model(model)
    tasks = getattr(net, "tasks", None)
    if tasks is None:
        raise TypeError(f"{type(net).__name__} declares no tasks: models derive from SegmentationModel")
    results: "OrderedDict[str, Dict[str, Any]]" = OrderedDict()
    for name in cfg.DATASETS.TEST:
        out_dir = os.path.join(cfg.OUTPUT_DIR, "inference", name) if cfg.OUTPUT_DIR else None
        if out_dir and comm.is_main_process():
            os.makedirs(out_dir, exist_ok=True)
        loader = build_detection_test_loader(cfg, name)
        evaluators = list(build_evaluators(cfg, name, out_dir, tasks)) + [EfficiencyEvaluator(net)]
        pictures = build_visualization_evaluator(cfg, name, out_dir)  # TEST.VIS_NUM_IMAGES > 0
        evaluator = DatasetEvaluators(evaluators + ([pictures] if pictures is not None else []))
        res = inference_on_dataset(model, loader, evaluator) or {}
        results[name] = dict(res)
        if comm.is_main_process():
            logger.info("\n%s", format_results_table(name, res))
            if out_dir:
                atomic_write_text(os.path.join(out_dir, "results.json"), json.dumps(_to_json(res), indent=2))
    return dict(results)


