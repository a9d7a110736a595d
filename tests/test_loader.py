"""Samplers and loaders: infinite seeded training batches sharded by rank, ordered sharded test batches."""
from __future__ import annotations

import itertools
import uuid

import pytest
import torch

from eco_m2f.data.build import (
    SerializedList,
    build_detection_test_loader,
    build_detection_train_loader,
    get_detection_dataset_dicts,
)
from eco_m2f.data.catalog import DatasetCatalog, MetadataCatalog
from eco_m2f.data.prefetch import PrefetchIterator, pin_batch
from eco_m2f.data.samplers import AspectRatioGroupedBatches, InferenceSampler, TrainingSampler
from test_mappers import IGNORE, check_aligned, make_cfg, register_tiny, unregister, write_tiny_dataset

SIZES = [(64, 64), (48, 64), (64, 48), (64, 64), (40, 64), (64, 64)]


@pytest.fixture()
def tiny6(tmp_path):
    dicts = write_tiny_dataset(tmp_path, sizes=SIZES)
    name = register_tiny(dicts)
    yield name, dicts
    unregister(name)


def loader_cfg(name: str, workers: int = 0, seed: int = 3, batch: int = 4, grouping: bool = False, **kw):
    return make_cfg(name, "mask_former_panoptic", **{
        "DATALOADER.NUM_WORKERS": workers, "SEED": seed, "SOLVER.IMS_PER_BATCH": batch,
        "DATALOADER.ASPECT_RATIO_GROUPING": grouping, "INPUT.MIN_SIZE_TRAIN": (32, 48, 64),
        "INPUT.RANDOM_FLIP": "horizontal", "INPUT.CROP.ENABLED": True, "INPUT.CROP.TYPE": "relative_range",
        "INPUT.CROP.SIZE": [0.6, 0.6], "INPUT.COLOR_AUG_SSD": True, **kw})


def take(loader, n: int) -> list[list[dict]]:
    return list(itertools.islice(iter(loader), n))


def fingerprint(batches: list[list[dict]]) -> list[tuple]:
    return [(d["image_id"], tuple(d["image"].shape), int(d["image"].long().sum()), int(d["sem_seg"].sum()))
            for b in batches for d in b]


# ------------------------------------------------------------------------------------------------- samplers
def test_training_sampler_shards_disjointly_across_two_ranks():
    size = 10
    full = list(itertools.islice(iter(TrainingSampler(size, seed=5, rank=0, world_size=1)), 40))
    r0 = list(itertools.islice(iter(TrainingSampler(size, seed=5, rank=0, world_size=2)), 20))
    r1 = list(itertools.islice(iter(TrainingSampler(size, seed=5, rank=1, world_size=2)), 20))
    assert r0 == full[0::2] and r1 == full[1::2]
    # each pass over the data is a permutation: within an epoch the ranks see disjoint images covering all
    for epoch in range(4):
        a, b = set(r0[5 * epoch:5 * epoch + 5]), set(r1[5 * epoch:5 * epoch + 5])
        assert not a & b and a | b == set(range(size))
    assert full[:10] != full[10:20], "reshuffled every pass"
    other = list(itertools.islice(iter(TrainingSampler(size, seed=6, rank=0, world_size=1)), 40))
    assert other != full
    assert list(itertools.islice(iter(TrainingSampler(size, seed=5, rank=0, world_size=1)), 40)) == full
    with pytest.raises(ValueError, match="rank"):
        TrainingSampler(size, seed=5, rank=2, world_size=2)


def test_inference_sampler_contiguous_shards():
    shards = [list(InferenceSampler(7, rank=r, world_size=3)) for r in range(3)]
    assert shards == [[0, 1, 2], [3, 4], [5, 6]]
    assert list(InferenceSampler(2, rank=2, world_size=3)) == []


