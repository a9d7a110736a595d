"""Distributed helpers that degrade to no-ops in a single process.

Evaluators call these without knowing how the job was launched (plain ``python``,
``torchrun``, Lightning DDP): when ``torch.distributed`` is not initialised every
function behaves as if the world had one process. Picklable Python objects are
exchanged over a gloo group, so gathering works under the NCCL backend too without
moving anything to the GPU.
"""
from __future__ import annotations

import os
from typing import Any

import torch.distributed as dist

__all__ = [
    "get_world_size",
    "get_rank",
    "get_local_rank",
    "get_local_size",
    "is_main_process",
    "synchronize",
    "shutdown",
    "all_gather",
    "gather",
]


def _is_dist() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_world_size() -> int:
    """Number of processes in the default group (1 when not distributed)."""
    return dist.get_world_size() if _is_dist() else 1


def get_rank() -> int:
    """Global rank of this process (0 when not distributed)."""
    return dist.get_rank() if _is_dist() else 0


def get_local_rank() -> int:
    """Rank of this process on its machine, from ``LOCAL_RANK`` (set by torchrun and Lightning)."""
    if not _is_dist():
        return 0
    return int(os.environ.get("LOCAL_RANK", 0))


def get_local_size() -> int:
    """Number of processes on this machine, from ``LOCAL_WORLD_SIZE`` (falls back to the world size)."""
    if not _is_dist():
        return 1
    return int(os.environ.get("LOCAL_WORLD_SIZE", get_world_size()))


def is_main_process() -> bool:
    """True on global rank 0: the process that reports and writes results."""
    return get_rank() == 0


def synchronize() -> None:
    """Barrier across all processes; a no-op with one process."""
    if not _is_dist() or get_world_size() == 1:
        return
    if dist.get_backend() == dist.Backend.NCCL:
        import torch

        if torch.cuda.is_available():
            dist.barrier(device_ids=[torch.cuda.current_device()])
            return
    dist.barrier()


def shutdown() -> None:
    """Wait for every process, then destroy all process groups; a no-op when none exists.

    Called once the job's work is done: a gloo group left to the interpreter's exit can abort
    the process (SIGABRT, "terminate called without an active exception") after its results
    are written, and NCCL asks for the same call.
    """
    global _GLOO_GROUP
    if not _is_dist():
        return
    synchronize()
    dist.destroy_process_group()
    _GLOO_GROUP = None


_GLOO_GROUP: tuple[Any, Any] | None = None  # (default group it was made for, gloo group)


def _object_group():
    """A gloo group over all ranks for pickled objects (NCCL only moves CUDA tensors).

    Made once per default process group (collectively, on first use by every rank) and
    remade if the default group was destroyed and re-initialised.
    """
    global _GLOO_GROUP
    world = dist.group.WORLD
    if dist.get_backend() != dist.Backend.NCCL:
        return world
    if _GLOO_GROUP is None or _GLOO_GROUP[0] is not world:
        _GLOO_GROUP = (world, dist.new_group(backend="gloo"))
    return _GLOO_GROUP[1]


def all_gather(obj: Any) -> list[Any]:
    """Gather a picklable object from every process; every process gets the list ordered by rank."""
    world = get_world_size()
    if world == 1:
        return [obj]
    out: list[Any] = [None] * world
    dist.all_gather_object(out, obj, group=_object_group())
    return out


def gather(obj: Any, dst: int = 0) -> list[Any]:
    """Gather a picklable object on rank ``dst`` (list ordered by rank); other ranks get ``[]``."""
    world = get_world_size()
    if world == 1:
        return [obj]
    group = _object_group()
    if get_rank() == dst:
        out: list[Any] = [None] * world
        dist.gather_object(obj, out, dst=dst, group=group)
        return out
    dist.gather_object(obj, None, dst=dst, group=group)
    return []
