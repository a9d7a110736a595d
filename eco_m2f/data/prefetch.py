"""Training batches read ahead in a background thread (``DATALOADER.PREFETCH_BATCHES``).

The main process's share of loading (receiving each worker's sample, grouping the samples into
batches, pinning them) otherwise runs between two training steps, while the device waits. The
thread keeps that many batches ready, in the loader's order; with CUDA their tensors are copied
to pinned memory, so the trainer's non-blocking copies to the device do not stall the host.
An error raised while loading is raised again, unchanged, by the ``next()`` that would have
returned the batch.
"""
from __future__ import annotations

import queue
import threading
from typing import Any, Iterable, Iterator

import torch

__all__ = ["PrefetchIterator", "pin_batch"]

_END = object()


class _Failure:
    def __init__(self, error: BaseException) -> None:
        self.error = error


def pin_batch(batch: Any) -> Any:
    """``batch`` with every CPU tensor (in dicts, lists and tuples) copied to pinned memory."""
    if isinstance(batch, torch.Tensor):
        return batch.pin_memory() if batch.device.type == "cpu" else batch
    if isinstance(batch, dict):
        return {k: pin_batch(v) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(pin_batch(v) for v in batch)
    return batch


class PrefetchIterator(Iterator[Any]):
    """Iterate ``batches`` through a thread that stays ``depth`` batches ahead (``pin``: pinned
    memory). ``close()`` (also on garbage collection) stops the thread."""

    def __init__(self, batches: Iterable[Any], depth: int, pin: bool = False) -> None:
        if depth < 1:
            raise ValueError(f"PrefetchIterator: depth must be >= 1, got {depth}")
        self._queue: "queue.Queue[Any]" = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._finished = False
        self._thread = threading.Thread(target=self._fill, args=(iter(batches), pin), name="batch-prefetch",
                                        daemon=True)
        self._thread.start()

    def _put(self, item: Any) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _fill(self, source: Iterator[Any], pin: bool) -> None:
        try:
            for batch in source:
                if not self._put(pin_batch(batch) if pin else batch):
                    return
            self._put(_END)
        except BaseException as error:  # handed to the consumer, raised there
            self._put(_Failure(error))

    def __next__(self) -> Any:
        if self._finished:
            raise StopIteration
        item = self._queue.get()
        if item is _END:
            self._finished = True
            raise StopIteration
        if isinstance(item, _Failure):
            self._finished = True
            raise item.error
        return item

    def close(self) -> None:
        self._stop.set()
        self._finished = True
        while True:  # let a put waiting on a full queue see the stop
            try:
                self._queue.get_nowait()
            except queue.Empty:
                break
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout=5)

    def __del__(self) -> None:
        self.close()
