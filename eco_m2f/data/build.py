"""Data loaders: infinite, seeded, rank-sharded training batches and ordered, sharded test batches.

``build_detection_train_loader(cfg)`` yields lists of ``SOLVER.IMS_PER_BATCH // world_size`` mapped dicts forever.
Sample k of rank r is augmented with torch's generator seeded from (SEED, r, k), so the batches are a function of
``SEED`` alone: the same with 0 or N workers, and unaffected by other users of the global random state.

``build_detection_test_loader(cfg, dataset_name)`` maps every image once, in dataset order, rank r taking the
r-th contiguous block; batches are plain lists (``trivial_batch_collator``).
"""
from __future__ import annotations

import itertools
import logging
import pickle
import random
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from ..utils import comm
from ..utils.device import resolve_device
from .mappers import build_mapper, build_test_mapper
from .prefetch import PrefetchIterator
from .samplers import (
    AspectRatioGroupedBatches,
    InferenceSampler,
    SeededSampler,
    TrainingSampler,
    shared_random_seed,
)

__all__ = [
    "get_detection_dataset_dicts",
    "build_detection_train_loader",
    "build_detection_test_loader",
    "trivial_batch_collator",
    "worker_init_fn",
    "MapDataset",
    "SerializedList",
    "TrainLoader",
]

logger = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------------ dataset dicts
def _has_instances(d: dict, things_only: bool) -> bool:
    if "annotations" in d:
        return any(not a.get("iscrowd", 0) for a in d["annotations"])
    if things_only and "segments_info" in d:
        return any(s.get("isthing", True) and not s.get("iscrowd", 0) for s in d["segments_info"])
    return True


def get_detection_dataset_dicts(names: str | Sequence[str], filter_empty: bool = True,
                                things_only: bool = False) -> list[dict]:
    """Concatenated dataset dicts of ``names`` (``DatasetCatalog``).

    ``filter_empty`` drops images without a non-crowd annotation (instance datasets, as Detectron2), and with
    ``things_only`` also panoptic images without a non-crowd thing segment (instance training on panoptic data).
    A dataset without images is an error naming it.
    """
    from .catalog import DatasetCatalog

    if isinstance(names, str):
        names = [names]
    names = list(names)
    if not names:
        raise ValueError("no dataset names given (DATASETS.TRAIN / DATASETS.TEST is empty)")
    all_dicts: list[dict] = []
    for name in names:
        dicts = DatasetCatalog.get(name)
        if len(dicts) == 0:
            raise ValueError(f"Dataset '{name}' has no images: check its files under $DETECTRON2_DATASETS")
        all_dicts.extend(dicts)
    if filter_empty:
        before = len(all_dicts)
        all_dicts = [d for d in all_dicts if _has_instances(d, things_only)]
        if before != len(all_dicts):
            logger.info("Removed %d images without instances from %s", before - len(all_dicts), names)
        if not all_dicts:
            raise ValueError(f"Datasets {names}: every image was filtered out as having no (non-crowd) instances")
    return all_dicts


# ---------------------------------------------------------------------------------------------------- datasets
class SerializedList:
    """A list of dicts pickled into one numpy buffer: worker processes share it without copy-on-access growth
    (Python refcounts would otherwise touch, and so copy, every page of a list of dicts)."""

    def __init__(self, items: Sequence[Any]):
        blobs = [np.frombuffer(pickle.dumps(x, protocol=pickle.HIGHEST_PROTOCOL), dtype=np.uint8) for x in items]
        self._addr = np.cumsum([len(b) for b in blobs], dtype=np.int64)
        self._data = np.concatenate(blobs) if blobs else np.zeros((0,), dtype=np.uint8)

    def __len__(self) -> int:
        return len(self._addr)

    def __getitem__(self, i: int) -> Any:
        start = 0 if i == 0 else int(self._addr[i - 1])
        return pickle.loads(memoryview(self._data[start:int(self._addr[i])]))


