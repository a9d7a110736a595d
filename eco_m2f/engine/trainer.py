"""Build and run the Lightning Trainer for any model of the registry.

Outputs in ``OUTPUT_DIR`` (Detectron2's names where it has them):
    config.yaml            the full config of the run
    log.txt                the console log
    metrics.json           one JSON line per logged iteration: iteration, losses, lr, time,
                           data_time, eta_seconds (and one line per evaluation)
    events.out.tfevents.*  TensorBoard scalars (same values as metrics.json)
    last.ckpt              Lightning checkpoint (model, optimizer, scheduler, AMP scaler, loop
                           counters) written every SOLVER.CHECKPOINT_PERIOD, at the end and on
                           SIGTERM; --resume continues from it
    model_{iter:07d}.pth   ``{"model": state_dict, "iteration": iter}``, every CHECKPOINT_PERIOD
                           and on SIGTERM (then the run exits with status 143, as a killed one)
    model_final.pth        the same after SOLVER.MAX_ITER iterations
    inference/<dataset>/   evaluation results (see ``eco_m2f.evaluation.testing.do_test``)

Iterations are numbered as in Detectron2: ``iter`` is the 0-based index of the last finished
iteration, so ``model_0004999.pth`` holds the weights after 5000 optimizer steps.

Models talk to the engine through ``SegmentationModel`` (``eco_m2f.modeling.meta_arch.base``):
``find_unused_parameters`` (DDP looks for parameters without gradient only when a model says
some may have none, e.g. encoder layers past a sampled exit depth), ``on_train_iteration``
(called before every step) and, in evaluation, ``tasks`` and the cost records.
"""
from __future__ import annotations

import logging
import os
import signal
from typing import Any, Callable, Dict, Iterable, List, Optional

import lightning as L
import torch
import torch.nn as nn
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.exceptions import SIGTERMException

from .callbacks import (
    LAST_CHECKPOINT,
    IterationProgressBar,
    MetricsWriter,
    PeriodicCheckpointer,
    PeriodicEvaluator,
    RankSeed,
)
from .devices import select_accelerator, select_precision
from .lightning_module import SegmentationModule

__all__ = ["build_trainer", "train"]

logger = logging.getLogger("eco_m2f.engine")


def _has_batchnorm(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())



def build_trainer(
    cfg,
    args: Any,
    model: nn.Module,
    extra_callbacks: Optional[List[Callback]] = None,
    seed: Optional[int] = None,
) -> L.Trainer:
    """A Lightning Trainer configured from the config and Detectron2's CLI flags.

    ``args`` needs ``num_gpus`` and ``num_machines`` (devices per machine, machines).
    """
    from lightning.pytorch.loggers import TensorBoardLogger
    from lightning.pytorch.strategies import DDPStrategy

    accelerator = select_accelerator(cfg)
    devices = int(getattr(args, "num_gpus", 1))
    num_nodes = int(getattr(args, "num_machines", 1))
    if devices < 1 or num_nodes < 1:
        raise ValueError(f"--num-gpus ({devices}) and --num-machines ({num_nodes}) must be >= 1")
    if accelerator == "gpu" and devices > torch.cuda.device_count():
        raise ValueError(f"--num-gpus {devices} but only {torch.cuda.device_count()} CUDA devices are visible")
    world_size = devices * num_nodes
    find_unused = bool(getattr(model, "find_unused_parameters", False))
    strategy: Any = DDPStrategy(find_unused_parameters=find_unused) if world_size > 1 else "auto"
    output_dir = cfg.OUTPUT_DIR
    max_iter = int(cfg.SOLVER.MAX_ITER)
    callbacks: List[Callback] = [
        MetricsWriter(output_dir, cfg.LOG_PERIOD, max_iter),
        PeriodicCheckpointer(output_dir, cfg.SOLVER.CHECKPOINT_PERIOD, max_iter),
        PeriodicEvaluator(cfg, cfg.TEST.EVAL_PERIOD, max_iter, output_dir),
        IterationProgressBar(refresh_rate=1),
    ]
    if seed is not None:
        callbacks.append(RankSeed(seed))
    callbacks.extend(extra_callbacks or [])
    return L.Trainer(
        accelerator=accelerator,
        devices=devices,
        num_nodes=num_nodes,
        strategy=strategy,
        precision=select_precision(cfg, accelerator),
        sync_batchnorm=world_size > 1 and _has_batchnorm(model),
        max_steps=max_iter,
        max_epochs=-1,
        logger=TensorBoardLogger(save_dir=output_dir, name="", version="", default_hp_metric=False),
        callbacks=callbacks,
        enable_checkpointing=False,  # PeriodicCheckpointer writes Detectron2-style files
        log_every_n_steps=max(1, int(cfg.LOG_PERIOD)),
        use_distributed_sampler=False,  # the project's loaders shard by rank themselves
        num_sanity_val_steps=0,
        limit_val_batches=0,  # evaluation runs through PeriodicEvaluator with the dataset evaluators
        benchmark=bool(cfg.CUDNN_BENCHMARK),
        default_root_dir=output_dir,
        enable_model_summary=True,
    )


