"""The LightningModule that trains any model following the project's call convention.

The model is whatever ``eco_m2f.architectures.build_model(cfg)`` returns: ``model(batched_inputs)``
gives a dict of named scalar losses in training mode. This module calls the model's
``on_train_iteration`` hook before each step (schedules of thresholds, keep ratios, teachers),
sums the losses, hands the optimizer and per-iteration scheduler from ``eco_m2f.solver`` to
Lightning, and applies ``SOLVER.CLIP_GRADIENTS`` after AMP unscaling. It knows nothing about any
one architecture.
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sized
from typing import Any, Callable, Dict, Iterable, Optional

import lightning as L
import torch
import torch.nn as nn

from ..modeling.meta_arch.base import SegmentationModel

__all__ = ["SegmentationModule"]


class SegmentationModule(L.LightningModule):
    """Lightning wrapper of a segmentation model.

    Args:
        cfg: the full config (``SOLVER.*`` drives optimization).
        model: the ``nn.Module`` to train; built with ``build_model(cfg)`` when None.
        train_loader_factory: ``fn(cfg) -> iterable of batches`` (each batch a list of per-image
            dicts); default ``eco_m2f.data.build_detection_train_loader``. Called by Lightning
            after the process group exists, so the loader can shard by rank.

    Checkpoints (Lightning's ``last.ckpt``) hold the model under the ``model.`` prefix; the
    engine's ``model_*.pth`` files hold ``self.model.state_dict()`` with the model's own keys.
    """

    def __init__(
        self,
        cfg,
        model: Optional[nn.Module] = None,
        train_loader_factory: Optional[Callable[[Any], Iterable]] = None,
    ) -> None:
        super().__init__()
        from ..solver import build_gradient_clipper

        self.cfg = cfg
        if model is None:
            from ..architectures import build_model

            model = build_model(cfg)
        self.model = model
        self._train_loader_factory = train_loader_factory
        self._clipper = build_gradient_clipper(cfg)
        # Detached losses and learning rate of the latest training step (read by the metrics
        # writer; the lr is taken before the scheduler steps, i.e. the one this step used).
        self.last_losses: Dict[str, torch.Tensor] = {}
        self.last_lr: float = float("nan")

    def forward(self, batched_inputs: Any) -> Any:
        return self.model(batched_inputs)

    # ------------------------------------------------------------------ training
    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        self.last_lr = self.current_lr()
        if isinstance(self.model, SegmentationModel):
            # global_step counts the optimizer steps done: the 0-based index of this iteration
            self.model.on_train_iteration(int(self.global_step), int(self.cfg.SOLVER.MAX_ITER))
        loss_dict = self.model(batch)
        if not isinstance(loss_dict, Mapping) or len(loss_dict) == 0:
            raise TypeError(
                f"In training mode {type(self.model).__name__}(batched_inputs) must return a non-empty dict of "
                f"scalar losses; got {type(loss_dict).__name__}"
            )
        for name, value in loss_dict.items():
            if not isinstance(value, torch.Tensor) or value.numel() != 1:
                raise TypeError(
                    f"Loss '{name}' of {type(self.model).__name__} must be a scalar tensor; got "
                    f"{type(value).__name__}{tuple(value.shape) if isinstance(value, torch.Tensor) else ''}"
                )
        total = sum(v.reshape(()) for v in loss_dict.values())
        losses = {k: v.detach().reshape(()) for k, v in loss_dict.items()}
        losses["total_loss"] = total.detach()
        self.last_losses = losses
        batch_size = len(batch) if isinstance(batch, Sized) else 1
        self.log("total_loss", losses["total_loss"], prog_bar=True, logger=False, batch_size=batch_size)
        return total

    def configure_optimizers(self) -> Dict[str, Any]:
        from ..solver import build_lr_scheduler, build_optimizer

        optimizer = build_optimizer(self.cfg, self.model)
        scheduler = build_lr_scheduler(self.cfg, optimizer)
        # Stepped after every optimizer step: the schedules are defined per iteration.
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step", "frequency": 1}}

    def configure_gradient_clipping(
        self,
        optimizer: torch.optim.Optimizer,
        gradient_clip_val: Optional[float] = None,
        gradient_clip_algorithm: Optional[str] = None,
    ) -> None:
        """Apply ``SOLVER.CLIP_GRADIENTS`` (Lightning calls this after unscaling AMP gradients)."""
        if gradient_clip_val is not None:
            # Trainer-level clipping was requested too; keep Lightning's behaviour for it.
            self.clip_gradients(optimizer, gradient_clip_val, gradient_clip_algorithm)
        if self._clipper is not None:
            self._clipper([p for group in optimizer.param_groups for p in group["params"]])

    def train_dataloader(self) -> Iterable:
        if self._train_loader_factory is not None:
            return self._train_loader_factory(self.cfg)
        from ..data import build_detection_train_loader

        return build_detection_train_loader(self.cfg)

    # ------------------------------------------------------------------ helpers
    def current_lr(self) -> float:
        """Largest learning rate over the parameter groups (the non-backbone rate)."""
        if self._trainer is None or not self._trainer.optimizers:
            return float("nan")
        optimizer = self._trainer.optimizers[0]
        return max(group["lr"] for group in optimizer.param_groups)

    @staticmethod
    def check_finite(losses: Mapping[str, float], iteration: int) -> None:
        """Stop training with the offending loss named when a loss is NaN or infinite."""
        bad = {k: v for k, v in losses.items() if not math.isfinite(v)}
        if bad:
            raise FloatingPointError(f"Loss became infinite or NaN at iteration={iteration}: {bad}")