class MapDataset(Dataset):
    """``dataset[i]`` mapped by ``mapper``. Keys may be ``(index, seed)``: the mapping then runs with torch's
    generator seeded by ``seed`` (and the caller's random state restored). A mapper returning None makes it
    retry on other random images (as Detectron2's MapDataset)."""

    max_retries = 10

    def __init__(self, dataset: Sequence[dict], mapper: Callable[[dict], dict | None]):
        self.dataset = dataset
        self.mapper = mapper

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: int | tuple[int, int]) -> dict:
        index, seed = key if isinstance(key, tuple) else (key, None)
        if seed is None:
            return self._map(int(index), None)
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(int(seed))
            return self._map(int(index), int(seed))

    def _map(self, index: int, seed: int | None) -> dict:
        retry_gen = torch.Generator().manual_seed(seed if seed is not None else index)
        for attempt in range(self.max_retries + 1):
            out = self.mapper(self.dataset[index])
            if out is not None:
                return out
            logger.warning("mapper returned None for dataset item %d; trying another image", index)
            index = int(torch.randint(len(self.dataset), (), generator=retry_gen))
        raise RuntimeError(f"mapper returned None for {self.max_retries + 1} images in a row")


def trivial_batch_collator(batch: list[dict]) -> list[dict]:
    """Batches stay lists of dicts: images differ in size, the model pads them itself."""
    return batch


def worker_init_fn(worker_id: int) -> None:
    """Seed python/numpy in a loader worker from torch's per-worker seed (itself from the loader's generator)."""
    seed = torch.initial_seed() % 2**32
    random.seed(seed)
    np.random.seed(seed)


# ------------------------------------------------------------------------------------------------------ loaders
class TrainLoader:
    """Infinite iterable of training batches (lists of mapped dicts), optionally grouped by aspect ratio.

    ``data_loader`` yields lists of consecutive samples of the stream, ``batch_size`` of them by
    default: the workers then hand over a whole batch per message (a message per sample costs the
    main process several times as much: ``scripts/benchmark_loader.py``). With grouping, or
    messages of another size, the samples are regrouped here in stream order, so the batches are
    the ones a sample-by-sample loader gives, for any worker count.
    """

    def __init__(self, data_loader: DataLoader, batch_size: int, aspect_ratio_grouping: bool,
                 prefetch_batches: int = 0, pin_memory: bool = False, samples_per_message: int | None = None):
        self.data_loader = data_loader
        self.batch_size = batch_size
        self.aspect_ratio_grouping = aspect_ratio_grouping
        self.prefetch_batches = prefetch_batches
        self.pin_memory = pin_memory
        self.samples_per_message = batch_size if samples_per_message is None else int(samples_per_message)

    def __iter__(self) -> Iterator[list[dict]]:
        batches: Iterable[list[dict]] = self.data_loader
        if self.aspect_ratio_grouping or self.samples_per_message != self.batch_size:
            samples = itertools.chain.from_iterable(self.data_loader)  # the stream, sample by sample
            if self.aspect_ratio_grouping:
                batches = AspectRatioGroupedBatches(samples, self.batch_size)
            else:
                batches = _consecutive(samples, self.batch_size)
        if self.prefetch_batches > 0:
            return PrefetchIterator(batches, self.prefetch_batches, pin=self.pin_memory)
        return iter(batches)


def _consecutive(samples: Iterable[dict], size: int) -> Iterator[list[dict]]:
    """Lists of ``size`` consecutive samples."""
    it = iter(samples)
    while batch := list(itertools.islice(it, size)):
        if len(batch) == size:
            yield batch