# ---------------------------------------------------------------------------------------------- dataset dicts
def test_get_detection_dataset_dicts_concat_filter_and_empty(tiny6):
    name, dicts = tiny6
    other = f"tiny_instances_{uuid.uuid4().hex[:8]}"
    inst = [{"file_name": "a.png", "image_id": 100, "height": 8, "width": 8,
             "annotations": [{"iscrowd": 1, "category_id": 0, "segmentation": []}]},
            {"file_name": "b.png", "image_id": 101, "height": 8, "width": 8,
             "annotations": [{"iscrowd": 0, "category_id": 0, "segmentation": []}]}]
    empty = f"tiny_empty_{uuid.uuid4().hex[:8]}"
    DatasetCatalog.register(other, lambda: [dict(d) for d in inst])
    DatasetCatalog.register(empty, lambda: [])
    try:
        both = get_detection_dataset_dicts([name, other], filter_empty=False)
        assert [d["image_id"] for d in both] == [0, 1, 2, 3, 4, 5, 100, 101]
        filtered = get_detection_dataset_dicts((name, other), filter_empty=True)
        assert [d["image_id"] for d in filtered] == [0, 1, 2, 3, 4, 5, 101]  # only-crowd image dropped
        no_things = [dict(d, segments_info=[s for s in d["segments_info"] if not s["isthing"]]) for d in dicts[:2]]
        DatasetCatalog.remove(other)
        DatasetCatalog.register(other, lambda: no_things)
        assert len(get_detection_dataset_dicts(other, filter_empty=True)) == 2  # panoptic: kept
        with pytest.raises(ValueError, match="filtered out"):
            get_detection_dataset_dicts(other, filter_empty=True, things_only=True)
        with pytest.raises(ValueError, match=empty):
            get_detection_dataset_dicts([name, empty])
        with pytest.raises(KeyError, match="not registered"):
            get_detection_dataset_dicts(["no_such_dataset"])
    finally:
        DatasetCatalog.remove(other)
        DatasetCatalog.remove(empty)


def test_serialized_list_round_trip(tiny6):
    _, dicts = tiny6
    s = SerializedList(dicts)
    assert len(s) == len(dicts) and [s[i] for i in range(len(s))] == dicts


# ---------------------------------------------------------------------------------------------------- loaders
@pytest.mark.parametrize("workers", [0, 2])
def test_train_loader_batch_size_and_content(tiny6, workers):
    name, _ = tiny6
    # IMS_PER_BATCH 4 over a simulated world of 2 ranks: 2 images per batch on each rank
    loader = build_detection_train_loader(loader_cfg(name, workers=workers), rank=1, world_size=2)
    batches = take(loader, 5)  # 10 images > 6 in the dataset: the sampler is infinite
    assert all(isinstance(b, list) and len(b) == 2 for b in batches)
    for b in batches:
        for d in b:
            assert set(d) >= {"image", "instances", "sem_seg", "height", "width", "file_name", "image_id"}
            check_aligned(d, colour_aug=True)
            assert (d["height"], d["width"]) == SIZES[d["image_id"]]
    loader = build_detection_train_loader(loader_cfg(name, workers=workers, batch=3))
    assert [len(b) for b in take(loader, 3)] == [3, 3, 3]


def test_train_loader_aspect_ratio_grouping(tiny6):
    name, _ = tiny6
    cfg = loader_cfg(name, grouping=True, **{"INPUT.CROP.ENABLED": False, "INPUT.MIN_SIZE_TRAIN": (32,)})
    batches = take(build_detection_train_loader(cfg), 6)
    for b in batches:
        assert len(b) == 4
        landscape = {d["image"].shape[-1] > d["image"].shape[-2] for d in b}
        assert len(landscape) == 1, "a batch mixes landscape and portrait images"


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("grouping", [True, False])
def test_whole_batch_messages_give_the_batches_of_sample_by_sample_messages(tiny6, workers, grouping):
    """The workers hand over a batch of consecutive samples at a time; the batches (grouped by
    orientation or not) are those of handing them over one by one."""
    name, _ = tiny6
    opts = {"INPUT.CROP.ENABLED": False, "INPUT.MIN_SIZE_TRAIN": (32,)}
    cfg = loader_cfg(name, workers=workers, grouping=grouping, seed=5, **opts)
    batched = take(build_detection_train_loader(cfg), 6)
    single = take(build_detection_train_loader(cfg, samples_per_message=1), 6)
    assert fingerprint(batched) == fingerprint(single) and all(len(b) == 4 for b in batched)
    if grouping:  # both orientations occur, never in one batch
        orientations = [{d["image"].shape[-1] > d["image"].shape[-2] for d in b} for b in batched]
        assert all(len(o) == 1 for o in orientations) and len({o.pop() for o in orientations}) == 2
        stream = itertools.chain.from_iterable(take(build_detection_train_loader(loader_cfg(name, seed=5, **opts)), 12))
        assert fingerprint(batched) == fingerprint(list(itertools.islice(iter(AspectRatioGroupedBatches(stream, 4)), 6)))
    with pytest.raises(ValueError, match="samples_per_message must be >= 1"):
        build_detection_train_loader(cfg, samples_per_message=-1)


