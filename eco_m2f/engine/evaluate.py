"""Evaluation of a model on every dataset of ``DATASETS.TEST`` with the dataset's evaluators.

Used both by ``train_net.py --eval-only`` and by periodic evaluation during training, so the
numbers printed at the end of training and by a later ``--eval-only`` run are the same code path.
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

__all__ = ["do_test", "format_results_table", "evaluate_checkpoint"]

logger = logging.getLogger("eco_m2f.engine")


def _is_main_process() -> bool:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank() == 0
    return True


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


def _unwrap(model: nn.Module) -> nn.Module:
    """The user's model inside DDP / Lightning wrappers."""
    while hasattr(model, "module") and isinstance(model.module, nn.Module):
        model = model.module
    return model


def do_test(cfg, model: nn.Module) -> Dict[str, Dict[str, Any]]:
    """Run ``model`` over every ``DATASETS.TEST`` dataset and score it.

    For each name: ``build_detection_test_loader(cfg, name)`` + ``build_evaluators(cfg, name,
    OUTPUT_DIR/inference/<name>)`` + ``inference_on_dataset``. On the main process the tables are
    logged and ``OUTPUT_DIR/inference/<name>/results.json`` written. Returns
    ``{dataset_name: {task: {metric: value}}}`` (empty dicts on the other ranks).
    The caller puts the model in eval mode (``inference_on_dataset`` also does).
    """
    from eco_m2f.data import build_detection_test_loader
    from eco_m2f.evaluation import DatasetEvaluators, build_evaluators, inference_on_dataset

    results: "OrderedDict[str, Dict[str, Any]]" = OrderedDict()
    for name in cfg.DATASETS.TEST:
        out_dir = os.path.join(cfg.OUTPUT_DIR, "inference", name) if cfg.OUTPUT_DIR else None
        if out_dir and _is_main_process():
            os.makedirs(out_dir, exist_ok=True)
        loader = build_detection_test_loader(cfg, name)
        evaluator = build_evaluators(cfg, name, out_dir)
        # A model may bring evaluators of its own (e.g. exits taken and GFLOPs spent); the engine
        # only runs them beside the dataset's.
        extra = getattr(_unwrap(model), "extra_evaluators", None)
        if callable(extra):
            evaluator = DatasetEvaluators(list(evaluator) + list(extra()))
        res = inference_on_dataset(model, loader, evaluator) or {}
        results[name] = dict(res)
        if _is_main_process():
            logger.info("\n%s", format_results_table(name, res))
            if out_dir:
                path = os.path.join(out_dir, "results.json")
                with open(path + ".tmp", "w") as f:
                    json.dump(_to_json(res), f, indent=2)
                os.replace(path + ".tmp", path)
    return dict(results)


def evaluate_checkpoint(cfg, args: Any) -> Dict[str, Dict[str, Any]]:
    """``--eval-only``: build the model, load MODEL.WEIGHTS strictly, evaluate on DATASETS.TEST.

    With ``--num-gpus``/``--num-machines`` > 1 Lightning Fabric starts one process per device;
    the test loaders shard the images by rank and the evaluators gather the results.
    """
    from lightning.fabric import Fabric

    from .trainer import select_accelerator

    if not cfg.MODEL.WEIGHTS:
        raise ValueError("--eval-only needs MODEL.WEIGHTS (a .pth/.pkl/.safetensors checkpoint)")
    accelerator = select_accelerator(cfg)
    devices = int(getattr(args, "num_gpus", 1))
    num_nodes = int(getattr(args, "num_machines", 1))
    world_size = devices * num_nodes
    fabric = Fabric(accelerator=accelerator, devices=devices, num_nodes=num_nodes,
                    strategy="ddp" if world_size > 1 else "auto", precision="32-true")
    fabric.launch()
    from eco_m2f.checkpoint import load_weights
    from eco_m2f.modeling import build_model

    model = build_model(cfg)
    report = load_weights(model, cfg.MODEL.WEIGHTS)
    logger.info("Loaded MODEL.WEIGHTS %s: %s", cfg.MODEL.WEIGHTS, report)
    model.to(fabric.device)
    model.eval()
    with torch.no_grad():
        return do_test(cfg, model)
