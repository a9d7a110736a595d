"""Samplers: an infinite shuffled stream for training, contiguous shards for inference, aspect-ratio batching.

Semantics follow Detectron2's, so a run splits its data across processes the same way:

* ``TrainingSampler``: one infinite stream of shuffled epochs (seeded, identical on every rank); rank r takes
  items r, r + world, r + 2 * world, ... so the ranks see disjoint positions of the same stream.
* ``InferenceSampler``: the first ``size % world`` ranks get one extra item; rank r takes a contiguous block.
* ``SeededSampler``: pairs every index with a per-sample seed derived from (seed, rank, position in the stream),
  so a sample's augmentation does not depend on the number of loader workers or on other random state.
"""
from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np
import torch
from torch.utils.data import Sampler

from ..utils import comm

__all__ = [
    "TrainingSampler",
    "InferenceSampler",
    "SeededSampler",
    "AspectRatioGroupedBatches",
    "derive_seed",
    "shared_random_seed",
]


def shared_random_seed() -> int:
    """A random seed that every process agrees on (rank 0's draw), for SEED < 0."""
    seed = int(np.random.SeedSequence().generate_state(1)[0] & 0x7FFFFFFF)
    return int(comm.all_gather(seed)[0])


def derive_seed(*keys: int) -> int:
    """A well-mixed 63-bit seed from integer keys (numpy's SeedSequence hashing)."""
    state = np.random.SeedSequence([int(k) & 0xFFFFFFFFFFFFFFFF for k in keys]).generate_state(2, dtype=np.uint32)
    return int((int(state[0]) << 31) ^ int(state[1])) & 0x7FFFFFFFFFFFFFFF


class TrainingSampler(Sampler[int]):
    """Infinite stream of indices in ``[0, size)``: reshuffled every pass, sharded by rank."""

    def __init__(self, size: int, shuffle: bool = True, seed: int | None = None,
                 rank: int | None = None, world_size: int | None = None):
        if not isinstance(size, int) or size <= 0:
            raise ValueError(f"TrainingSampler needs a positive dataset size, got {size!r}")
        if rank is None or world_size is None:
            d_rank, d_world = comm.get_rank(), comm.get_world_size()
            rank = d_rank if rank is None else rank
            world_size = d_world if world_size is None else world_size
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world of size {world_size}")
        self._size = size
        self._shuffle = shuffle
        self._seed = int(shared_random_seed() if seed is None or seed < 0 else seed)
        self._rank = rank
        self._world_size = world_size

    @property
    def seed(self) -> int:
        return self._seed

    @property
    def rank(self) -> int:
        return self._rank

    def __iter__(self) -> Iterator[int]:
        return itertools.islice(self._infinite_indices(), self._rank, None, self._world_size)

    def _infinite_indices(self) -> Iterator[int]:
        g = torch.Generator()
        g.manual_seed(self._seed)
        while True:
            if self._shuffle:
                yield from torch.randperm(self._size, generator=g).tolist()
            else:
                yield from range(self._size)


class SeededSampler(Sampler[tuple[int, int]]):
    """Wrap a sampler so it yields ``(index, sample_seed)``; ``MapDataset`` seeds the augmentation with it."""

    def __init__(self, sampler: Iterable[int], seed: int, rank: int = 0):
        self.sampler = sampler
        self.seed = int(seed)
        self.rank = int(rank)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        for position, index in enumerate(self.sampler):
            yield int(index), derive_seed(self.seed, self.rank, position)

    def __len__(self) -> int:
        return len(self.sampler)  # type: ignore[arg-type]


class InferenceSampler(Sampler[int]):
    """Every index exactly once over all ranks, in order; rank r gets the r-th contiguous block."""

    def __init__(self, size: int, rank: int | None = None, world_size: int | None = None):
        if size < 0:
            raise ValueError(f"InferenceSampler needs a non-negative size, got {size}")
        if rank is None or world_size is None:
            d_rank, d_world = comm.get_rank(), comm.get_world_size()
            rank = d_rank if rank is None else rank
            world_size = d_world if world_size is None else world_size
        shard, left = divmod(size, world_size)
        sizes = [shard + int(r < left) for r in range(world_size)]
        begin = sum(sizes[:rank])
        self._indices = range(begin, begin + sizes[rank])

    def __iter__(self) -> Iterator[int]:
        return iter(self._indices)

    def __len__(self) -> int:
        return len(self._indices)


class AspectRatioGroupedBatches(torch.utils.data.IterableDataset):
    """Batch mapped samples so a batch holds only landscape (W > H) or only portrait/square images.

    Input: an iterable of mapped dicts (each with an "image" C x H x W); output: lists of ``batch_size`` dicts.
    """

    def __init__(self, dataset: Iterable[dict[str, Any]], batch_size: int):
        self.dataset = dataset
        self.batch_size = int(batch_size)

    def __iter__(self) -> Iterator[list[dict[str, Any]]]:
        buckets: list[list[dict[str, Any]]] = [[], []]
        for d in self.dataset:
            h, w = d["image"].shape[-2:]
            bucket = buckets[int(w > h)]
            bucket.append(d)
            if len(bucket) == self.batch_size:
                out = bucket[:]
                bucket.clear()
                yield out