def build_detection_train_loader(
    cfg,
    mapper: Callable[[dict], dict] | None = None,
    *,
    dataset: Sequence[dict] | None = None,
    dataset_names: str | Sequence[str] | None = None,
    total_batch_size: int | None = None,
    num_workers: int | None = None,
    aspect_ratio_grouping: bool | None = None,
    seed: int | None = None,
    rank: int | None = None,
    world_size: int | None = None,
    samples_per_message: int | None = None,
) -> TrainLoader:
    """Infinite training loader over ``DATASETS.TRAIN`` (or ``dataset_names`` / a ready list of dicts).

    Batches: lists of ``total_batch_size // world_size`` mapped dicts (``SOLVER.IMS_PER_BATCH`` by default);
    workers: ``DATALOADER.NUM_WORKERS`` (0 maps in this process); order and augmentation seeded with ``SEED``
    (a shared random seed when SEED < 0). ``rank``/``world_size`` default to the process group's.
    ``samples_per_message``: samples a worker hands over at a time (default: a batch; the batches
    are the same for any value, only the transfer differs: 1 is the sample-by-sample baseline of
    ``scripts/benchmark_loader.py``).
    """
    d_rank, d_world = comm.get_rank(), comm.get_world_size()
    rank = d_rank if rank is None else int(rank)
    world_size = d_world if world_size is None else int(world_size)
    total = int(cfg.SOLVER.IMS_PER_BATCH if total_batch_size is None else total_batch_size)
    if total <= 0 or total % world_size != 0:
        raise ValueError(f"SOLVER.IMS_PER_BATCH ({total}) must be a positive multiple of the world size ({world_size})")
    batch_size = total // world_size

    if mapper is None:
        mapper = build_mapper(cfg, is_train=True)
    if dataset is None:
        names = cfg.DATASETS.TRAIN if dataset_names is None else dataset_names
        things_only = cfg.INPUT.DATASET_MAPPER_NAME in ("mask_former_instance", "coco_instance_lsj")
        dataset = get_detection_dataset_dicts(names, filter_empty=cfg.DATALOADER.FILTER_EMPTY_ANNOTATIONS,
                                              things_only=things_only)
    if len(dataset) == 0:
        raise ValueError("the training dataset is empty")
    if isinstance(dataset, list):
        dataset = SerializedList(dataset)

    seed = int(cfg.SEED if seed is None else seed)
    if seed < 0:
        seed = shared_random_seed()
    sampler = SeededSampler(TrainingSampler(len(dataset), shuffle=True, seed=seed, rank=rank, world_size=world_size),
                            seed=seed, rank=rank)
    workers = int(cfg.DATALOADER.NUM_WORKERS if num_workers is None else num_workers)
    grouping = bool(cfg.DATALOADER.ASPECT_RATIO_GROUPING if aspect_ratio_grouping is None else aspect_ratio_grouping)
    generator = torch.Generator().manual_seed(derive_loader_seed(seed, rank))
    common = dict(num_workers=workers, worker_init_fn=worker_init_fn, generator=generator)
    map_dataset = MapDataset(dataset, mapper)
    # consecutive samples per message (default: a batch); TrainLoader regroups them where needed
    per_message = batch_size if samples_per_message is None else int(samples_per_message)
    if per_message < 1:
        raise ValueError(f"samples_per_message must be >= 1, got {samples_per_message}")
    loader = DataLoader(map_dataset, sampler=sampler, batch_size=per_message, drop_last=True,
                        collate_fn=trivial_batch_collator, **common)
    prefetch = int(cfg.DATALOADER.PREFETCH_BATCHES)
    if prefetch < 0:
        raise ValueError(f"DATALOADER.PREFETCH_BATCHES must be >= 0 (0: no read-ahead thread), got {prefetch}")
    pin = prefetch > 0 and torch.cuda.is_available() and resolve_device(cfg.MODEL.DEVICE).type == "cuda"
    return TrainLoader(loader, batch_size, grouping, prefetch_batches=prefetch, pin_memory=pin, samples_per_message=per_message)


def derive_loader_seed(seed: int, rank: int) -> int:
    """Seed of the loader's generator (base of the workers' torch seeds) for ``rank``."""
    from .samplers import derive_seed

    return derive_seed(seed, rank, 0x10ADE5)


def build_detection_test_loader(cfg, dataset_name: str | Sequence[str], mapper: Callable[[dict], dict] | None = None,
                                batch_size: int = 1, *, num_workers: int | None = None,
                                rank: int | None = None, world_size: int | None = None) -> DataLoader:
    """Ordered loader over ``dataset_name`` for inference: each image once across ranks, lists of dicts."""
    d_rank, d_world = comm.get_rank(), comm.get_world_size()
    rank = d_rank if rank is None else int(rank)
    world_size = d_world if world_size is None else int(world_size)
    dicts = get_detection_dataset_dicts(dataset_name, filter_empty=False)
    if mapper is None:
        mapper = build_test_mapper(cfg)
    workers = int(cfg.DATALOADER.NUM_WORKERS if num_workers is None else num_workers)
    return DataLoader(MapDataset(SerializedList(dicts), mapper),
                      sampler=InferenceSampler(len(dicts), rank=rank, world_size=world_size),
                      batch_size=batch_size, drop_last=False, num_workers=workers,
                      collate_fn=trivial_batch_collator, worker_init_fn=worker_init_fn)