def _resolve_seed(cfg) -> int:
    if cfg.SEED >= 0:
        return int(cfg.SEED)
    return int.from_bytes(os.urandom(4), "little") % (2**31 - 2**16)


def train(
    cfg,
    args: Any,
    model: Optional[nn.Module] = None,
    train_loader_factory: Optional[Callable[[Any], Iterable]] = None,
) -> Dict[str, Any]:
    """Train ``MODEL.META_ARCHITECTURE`` for SOLVER.MAX_ITER iterations; returns the final
    evaluation results (``{}`` when DATASETS.TEST is empty).

    ``args.resume``: continue from ``OUTPUT_DIR/last.ckpt`` when it exists (model, optimizer,
    scheduler, AMP scaler and iteration restored; the data stream restarts). Otherwise the model
    starts from ``MODEL.WEIGHTS`` when set (missing/unexpected/mismatched keys are reported, as
    for an ImageNet backbone checkpoint that lacks the heads).
    """
    seed = _resolve_seed(cfg)
    L.seed_everything(seed, workers=True)
    if model is None:
        from ..architectures import build_model

        model = build_model(cfg)
    last = os.path.join(cfg.OUTPUT_DIR, LAST_CHECKPOINT)
    ckpt_path = last if getattr(args, "resume", False) and os.path.isfile(last) else None
    if getattr(args, "resume", False) and ckpt_path is None:
        logger.info("--resume: no %s yet, starting from iteration 0", last)
    if ckpt_path is None and cfg.MODEL.WEIGHTS:
        from ..checkpoint import load_weights

        report = load_weights(
            model, cfg.MODEL.WEIGHTS, allow_missing=True, allow_unexpected=True, allow_shape_mismatch=True
        )
        logger.info("Initialised from MODEL.WEIGHTS %s: %s", cfg.MODEL.WEIGHTS, report)
    elif ckpt_path is not None:
        logger.info("Resuming from %s", ckpt_path)
    module = SegmentationModule(cfg, model, train_loader_factory)
    trainer = build_trainer(cfg, args, model, seed=seed)
    try:
        trainer.fit(module, ckpt_path=ckpt_path, weights_only=True)
    except SIGTERMException:  # a SystemExit of status 0 in Lightning: a stopped run must not look finished
        raise SystemExit(128 + signal.SIGTERM) from None
    except Exception as error:
        if not trainer.received_sigterm:
            raise
        # the same signal stopped the loader's workers: the next batch never comes, and the
        # loader says so before Lightning's own check at the end of the step (the checkpointer
        # has saved the last finished iteration either way)
        logger.info("Stopped by SIGTERM (then %s: %s)", type(error).__name__, error)
        raise SystemExit(128 + signal.SIGTERM) from None
    evaluator = next(c for c in trainer.callbacks if isinstance(c, PeriodicEvaluator))
    return evaluator.last_results
