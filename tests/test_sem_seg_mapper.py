"""The lean ``sem_seg`` mapper (mmseg/Segmenter pipeline), its transforms, the test mapper and the train loader.

The tiny dataset paints each class in its own colour, so "image and label moved together" is checked pixel by
pixel: wherever the label says class k, the image must show class k's colour.
"""
from __future__ import annotations

import itertools
import uuid
from pathlib import Path

import numpy as np
import pytest
import torch
from torchvision import tv_tensors

from eco_m2f.data.augmentations import RandomRatioResize, SemSegMask, build_semantic_augmentation
from eco_m2f.data.build import build_detection_train_loader
from eco_m2f.data.catalog import DatasetCatalog, MetadataCatalog
from eco_m2f.data.io import write_png
from eco_m2f.data.mappers import DATASET_MAPPER, InferenceDatasetMapper, build_mapper
from test_mappers import _seeded, make_cfg

IGNORE = 255
COLOURS = np.array([(200, 30, 30), (30, 200, 30), (30, 30, 200), (220, 220, 40)], dtype=np.uint8)
VIT_MEAN = [127.5, 127.5, 127.5]


def _layout(h: int, w: int, variant: int) -> np.ndarray:
    """Classes 0..3 in an asymmetric arrangement (a flip is visible), ignore in a corner block."""
    yy, xx = np.mgrid[0:h, 0:w]
    lab = np.zeros((h, w), np.uint8)
    lab[xx >= w // 3 + variant] = 1
    lab[(yy >= h // 2) & (xx >= w // 2)] = 2
    lab[(yy < h // 4) & (xx >= 3 * w // 4)] = 3
    lab[(yy >= h - 6) & (xx < 8)] = IGNORE
    return lab


def write_semantic_dataset(root: Path, sizes: list[tuple[int, int]]) -> list[dict]:
    dicts = []
    for i, (h, w) in enumerate(sizes):
        lab = _layout(h, w, i)
        image = np.zeros((h, w, 3), np.uint8)  # ignore pixels are black
        known = lab != IGNORE
        image[known] = COLOURS[lab[known]]
        write_png(root / f"img_{i}.png", image)
        write_png(root / f"lab_{i}.png", lab)
        dicts.append({"file_name": str(root / f"img_{i}.png"), "sem_seg_file_name": str(root / f"lab_{i}.png"),
                      "image_id": i, "height": h, "width": w})
    return dicts


@pytest.fixture()
def semantic(tmp_path):
    dicts = write_semantic_dataset(tmp_path, [(40, 60), (60, 40), (48, 48), (36, 52)])
    name = f"tiny_sem_seg_{uuid.uuid4().hex[:8]}"
    DatasetCatalog.register(name, lambda: [dict(d) for d in dicts])
    MetadataCatalog.get(name).set(ignore_label=IGNORE, stuff_classes=["red", "green", "blue", "yellow"],
                                  evaluator_type="sem_seg")
    yield name, dicts
    DatasetCatalog.remove(name)
    MetadataCatalog.remove(name)


SEGMENTER_RECIPE = {  # Segmenter's ADE20K recipe scaled to tiny images: base scale (32, 128), ratio 0.5-2, 32x32
    "INPUT.MIN_SIZE_TRAIN": (32,), "INPUT.MAX_SIZE_TRAIN": 128, "INPUT.MIN_SIZE_TRAIN_SAMPLING": "ratio_range",
    "INPUT.MIN_SCALE": 0.5, "INPUT.MAX_SCALE": 2.0, "INPUT.CROP.ENABLED": True, "INPUT.CROP.TYPE": "absolute",
    "INPUT.CROP.SIZE": [32, 32], "INPUT.CROP.SINGLE_CATEGORY_MAX_AREA": 0.75, "INPUT.COLOR_AUG_SSD": True,
    "INPUT.RANDOM_FLIP": "horizontal", "MODEL.PIXEL_MEAN": VIT_MEAN, "MODEL.PIXEL_STD": VIT_MEAN, "SEED": 5,
}


def sem_cfg(name: str, **overrides):
    """A config with the ``sem_seg`` mapper and :data:`SEGMENTER_RECIPE` on dataset ``name``."""
    return make_cfg(name, "sem_seg", **{**SEGMENTER_RECIPE, **overrides})


def check_colours_follow_labels(out: dict, max_bad: float = 0.05) -> None:
    """Away from class borders (where bilinear resizing blends colours), pixels show their label's colour."""
    image, sem = out["image"].permute(1, 2, 0).to(torch.int64), out["sem_seg"]
    inner = torch.ones_like(sem, dtype=torch.bool)
    inner[1:-1, 1:-1] = (sem[1:-1, 1:-1] == sem[:-2, 1:-1]) & (sem[1:-1, 1:-1] == sem[2:, 1:-1]) & \
        (sem[1:-1, 1:-1] == sem[1:-1, :-2]) & (sem[1:-1, 1:-1] == sem[1:-1, 2:])
    known = inner & (sem != IGNORE)
    expected = torch.from_numpy(COLOURS.astype(np.int64))[sem[known]]
    bad = (image[known] - expected).abs().max(dim=1).values > 12
    assert known.sum() > 50 and bad.float().mean() <= max_bad, f"{bad.float().mean():.3f} of pixels off their colour"


# ------------------------------------------------------------------------------------------------- outputs
def test_registered_and_outputs_only_image_and_sem_seg(semantic):
    name, dicts = semantic
    assert "sem_seg" in DATASET_MAPPER
    mapper = build_mapper(sem_cfg(name))
    for s in range(6):
        d = dicts[s % len(dicts)]
        out = _seeded(lambda: mapper(dict(d)), s)
        assert set(out) == {"file_name", "image_id", "height", "width", "image", "sem_seg"}
        assert out["image"].dtype == torch.uint8 and tuple(out["image"].shape) == (3, 32, 32)
        assert out["sem_seg"].dtype == torch.int64 and tuple(out["sem_seg"].shape) == (32, 32)
        assert (out["height"], out["width"], out["file_name"], out["image_id"]) == (
            d["height"], d["width"], d["file_name"], d["image_id"])
        assert set(out["sem_seg"].unique().tolist()) <= {0, 1, 2, 3, IGNORE}
    assert isinstance(build_mapper(sem_cfg(name), is_train=False), InferenceDatasetMapper)


def test_padding_to_the_crop_is_ignore_and_pixel_mean(semantic):
    """A ratio of 0.5 shrinks every image below the 32x32 crop: the rest is padding (label 255, image = mean)."""
    name, dicts = semantic
    for mean, fill in ((VIT_MEAN, (128, 128, 128)), ([123.675, 116.28, 103.53], (124, 116, 104))):
        cfg = sem_cfg(name, **{"INPUT.MIN_SCALE": 0.5, "INPUT.MAX_SCALE": 0.5, "INPUT.COLOR_AUG_SSD": False,
                               "MODEL.PIXEL_MEAN": mean})
        d = dicts[0]  # 40 x 60 -> short side 16, long side 64 allowed: 16 x 24
        out = _seeded(lambda: build_mapper(cfg)(dict(d)), 0)
        image, sem = out["image"], out["sem_seg"]
        assert tuple(image.shape) == (3, 32, 32)
        assert (sem[16:] == IGNORE).all() and (sem[:, 24:] == IGNORE).all()
        assert (sem[:16, :24] != IGNORE).float().mean() > 0.9
        pad = image[:, 16:, :].reshape(3, -1)
        assert (pad == torch.tensor(fill, dtype=torch.uint8).view(3, 1)).all()
    # BGR (PIXEL_MEAN in BGR order too): the same sample with its channels, padding included, reversed
    bgr_cfg = sem_cfg(name, **{"INPUT.MIN_SCALE": 0.5, "INPUT.MAX_SCALE": 0.5, "INPUT.COLOR_AUG_SSD": False,
                               "INPUT.FORMAT": "BGR", "MODEL.PIXEL_MEAN": [103.53, 116.28, 123.675]})
    bgr = _seeded(lambda: build_mapper(bgr_cfg)(dict(d)), 0)
    assert torch.equal(bgr["image"], image.flip(0)) and torch.equal(bgr["sem_seg"], sem)


def test_ratio_range_resize_follows_mmseg():
    """Base scale (short 32, long 64) x r: the largest aspect-keeping size within (32 r, 64 r)."""
    sample = {"image": tv_tensors.Image(torch.zeros(3, 40, 60, dtype=torch.uint8)),
              "sem_seg": SemSegMask(torch.zeros(40, 60, dtype=torch.int64))}
    out = RandomRatioResize(32, 64, 1.5, 1.5)(dict(sample))  # short <= 48, long <= 96: scale 1.2
    assert tuple(out["image"].shape[-2:]) == (48, 72) and tuple(out["sem_seg"].shape) == (48, 72)
    out = RandomRatioResize(32, 40, 1.0, 1.0)(dict(sample))  # long side binds: 40 / 60
    assert tuple(out["image"].shape[-2:]) == (27, 40)
    resize = RandomRatioResize(32, 64, 0.5, 2.0)
    shorts = {_seeded(lambda: resize(dict(sample)), s)["image"].shape[-2] for s in range(40)}
    assert min(shorts) >= 16 and max(shorts) <= 64 and len(shorts) > 10  # 40 * [0.4, 1.6], continuous ratio
    with pytest.raises(ValueError, match="MIN_SIZE_TRAIN"):
        build_semantic_augmentation(sem_cfg("x", **{"INPUT.MIN_SIZE_TRAIN": (32, 48)}))
    with pytest.raises(ValueError, match="MIN_SIZE_TRAIN_SAMPLING"):
        build_semantic_augmentation(sem_cfg("x", **{"INPUT.MIN_SIZE_TRAIN_SAMPLING": "ratio"}))


def test_crop_respects_the_single_category_limit(tmp_path):
    """A 96x96 map that is class 0 except a 48x48 class-1 corner: most 32x32 crops are mostly one class."""
    lab = np.zeros((96, 96), np.uint8)
    lab[:48, :48] = 1
    image = COLOURS[lab]
    write_png(tmp_path / "img.png", image)
    write_png(tmp_path / "lab.png", lab)
    d = {"file_name": str(tmp_path / "img.png"), "sem_seg_file_name": str(tmp_path / "lab.png"), "image_id": 0,
         "height": 96, "width": 96}
    name = f"tiny_corner_{uuid.uuid4().hex[:8]}"
    DatasetCatalog.register(name, lambda: [dict(d)])
    MetadataCatalog.get(name).set(ignore_label=IGNORE, stuff_classes=["a", "b"])
    try:
        def ok_rate(limit: float) -> float:
            mapper = build_mapper(sem_cfg(name, **{
                "INPUT.MIN_SIZE_TRAIN": (96,), "INPUT.MAX_SIZE_TRAIN": 96, "INPUT.MIN_SCALE": 1.0,
                "INPUT.MAX_SCALE": 1.0, "INPUT.CROP.SINGLE_CATEGORY_MAX_AREA": limit, "INPUT.COLOR_AUG_SSD": False}))
            ok = []
            for s in range(40):
                counts = torch.bincount(_seeded(lambda: mapper(dict(d)), s)["sem_seg"].flatten(), minlength=2)
                ok.append(bool(counts.max() < 0.75 * counts.sum()))
            return float(np.mean(ok))

        # of the 65 x 65 crop offsets 20.6% pass (class 1 on 25-75% of the crop); ten draws pass with p = 0.90
        assert ok_rate(1.0) < 0.4
        assert ok_rate(0.75) > 0.75
    finally:
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)


def test_flip_moves_image_and_label_together(semantic):
    name, dicts = semantic
    cfg = sem_cfg(name, **{"INPUT.MIN_SIZE_TRAIN": (40,), "INPUT.MAX_SIZE_TRAIN": 60, "INPUT.MIN_SCALE": 1.0,
                           "INPUT.MAX_SCALE": 1.0, "INPUT.CROP.ENABLED": False, "INPUT.COLOR_AUG_SSD": False})
    mapper = build_mapper(cfg)
    d = dicts[0]  # 40 x 60: the resize is the identity
    ref = torch.from_numpy(_layout(40, 60, 0).astype(np.int64))
    seen = set()
    for s in range(12):
        out = _seeded(lambda: mapper(dict(d)), s)
        flipped = torch.equal(out["sem_seg"], ref.flip(-1))
        assert flipped or torch.equal(out["sem_seg"], ref)
        check_colours_follow_labels(out, max_bad=0.0)
        seen.add(flipped)
    assert seen == {True, False}


def test_full_pipeline_keeps_image_and_label_aligned(semantic):
    """Resize + crop + flip (no colour change): colours still follow the labels after every draw."""
    name, dicts = semantic
    mapper = build_mapper(sem_cfg(name, **{"INPUT.COLOR_AUG_SSD": False}))
    for s in range(8):
        check_colours_follow_labels(_seeded(lambda: mapper(dict(dicts[s % len(dicts)])), s))


def test_photometric_distortion_changes_the_image_only(semantic):
    name, dicts = semantic
    base = {"INPUT.MIN_SIZE_TRAIN": (40,), "INPUT.MAX_SIZE_TRAIN": 60, "INPUT.MIN_SCALE": 1.0,
            "INPUT.MAX_SCALE": 1.0, "INPUT.CROP.ENABLED": False, "INPUT.RANDOM_FLIP": "none"}
    plain = build_mapper(sem_cfg(name, **base, **{"INPUT.COLOR_AUG_SSD": False}))(dict(dicts[0]))
    changed = 0
    for s in range(6):
        out = _seeded(lambda: build_mapper(sem_cfg(name, **base))(dict(dicts[0])), s)
        assert torch.equal(out["sem_seg"], plain["sem_seg"])
        changed += not torch.equal(out["image"], plain["image"])
    assert changed >= 4


def test_labels_outside_the_classes_name_the_file_and_values(semantic, tmp_path):
    name, dicts = semantic
    lab = _layout(40, 60, 0)
    lab[0, 0], lab[1, 1] = 7, 200  # 4 classes: 7 and 200 are neither classes nor the ignore label 255
    write_png(tmp_path / "bad_labels.png", lab)
    bad = dict(dicts[0], sem_seg_file_name=str(tmp_path / "bad_labels.png"))
    for mapper_name in ("sem_seg", "mask_former_semantic"):
        with pytest.raises(ValueError, match=r"bad_labels\.png.*: 7, 200 \(2 pixels\)"):
            build_mapper(sem_cfg(name, **{"INPUT.DATASET_MAPPER_NAME": mapper_name}))(bad)
    with pytest.raises(KeyError, match="sem_seg_file_name"):
        build_mapper(sem_cfg(name))({k: v for k, v in dicts[0].items() if k != "sem_seg_file_name"})


def test_size_divisibility_pads_after_the_crop(semantic):
    name, dicts = semantic
    cfg = sem_cfg(name, **{"INPUT.CROP.SIZE": [30, 30], "INPUT.SIZE_DIVISIBILITY": 16})
    out = _seeded(lambda: build_mapper(cfg)(dict(dicts[1])), 3)
    assert tuple(out["sem_seg"].shape) == (32, 32) and (out["sem_seg"][30:] == IGNORE).all()


# ------------------------------------------------------------------------------------------ test-time input
def test_test_mapper_gives_what_sliding_window_inference_needs(semantic):
    """MIN_SIZE_TEST 0: the image exactly as stored; otherwise mmseg's keep-ratio test resize. Never padded,
    original size and the label path kept for the evaluator, deterministic."""
    name, dicts = semantic
    d = dicts[0]  # 40 x 60
    out = InferenceDatasetMapper(sem_cfg(name, **{"INPUT.MIN_SIZE_TEST": 0}))(dict(d))
    stored = torch.from_numpy(COLOURS[np.minimum(_layout(40, 60, 0), 3)]).permute(2, 0, 1)
    known = torch.from_numpy(_layout(40, 60, 0) != IGNORE)
    assert out["image"].dtype == torch.uint8 and tuple(out["image"].shape) == (3, 40, 60)
    assert torch.equal(out["image"][:, known], stored[:, known])
    assert (out["height"], out["width"], out["sem_seg_file_name"]) == (40, 60, d["sem_seg_file_name"])
    # mmseg: Resize(scale=(2048, 512), keep_ratio=True) == shortest edge 512 capped at 2048; scaled down here
    cfg = sem_cfg(name, **{"INPUT.MIN_SIZE_TEST": 32, "INPUT.MAX_SIZE_TEST": 128})
    out = InferenceDatasetMapper(cfg)(dict(d))
    assert tuple(out["image"].shape) == (3, 32, 48) and (out["height"], out["width"]) == (40, 60)
    cfg = sem_cfg(name, **{"INPUT.MIN_SIZE_TEST": 32, "INPUT.MAX_SIZE_TEST": 40})
    assert tuple(InferenceDatasetMapper(cfg)(dict(d))["image"].shape) == (3, 27, 40)
    assert torch.equal(_seeded(lambda: InferenceDatasetMapper(cfg)(dict(d))["image"], 0),
                       _seeded(lambda: InferenceDatasetMapper(cfg)(dict(d))["image"], 1))


# ------------------------------------------------------------------------------------------------- loader
def test_train_loader_batches_with_the_sem_seg_mapper(semantic):
    name, _ = semantic
    cfg = sem_cfg(name, **{"SOLVER.IMS_PER_BATCH": 3, "DATALOADER.NUM_WORKERS": 0,
                           "DATALOADER.ASPECT_RATIO_GROUPING": False})
    batches = list(itertools.islice(iter(build_detection_train_loader(cfg, rank=0, world_size=1)), 3))
    again = list(itertools.islice(iter(build_detection_train_loader(cfg, rank=0, world_size=1)), 3))
    assert len(batches) == 3
    for batch, batch2 in zip(batches, again):
        assert len(batch) == 3
        for d, d2 in zip(batch, batch2):
            assert "instances" not in d
            assert tuple(d["image"].shape) == (3, 32, 32) and tuple(d["sem_seg"].shape) == (32, 32)
            assert torch.equal(d["image"], d2["image"]) and torch.equal(d["sem_seg"], d2["sem_seg"])  # seeded
