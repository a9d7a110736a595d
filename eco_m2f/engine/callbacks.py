"""The engine's Lightning callbacks: progress, metrics, checkpoints, periodic evaluation, seeds.

Outputs in ``OUTPUT_DIR`` (Detectron2's names where it has them): ``metrics.json`` (one JSON line
per logged iteration, and one per evaluation), TensorBoard scalars, ``last.ckpt`` (full training
state for --resume), ``model_{iter:07d}.pth`` and ``model_final.pth``. Iterations are numbered
as in Detectron2: ``iter`` is the 0-based index of the last finished iteration.
"""
from __future__ import annotations

import json
import logging
import os
import signal
import statistics
import threading
import time
from collections import deque
from typing import Any, Deque, Dict, Optional

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, TQDMProgressBar

from ..evaluation.testing import do_test, flatten_results
from ..utils import comm
from ..utils.file_io import atomic_torch_save
from .lightning_module import SegmentationModule

__all__ = [
    "LAST_CHECKPOINT",
    "IterationProgressBar",
    "MetricsWriter",
    "PeriodicCheckpointer",
    "PeriodicEvaluator",
    "RankSeed",
]

logger = logging.getLogger("eco_m2f.engine")

LAST_CHECKPOINT = "last.ckpt"


def _iteration(trainer: "L.Trainer") -> int:
    """Detectron2's iteration index of the step that just finished."""
    return trainer.global_step - 1


def _optimizer_step_in_progress(trainer: "L.Trainer") -> bool:
    """Whether an optimizer step (with its forward and backward) had started and not finished."""
    loop = trainer.fit_loop.epoch_loop
    if trainer.lightning_module.automatic_optimization:
        progress = loop.automatic_optimization.optim_progress.optimizer.step.total
    else:
        progress = loop.manual_optimization.optim_step_progress.total
    return progress.ready > progress.completed


def _ignore_signal(signum, frame) -> None:
    """A Python-level handler that does nothing."""


def _append_json_line(path: str, record: Dict[str, Any]) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(record, sort_keys=False) + "\n")
        f.flush()


def _gather_mean(values: Dict[str, float]) -> Dict[str, float]:
    """Mean of each scalar over the ranks that reported it (ranks may report different losses)."""
    if comm.get_world_size() == 1:
        return values
    gathered = comm.all_gather(values)
    sums: Dict[str, float] = {}
    counts: Dict[str, int] = {}
    for d in gathered:
        for k, v in (d or {}).items():
            sums[k] = sums.get(k, 0.0) + v
            counts[k] = counts.get(k, 0) + 1
    return {k: sums[k] / counts[k] for k in values.keys() | sums.keys()}



class IterationProgressBar(TQDMProgressBar):
    """TQDM bar counting iterations towards SOLVER.MAX_ITER (the training "epoch" is infinite),
    so it shows the rate and the remaining time; on resume it starts at the restored iteration."""

    def _count_iterations(self, trainer: "L.Trainer") -> None:
        bar = self.train_progress_bar
        if bar is None:
            return
        bar.initial = 0  # reset() refreshes: keep n >= initial at every refresh
        bar.reset(total=trainer.max_steps if trainer.max_steps > 0 else None)
        bar.initial = trainer.global_step  # rate and ETA count only this run's iterations
        bar.n = trainer.global_step
        bar.set_description("iter")
        bar.refresh()

    def on_train_start(self, trainer: "L.Trainer", *args: Any) -> None:
        super().on_train_start(trainer, *args)
        self._count_iterations(trainer)  # a resumed run restarts mid-epoch: no epoch-start hook

    def on_train_epoch_start(self, trainer: "L.Trainer", *_: Any) -> None:
        # Not the parent's: it would reset the bar to the epoch's (infinite) batch count.
        if self._leave:
            self.train_progress_bar = self.init_train_tqdm()
        self._count_iterations(trainer)

    def on_train_batch_end(self, trainer: "L.Trainer", pl_module: "L.LightningModule", outputs: Any,
                           batch: Any, batch_idx: int) -> None:
        bar = self.train_progress_bar
        if bar is None:
            return
        n = trainer.global_step
        if self._should_update(n, bar.total) or n == trainer.max_steps:
            bar.n = n
            bar.set_postfix(self.get_metrics(trainer, pl_module), refresh=False)
            bar.refresh()