def test_the_loader_benchmark_times_both_transfers_on_the_same_batches(tiny6):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "scripts" / "benchmark_loader.py"
    spec = importlib.util.spec_from_file_location("benchmark_loader", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    name, _ = tiny6
    cfg = loader_cfg(name, workers=2, grouping=True, **{"INPUT.CROP.ENABLED": False, "INPUT.MIN_SIZE_TRAIN": (32,)})
    (w1, ids1), (w0, ids0) = (bench.time_loader(cfg, n, 3, 0.05) for n in (1, 0))
    assert len(w1) == len(w0) == 3 and all(w >= 0 for w in w1 + w0)
    assert ids1 == ids0 and len(ids0) == 4 and all(len(b) == 4 for b in ids0)


def test_same_seed_same_batches_regardless_of_workers(tiny6):
    name, _ = tiny6
    ref = fingerprint(take(build_detection_train_loader(loader_cfg(name, workers=0, seed=11)), 4))
    # other users of the global random state do not change the batches
    torch.manual_seed(12345)
    _ = torch.rand(100)
    assert fingerprint(take(build_detection_train_loader(loader_cfg(name, workers=0, seed=11)), 4)) == ref
    assert fingerprint(take(build_detection_train_loader(loader_cfg(name, workers=2, seed=11)), 4)) == ref
    other = fingerprint(take(build_detection_train_loader(loader_cfg(name, workers=0, seed=12)), 4))
    assert other != ref
    # ranks of one run see different images and augmentations
    r1 = fingerprint(take(build_detection_train_loader(loader_cfg(name, seed=11), rank=1, world_size=2), 4))
    r0 = fingerprint(take(build_detection_train_loader(loader_cfg(name, seed=11), rank=0, world_size=2), 4))
    assert r0 != r1


def test_train_loader_rejects_batch_not_divisible(tiny6):
    name, _ = tiny6
    with pytest.raises(ValueError, match="IMS_PER_BATCH"):
        build_detection_train_loader(loader_cfg(name, batch=3), rank=0, world_size=2)


@pytest.mark.parametrize("workers", [0, 2])
def test_test_loader_ordered_and_sharded(tiny6, workers):
    name, dicts = tiny6
    cfg = loader_cfg(name, workers=workers, **{"INPUT.MIN_SIZE_TEST": 32, "INPUT.MAX_SIZE_TEST": 1000})
    batches = list(build_detection_test_loader(cfg, name))
    assert all(isinstance(b, list) and len(b) == 1 for b in batches)
    assert [b[0]["image_id"] for b in batches] == list(range(len(dicts)))
    for b in batches:
        d = b[0]
        assert min(d["image"].shape[-2:]) == 32 and (d["height"], d["width"]) == SIZES[d["image_id"]]
        assert "instances" not in d
    shards = [[d["image_id"] for b in build_detection_test_loader(cfg, name, rank=r, world_size=2) for d in b]
              for r in range(2)]
    assert shards == [[0, 1, 2], [3, 4, 5]]
    assert [len(b) for b in build_detection_test_loader(cfg, name, batch_size=4)] == [4, 2]


@pytest.mark.parametrize("workers", [0, 2])
def test_corrupt_image_error_names_the_file(tiny6, tmp_path, workers):
    name, dicts = tiny6
    bad = tmp_path / "corrupt_image.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 truncated jpeg")
    broken = f"tiny_broken_{uuid.uuid4().hex[:8]}"
    DatasetCatalog.register(broken, lambda: [dict(d, file_name=str(bad)) for d in dicts])
    MetadataCatalog.get(broken).set(ignore_label=IGNORE)
    try:
        cfg = loader_cfg(broken, workers=workers)
        with pytest.raises(ValueError, match="corrupt_image.jpg"):
            take(build_detection_train_loader(cfg), 1)
        with pytest.raises(ValueError, match="corrupt_image.jpg"):
            list(build_detection_test_loader(cfg, broken))
    finally:
        unregister(broken)


