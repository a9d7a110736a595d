"""Evaluator protocol and the inference loop that feeds it (Detectron2's conventions).

An evaluator sees the model's inputs and outputs batch by batch (``process``) and
turns them into metrics once the data is exhausted (``evaluate``). Under
distributed inference each process sees its own shard; evaluators gather across
processes inside ``evaluate`` and only the main process returns the metrics.
"""
from __future__ import annotations

import datetime
import logging
import time
from collections import OrderedDict
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, Iterable, Iterator, Sequence

if TYPE_CHECKING:  # torch loads only when inference runs: the PQ command line stays light
    from torch import nn

__all__ = ["DatasetEvaluator", "DatasetEvaluators", "inference_on_dataset", "inference_context"]

logger = logging.getLogger(__name__)


class DatasetEvaluator:
    """Base class: accumulate per-batch results, then compute dataset metrics.

    ``evaluate`` returns ``{task: {metric: value}}`` (values in percent, as Detectron2
    prints them) on the main process, and ``None`` on the other processes.
    """

    def reset(self) -> None:
        """Forget everything seen so far (called before inference starts)."""

    def process(self, inputs: list[dict], outputs: list[dict]) -> None:
        """Consume one batch: ``inputs`` as the mapper made them, ``outputs`` from ``model(inputs)``."""

    def evaluate(self) -> dict | None:
        """Metrics over everything processed (main process) or ``None`` (other processes)."""
        return None


class DatasetEvaluators(DatasetEvaluator):
    """Several evaluators run side by side; their result dicts are merged (task names must differ)."""

    def __init__(self, evaluators: Sequence[DatasetEvaluator]):
        super().__init__()
        self._evaluators = list(evaluators)

    def __len__(self) -> int:
        return len(self._evaluators)

    def __iter__(self) -> Iterator[DatasetEvaluator]:
        return iter(self._evaluators)

    def __getitem__(self, i: int) -> DatasetEvaluator:
        return self._evaluators[i]

    def reset(self) -> None:
        for evaluator in self._evaluators:
            evaluator.reset()

    def process(self, inputs: list[dict], outputs: list[dict]) -> None:
        for evaluator in self._evaluators:
            evaluator.process(inputs, outputs)

    def evaluate(self) -> dict:
        from ..utils import comm

        results: dict[str, Any] = OrderedDict()
        for evaluator in self._evaluators:
            result = evaluator.evaluate()
            if comm.is_main_process() and result is not None:
                for task, metrics in result.items():
                    if task in results:
                        raise KeyError(
                            f"Two evaluators ({type(evaluator).__name__} and an earlier one) "
                            f"both report task {task!r}"
                        )
                    results[task] = metrics
        return results


@contextmanager
def inference_context(model: nn.Module) -> Iterator[None]:
    """Put ``model`` in eval mode for the duration, restoring its previous training flag after."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def _sync_cuda() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _fmt_eta(seconds: float) -> str:
    return str(datetime.timedelta(seconds=int(max(seconds, 0))))


def inference_on_dataset(
    model: nn.Module,
    data_loader: Iterable[list[dict]],
    evaluator: DatasetEvaluator | Sequence[DatasetEvaluator] | None,
    log_period_s: float = 5.0,
) -> dict:
    """Run ``model`` over ``data_loader`` under ``torch.no_grad`` in eval mode and evaluate.

    Progress (images done, seconds per image for data loading / inference / evaluation,
    ETA) is logged every ``log_period_s`` seconds, after a short warm-up that is
    excluded from the timings. The model's training flag is restored afterwards.
    Returns the evaluator's results on the main process and ``{}`` on the others.
    """
    import torch

    from ..utils import comm

    num_devices = comm.get_world_size()
    if evaluator is None:
        evaluator = DatasetEvaluators([])
    elif not isinstance(evaluator, DatasetEvaluator):
        evaluator = DatasetEvaluators(list(evaluator))
    evaluator.reset()

    try:
        total: int | None = len(data_loader)  # type: ignore[arg-type]
    except TypeError:
        total = None
    logger.info("Start inference on %s batches", total if total is not None else "an unknown number of")

    num_warmup = min(5, total - 1) if total else 0
    start_time = time.perf_counter()
    total_data = total_compute = total_eval = 0.0
    last_log = start_time
    idx = -1
    with inference_context(model), torch.no_grad():
        data_start = time.perf_counter()
        for idx, inputs in enumerate(data_loader):
            total_data += time.perf_counter() - data_start
            if idx == num_warmup:
                start_time = time.perf_counter()
                total_data = total_compute = total_eval = 0.0

            compute_start = time.perf_counter()
            outputs = model(inputs)
            _sync_cuda()
            total_compute += time.perf_counter() - compute_start

            eval_start = time.perf_counter()
            evaluator.process(inputs, outputs)
            total_eval += time.perf_counter() - eval_start

            done = idx + 1 - num_warmup
            now = time.perf_counter()
            if now - last_log > log_period_s and done > 0:
                per_iter = (now - start_time) / done
                msg = (
                    f"Inference done {idx + 1}/{total if total is not None else '?'}. "
                    f"Dataloading: {total_data / done:.4f} s/iter. "
                    f"Inference: {total_compute / done:.4f} s/iter. "
                    f"Eval: {total_eval / done:.4f} s/iter. "
                    f"Total: {per_iter:.4f} s/iter."
                )
                if total is not None:
                    msg += f" ETA={_fmt_eta(per_iter * (total - idx - 1))}"
                logger.info(msg)
                last_log = now
            data_start = time.perf_counter()

    n_timed = max(idx + 1 - num_warmup, 1)
    total_time = time.perf_counter() - start_time
    logger.info(
        "Total inference time: %s (%.6f s / iter per device, on %d devices)",
        _fmt_eta(total_time),
        total_time / n_timed,
        num_devices,
    )
    logger.info(
        "Total inference pure compute time: %s (%.6f s / iter per device, on %d devices)",
        _fmt_eta(total_compute),
        total_compute / n_timed,
        num_devices,
    )

    results = evaluator.evaluate()
    # An evaluator may return None on non-main processes; callers expect a dict.
    if results is None:
        results = {}
    return results