class MetricsWriter(Callback):
    """Every ``period`` iterations (and at the last): losses averaged over ranks, lr, timing and
    ETA to ``metrics.json``, TensorBoard and the log. Raises on NaN/inf losses.

    ``time``/``data_time`` are medians over the last ``period`` iterations (Detectron2's smoothing);
    ``eta_seconds`` uses the median iteration time of up to 1000 recent iterations, so slow
    iterations spent on checkpoints or evaluation do not skew it.
    """

    def __init__(self, output_dir: str, period: int, max_iter: int) -> None:
        self.path = os.path.join(output_dir, "metrics.json") if output_dir else ""
        self.period = max(1, int(period))
        self.max_iter = max_iter
        self._iter_times: Deque[float] = deque(maxlen=1000)
        self._data_times: Deque[float] = deque(maxlen=1000)
        self._prev_end: Optional[float] = None
        self._start: float = 0.0

    def on_train_start(self, trainer: "L.Trainer", pl_module: "L.LightningModule") -> None:
        self._prev_end = time.perf_counter()
        logger.info("Starting training from iteration %d (max %d)", trainer.global_step, self.max_iter)

    def on_train_batch_start(self, trainer: "L.Trainer", pl_module: "L.LightningModule", batch: Any,
                             batch_idx: int) -> None:
        self._start = time.perf_counter()
        if self._prev_end is not None:
            self._data_times.append(self._start - self._prev_end)

    def on_train_batch_end(self, trainer: "L.Trainer", pl_module: "L.LightningModule", outputs: Any,
                           batch: Any, batch_idx: int) -> None:
        now = time.perf_counter()
        if self._prev_end is not None:
            self._iter_times.append(now - self._prev_end)
        self._prev_end = now
        step = trainer.global_step
        if step % self.period != 0 and step != self.max_iter:
            return
        iteration = _iteration(trainer)
        losses = {k: float(v) for k, v in getattr(pl_module, "last_losses", {}).items()}
        SegmentationModule.check_finite(losses, iteration)
        losses = _gather_mean(losses)
        window = list(self._iter_times)[-self.period:] or [0.0]
        data_window = list(self._data_times)[-self.period:] or [0.0]
        eta = statistics.median(self._iter_times or [0.0]) * max(0, self.max_iter - step)
        optimizer = trainer.optimizers[0]
        record: Dict[str, Any] = {"iteration": iteration}
        record.update(losses)
        record["lr"] = float(getattr(pl_module, "last_lr", max(g["lr"] for g in optimizer.param_groups)))
        record["time"] = statistics.median(window)
        record["data_time"] = statistics.median(data_window)
        record["eta_seconds"] = eta
        if torch.cuda.is_available() and pl_module.device.type == "cuda":
            record["max_mem_mb"] = torch.cuda.max_memory_allocated(pl_module.device) / 2**20
        if not trainer.is_global_zero:
            return
        if self.path:
            _append_json_line(self.path, record)
        if trainer.logger is not None:
            trainer.logger.log_metrics({k: v for k, v in record.items() if k != "iteration"}, step=iteration)
        loss_str = "  ".join(f"{k}: {v:.4g}" for k, v in losses.items())
        logger.info(
            "eta: %s  iter: %d  %s  time: %.4f  data_time: %.4f  lr: %.3g",
            time.strftime("%H:%M:%S", time.gmtime(eta)) if eta < 86400 else f"{eta / 86400:.1f}d",
            iteration, loss_str, record["time"], record["data_time"], record["lr"],
        )