def test_negative_seed_draws_a_seed_and_explicit_dataset(tiny6):
    name, dicts = tiny6
    a = fingerprint(take(build_detection_train_loader(loader_cfg(name, seed=-1)), 3))
    b = fingerprint(take(build_detection_train_loader(loader_cfg(name, seed=-1)), 3))
    assert len(a) == len(b) == 12 and a != b  # fresh random seeds (equal with probability ~0)
    only_first = build_detection_train_loader(loader_cfg(name), dataset=[dicts[0]], total_batch_size=2)
    assert {d["image_id"] for batch in take(only_first, 3) for d in batch} == {0}


# ---------------------------------------------------------------------------------------------- read-ahead
@pytest.mark.parametrize("workers", [0, 2])
def test_prefetched_batches_equal_the_plain_loader(tiny6, workers):
    name, _ = tiny6
    plain = take(build_detection_train_loader(loader_cfg(name, workers=workers)), 4)
    cfg = loader_cfg(name, workers=workers, **{"DATALOADER.PREFETCH_BATCHES": 2})
    it = iter(build_detection_train_loader(cfg))
    assert isinstance(it, PrefetchIterator)
    ahead = [next(it) for _ in range(4)]
    it.close()
    assert fingerprint(ahead) == fingerprint(plain)
    assert all(torch.equal(a["instances"]["gt_masks"], b["instances"]["gt_masks"])
               for ba, bb in zip(ahead, plain) for a, b in zip(ba, bb))
    assert not it._thread.is_alive()


def test_prefetch_raises_the_loading_error_in_the_consumer():
    def batches():
        yield [1]
        raise ValueError("corrupt image /data/x.png")

    it = PrefetchIterator(batches(), depth=2)
    assert next(it) == [1]
    with pytest.raises(ValueError, match="corrupt image /data/x.png"):
        next(it)
    with pytest.raises(StopIteration):
        next(it)
    finite = PrefetchIterator(iter([[1], [2]]), depth=1)
    assert list(finite) == [[1], [2]]


def test_prefetch_stops_its_thread_on_close_of_an_infinite_source():
    it = PrefetchIterator(itertools.count(), depth=3)
    assert [next(it) for _ in range(5)] == [0, 1, 2, 3, 4]
    it.close()
    assert not it._thread.is_alive()


def test_pin_batch_keeps_the_structure_and_leaves_other_devices_alone():
    meta = torch.empty(3, device="meta")
    batch = [{"image": meta, "instances": {"gt_classes": (meta, 7)}, "file_name": "a"}]
    out = pin_batch(batch)
    assert out == [{"image": meta, "instances": {"gt_classes": (meta, 7)}, "file_name": "a"}]
    assert out[0]["image"] is meta and isinstance(out[0]["instances"]["gt_classes"], tuple)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_pin_batch_pins_cpu_tensors():
    batch = [{"image": torch.arange(6).view(2, 3), "instances": {"gt_classes": torch.tensor([1])}}]
    pinned = pin_batch(batch)
    assert pinned[0]["image"].is_pinned() and pinned[0]["instances"]["gt_classes"].is_pinned()
    assert torch.equal(pinned[0]["image"], batch[0]["image"])


def test_negative_prefetch_is_an_error_naming_the_key(tiny6):
    name, _ = tiny6
    with pytest.raises(ValueError, match="DATALOADER.PREFETCH_BATCHES must be >= 0"):
        build_detection_train_loader(loader_cfg(name, **{"DATALOADER.PREFETCH_BATCHES": -1}))
