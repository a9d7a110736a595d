"""``train_net.py --eval-only``: load MODEL.WEIGHTS into the model and evaluate it on DATASETS.TEST.

The evaluation itself is :func:`eco_m2f.evaluation.testing.do_test`, the code path of periodic
evaluation during training.
"""
from __future__ import annotations

import logging
from typing import Any, Dict

import torch

__all__ = ["evaluate_checkpoint"]

logger = logging.getLogger("eco_m2f.engine")


def evaluate_checkpoint(cfg, args: Any) -> Dict[str, Dict[str, Any]]:
    """``--eval-only``: build the model, load MODEL.WEIGHTS strictly, evaluate on DATASETS.TEST.

    With ``--num-gpus``/``--num-machines`` > 1 Lightning Fabric starts one process per device;
    the test loaders shard the images by rank and the evaluators gather the results.
    """
    from lightning.fabric import Fabric

    from ..architectures import build_model
    from ..checkpoint import load_weights
    from ..evaluation.testing import do_test
    from .devices import select_accelerator

    if not cfg.MODEL.WEIGHTS:
        raise ValueError("--eval-only needs MODEL.WEIGHTS (a .pth/.pkl/.safetensors checkpoint)")
    accelerator = select_accelerator(cfg)
    devices = int(getattr(args, "num_gpus", 1))
    num_nodes = int(getattr(args, "num_machines", 1))
    world_size = devices * num_nodes
    fabric = Fabric(accelerator=accelerator, devices=devices, num_nodes=num_nodes,
                    strategy="ddp" if world_size > 1 else "auto", precision="32-true")
    fabric.launch()
    model = build_model(cfg)
    report = load_weights(model, cfg.MODEL.WEIGHTS)
    logger.info("Loaded MODEL.WEIGHTS %s: %s", cfg.MODEL.WEIGHTS, report)
    model.to(fabric.device)
    model.eval()
    with torch.no_grad():
        return do_test(cfg, model)