class PeriodicCheckpointer(Callback):
    """Every ``period`` iterations: ``last.ckpt`` (full training state, for --resume) then
    ``model_{iter:07d}.pth``; after the last iteration ``last.ckpt`` and ``model_final.pth``; on
    SIGTERM both at the last finished iteration. Files are written to a temporary name and
    renamed, so a kill never leaves a torn file."""

    def __init__(self, output_dir: str, period: int, max_iter: int) -> None:
        self.output_dir = output_dir
        self.period = int(period)
        self.max_iter = max_iter
        self._training_started = False
        self._sigterm_before_setup: Any = None

    def _save_state(self, trainer: "L.Trainer") -> None:
        path = os.path.join(self.output_dir, LAST_CHECKPOINT)
        tmp = path + ".tmp"
        trainer.save_checkpoint(tmp, weights_only=False)  # collective; rank 0 writes
        if trainer.is_global_zero:
            os.replace(tmp, path)

    def _write_model(self, trainer: "L.Trainer", pl_module: "L.LightningModule", name: str) -> None:
        """Rank 0 writes ``name``: the model's weights and the iteration."""
        if trainer.is_global_zero:
            state = {k: v.detach().cpu() for k, v in pl_module.model.state_dict().items()}
            atomic_torch_save({"model": state, "iteration": _iteration(trainer)}, os.path.join(self.output_dir, name))

    def _save_model(self, trainer: "L.Trainer", pl_module: "L.LightningModule", name: str) -> None:
        self._write_model(trainer, pl_module, name)
        trainer.strategy.barrier("eco_m2f_checkpoint")

    def on_train_batch_end(self, trainer: "L.Trainer", pl_module: "L.LightningModule", outputs: Any,
                           batch: Any, batch_idx: int) -> None:
        step = trainer.global_step
        if self.period > 0 and step % self.period == 0 and step < self.max_iter:
            self._save_state(trainer)
            name = f"model_{_iteration(trainer):07d}.pth"
            self._save_model(trainer, pl_module, name)
            logger.info("Saved checkpoint %s and %s at iteration %d", LAST_CHECKPOINT, name, _iteration(trainer))

    def setup(self, trainer: "L.Trainer", pl_module: "L.LightningModule", stage: str) -> None:
        """Until training starts, SIGTERM stops the run at once with status 143: there is nothing
        to keep yet, and Lightning's own handler, registered after this one and chaining it,
        would wait for the end of the first step, after the dataset is loaded (or generated)."""
        if threading.current_thread() is not threading.main_thread():
            return
        self._training_started = False
        self._sigterm_before_setup = previous = signal.getsignal(signal.SIGTERM)

        def before_training(signum, frame) -> None:
            if self._training_started:
                return  # from here on the checkpointer's own handler and Lightning's decide
            logger.info("SIGTERM before the first iteration: stopped, nothing to save")
            raise SystemExit(128 + signal.SIGTERM)

        if previous is not signal.SIG_IGN:
            signal.signal(signal.SIGTERM, before_training)

    def teardown(self, trainer: "L.Trainer", pl_module: "L.LightningModule", stage: str) -> None:
        if self._sigterm_before_setup is not None and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, self._sigterm_before_setup)
            self._sigterm_before_setup = None

    def on_train_start(self, trainer: "L.Trainer", pl_module: "L.LightningModule") -> None:
        """Chain a SIGTERM handler before Lightning's: a process group's SIGTERM (``timeout``, a
        scheduler) also stops the loader's workers, and the loader's SIGCHLD handler would then
        raise at any point of the step in progress, possibly inside the optimizer's update. With
        SIGCHLD ignored the step finishes and Lightning stops the run at its end."""
        self._training_started = True
        if not hasattr(signal, "SIGCHLD") or threading.current_thread() is not threading.main_thread():
            return
        previous = signal.getsignal(signal.SIGTERM)

        def on_sigterm(signum, frame) -> None:
            signal.signal(signal.SIGCHLD, _ignore_signal)  # not SIG_DFL: a pending SIGCHLD would print a warning
            if callable(previous):
                previous(signum, frame)

        signal.signal(signal.SIGTERM, on_sigterm)

    def on_exception(self, trainer: "L.Trainer", pl_module: "L.LightningModule", exception: BaseException) -> None:
        """On SIGTERM (a time bound, a preemption) keep the iterations since the last period:
        ``last.ckpt`` and ``model_{iter:07d}.pth`` of the last finished iteration, unless the run
        stopped inside an optimizer step (its parameters may be half updated: nothing is written).
        With several processes only rank 0's weights are written, without a barrier (another rank
        may be gone), and ``last.ckpt`` stays that of the last period."""
        step = trainer.global_step
        if not trainer.received_sigterm or step == 0 or step >= self.max_iter:
            return
        if self.period > 0 and step % self.period == 0:
            return  # this iteration's checkpoint is already written
        if _optimizer_step_in_progress(trainer):
            logger.warning("SIGTERM inside an optimizer step: nothing saved after the last checkpoint")
            return
        name = f"model_{_iteration(trainer):07d}.pth"
        if trainer.world_size == 1:
            self._save_state(trainer)
        self._write_model(trainer, pl_module, name)  # no barrier: another rank may be gone
        logger.info("SIGTERM: saved %s%s at iteration %d", name,
                    f" and {LAST_CHECKPOINT}" if trainer.world_size == 1 else "", _iteration(trainer))

    def on_train_end(self, trainer: "L.Trainer", pl_module: "L.LightningModule") -> None:
        if trainer.global_step < self.max_iter:
            return  # stopped early (e.g. interrupted): last.ckpt of the last period stays valid
        self._save_state(trainer)
        self._save_model(trainer, pl_module, "model_final.pth")
        logger.info("Saved model_final.pth after %d iterations", trainer.global_step)


class PeriodicEvaluator(Callback):
    """Evaluate on DATASETS.TEST every ``period`` iterations (0: only at the end) and after the
    last iteration, with ``evaluate.do_test`` (fp32, model in eval mode, all ranks)."""

    def __init__(self, cfg, period: int, max_iter: int, output_dir: str) -> None:
        self.cfg = cfg
        self.period = int(period)
        self.max_iter = max_iter
        self.path = os.path.join(output_dir, "metrics.json") if output_dir else ""
        self.last_results: Dict[str, Any] = {}

    def _evaluate(self, trainer: "L.Trainer", pl_module: "L.LightningModule") -> None:
        if not self.cfg.DATASETS.TEST:
            return
        model = pl_module.model
        modes = {m: m.training for m in model.modules()}
        model.eval()
        try:
            with torch.no_grad():
                results = do_test(self.cfg, model)
        finally:
            for m, mode in modes.items():
                m.train(mode)
        self.last_results = results
        flat = flatten_results(results if len(results) != 1 else next(iter(results.values())))
        iteration = _iteration(trainer)
        if trainer.is_global_zero and flat:
            if self.path:
                _append_json_line(self.path, {"iteration": iteration, **flat})
            if trainer.logger is not None:
                trainer.logger.log_metrics(flat, step=iteration)
        trainer.strategy.barrier("eco_m2f_eval")

    def on_train_batch_end(self, trainer: "L.Trainer", pl_module: "L.LightningModule", outputs: Any,
                           batch: Any, batch_idx: int) -> None:
        step = trainer.global_step
        if self.period > 0 and step % self.period == 0 and step < self.max_iter:
            self._evaluate(trainer, pl_module)

    def on_train_end(self, trainer: "L.Trainer", pl_module: "L.LightningModule") -> None:
        if trainer.global_step >= self.max_iter:
            self._evaluate(trainer, pl_module)


class RankSeed(Callback):
    """Seed every rank differently once the process group exists (augmentation, sampled depths);
    the model itself was built under the common seed, so all ranks start identical."""

    def __init__(self, seed: int) -> None:
        self.seed = seed

    def setup(self, trainer: "L.Trainer", pl_module: "L.LightningModule", stage: str) -> None:
        L.seed_everything(self.seed + trainer.global_rank, workers=True, verbose=False)
