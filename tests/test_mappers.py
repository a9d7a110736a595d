"""Dataset mappers and augmentations on a tiny hand-made panoptic dataset (64x64 images, solid-colour segments).

Every segment has its own colour, so after any geometric augmentation the pixels under a segment's mask must
still show that colour: this is what "masks stay aligned with the image" means here.
"""
from __future__ import annotations

import json
import uuid
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import tv_tensors

from eco_m2f.config import get_cfg
from eco_m2f.data.augmentations import (
    ColorAugSSD,
    FixedSizeCrop,
    RandomCropCategoryAreaConstraint,
    ResizeScale,
    ResizeShortestEdge,
    SemSegMask,
    _scale_hsv_saturation,
    shortest_edge_output_shape,
)
from eco_m2f.data.catalog import DatasetCatalog, MetadataCatalog
from eco_m2f.data.io import id2rgb
from eco_m2f.data.mappers import DATASET_MAPPER, InferenceDatasetMapper, build_mapper

IGNORE = 255
# contiguous classes: 0 sky (stuff), 1 ground (stuff), 2 red box (thing), 3 green box (thing)
THING_IDS = {12: 2, 13: 3}
COLOURS = {0: (40, 40, 200), 1: (120, 80, 20), 2: (230, 20, 20), 3: (20, 220, 20)}
CROWD_COLOUR = (250, 250, 250)  # a crowd region of class 2, drawn white so it is told apart from the red box
VOID_COLOUR = (0, 0, 0)


def _segment_layout(h: int, w: int, variant: int) -> list[tuple[dict, np.ndarray, tuple[int, int, int]]]:
    """(segment info, boolean mask, colour) in painting order; later segments overwrite earlier ones."""
    yy, xx = np.mgrid[0:h, 0:w]
    o = 3 * variant
    segs = [
        ({"category_id": 0, "iscrowd": 0, "isthing": False}, yy < h // 2, COLOURS[0]),
        ({"category_id": 1, "iscrowd": 0, "isthing": False}, yy >= h // 2, COLOURS[1]),
        ({"category_id": 2, "iscrowd": 0, "isthing": True},
         (yy >= 8 + o) & (yy < 28 + o) & (xx >= 6) & (xx < 26), COLOURS[2]),
        ({"category_id": 3, "iscrowd": 0, "isthing": True},
         (yy >= 30) & (yy < h - 6) & (xx >= 34) & (xx < w - 4 - o), COLOURS[3]),
        ({"category_id": 2, "iscrowd": 1, "isthing": True},
         (yy >= h - 14) & (xx >= 4) & (xx < 18), CROWD_COLOUR),
    ]
    return segs


def write_tiny_dataset(root: Path, num_images: int = 4, sizes: list[tuple[int, int]] | None = None) -> list[dict]:
    """Images, panoptic PNGs (large ids, so all three RGB channels matter), semantic PNGs and dataset dicts."""
    sizes = sizes or [(64, 64)] * num_images
    dicts = []
    for i, (h, w) in enumerate(sizes):
        image = np.zeros((h, w, 3), dtype=np.uint8)
        pan = np.zeros((h, w), dtype=np.int64)
        sem = np.full((h, w), IGNORE, dtype=np.uint8)
        segments_info = []
        for k, (info, mask, colour) in enumerate(_segment_layout(h, w, i % 3)):
            seg_id = 1000 + 70001 * k + i  # > 65536: exercises the blue channel of the id encoding
            image[mask] = colour
            pan[mask] = seg_id
            sem[mask] = info["category_id"]
            segments_info.append(dict(info, id=seg_id, area=int(mask.sum()), bbox=[0, 0, 1, 1]))
        # a void border line: panoptic id 0, semantic ignore
        image[:, 0] = VOID_COLOUR
        pan[:, 0] = 0
        sem[:, 0] = IGNORE
        for s in segments_info:
            s["area"] = int((pan == s["id"]).sum())
        segments_info = [s for s in segments_info if s["area"] > 0]
        paths = {k: root / f"{k}_{i}.png" for k in ("img", "pan", "sem")}
        Image.fromarray(image).save(paths["img"])
        Image.fromarray(id2rgb(pan)).save(paths["pan"])
        Image.fromarray(sem).save(paths["sem"])
        dicts.append({
            "file_name": str(paths["img"]), "image_id": i, "height": h, "width": w,
            "pan_seg_file_name": str(paths["pan"]), "segments_info": segments_info,
            "sem_seg_file_name": str(paths["sem"]),
        })
    (root / "dicts.json").write_text(json.dumps(dicts))
    return dicts


def register_tiny(dicts: list[dict]) -> str:
    name = f"tiny_panoptic_{uuid.uuid4().hex[:8]}"
    DatasetCatalog.register(name, lambda: [dict(d) for d in dicts])
    MetadataCatalog.get(name).set(ignore_label=IGNORE, thing_dataset_id_to_contiguous_id=THING_IDS,
                                  stuff_classes=["sky", "ground", "red", "green"], thing_classes=["red", "green"])
    return name


def unregister(name: str) -> None:
    DatasetCatalog.remove(name)
    MetadataCatalog.remove(name)


def make_cfg(name: str, mapper: str = "mask_former_panoptic", **overrides) -> "object":
    cfg = get_cfg()
    cfg.DATASETS.TRAIN = (name,)
    cfg.DATASETS.TEST = (name,)
    cfg.INPUT.DATASET_MAPPER_NAME = mapper
    cfg.INPUT.MIN_SIZE_TRAIN = (64,)
    cfg.INPUT.MAX_SIZE_TRAIN = 1000
    cfg.INPUT.RANDOM_FLIP = "none"
    cfg.INPUT.CROP.ENABLED = False
    cfg.INPUT.IMAGE_SIZE = 96
    cfg.SEED = 7
    for key, value in overrides.items():
        node = cfg
        *path, leaf = key.split(".")
        for p in path:
            node = getattr(node, p)
        setattr(node, leaf, value)
    return cfg


@pytest.fixture()
def tiny(tmp_path):
    dicts = write_tiny_dataset(tmp_path)
    name = register_tiny(dicts)
    yield name, dicts
    unregister(name)


def _seeded(fn, seed: int):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return fn()


def _erode(mask: torch.Tensor, radius: int = 2) -> torch.Tensor:
    """Pixels whose (2r+1)^2 neighbourhood lies in ``mask`` (beyond the image counts as outside: a crop border
    may show colours blended with pixels that were cut away)."""
    outside = torch.nn.functional.pad((~mask).float()[None, None], [radius] * 4, value=1.0)
    return ~(torch.nn.functional.max_pool2d(outside, 2 * radius + 1, stride=1)[0, 0] > 0)


def check_aligned(out: dict, colour_aug: bool = False) -> None:
    """Shapes agree; masks binary; each mask's pixels show its segment's colour; sem_seg agrees with masks."""
    image, inst, sem = out["image"], out["instances"], out["sem_seg"]
    assert image.dtype == torch.uint8 and image.ndim == 3 and image.shape[0] == 3
    h, w = image.shape[-2:]
    assert sem.dtype == torch.int64 and tuple(sem.shape) == (h, w)
    masks, classes = inst["gt_masks"], inst["gt_classes"]
    assert masks.dtype == torch.bool and tuple(masks.shape) == (len(classes), h, w)
    assert classes.dtype == torch.int64
    assert len(set(classes.tolist())) == len(classes), "one mask per segment; the fixture has one per class"
    assert masks.flatten(1).any(1).all(), "empty masks must be dropped"
    img = image.permute(1, 2, 0).to(torch.int64)  # H x W x 3
    checked = 0
    for mask, c in zip(masks, classes.tolist()):
        assert (sem[mask] == c).all(), f"sem_seg disagrees with the mask of class {c}"
        inner = _erode(mask)  # bilinear resizing blends colours along segment borders only
        if not colour_aug and inner.any():
            close = (img[inner] - torch.tensor(COLOURS[c])).abs().max(dim=1).values <= 30
            assert close.float().mean() > 0.95, f"class {c}: mask not over its colour ({close.float().mean():.2f})"
            checked += 1
    if not colour_aug:
        assert checked >= 1 or masks.sum() < 200, "no segment large enough to check the alignment"
    # pixels labelled in sem_seg but in no mask: the crowd region only (class 2, white)
    uncovered = (sem != IGNORE) & ~masks.any(0)
    if uncovered.any():
        assert set(sem[uncovered].unique().tolist()) <= {2}
        inner = _erode(uncovered)
        if not colour_aug and inner.any():
            assert (img[inner] >= 220).all(dim=1).float().mean() > 0.95


# ------------------------------------------------------------------------------------------------- mappers
def test_registry_names_and_unknown_name(tiny):
    name, _ = tiny
    for mapper_name in ("coco_panoptic_lsj", "coco_instance_lsj", "mask_former_panoptic", "mask_former_semantic",
                        "mask_former_instance"):
        assert mapper_name in DATASET_MAPPER
        assert callable(build_mapper(make_cfg(name, mapper_name)))
    with pytest.raises(KeyError, match="mask_former_panoptic"):
        build_mapper(make_cfg(name, "mask_former_panoptc"))


def test_panoptic_mapper_identity(tiny):
    """No augmentation: targets equal the PNGs exactly; crowd dropped from instances, kept in sem_seg."""
    name, dicts = tiny
    d = dicts[0]
    out = build_mapper(make_cfg(name, "mask_former_panoptic"))(dict(d))
    image = np.asarray(Image.open(d["file_name"]))
    assert torch.equal(out["image"], torch.from_numpy(image.copy()).permute(2, 0, 1))
    assert (out["height"], out["width"], out["file_name"], out["image_id"]) == (64, 64, d["file_name"], 0)
    sem_png = torch.from_numpy(np.asarray(Image.open(d["sem_seg_file_name"])).astype(np.int64))
    assert torch.equal(out["sem_seg"], sem_png)
    pan = np.asarray(Image.open(d["pan_seg_file_name"])).astype(np.int64)
    pan_ids = torch.from_numpy(pan[..., 0] + 256 * pan[..., 1] + 256 * 256 * pan[..., 2])
    non_crowd = [s for s in d["segments_info"] if not s["iscrowd"]]
    assert len(d["segments_info"]) == len(non_crowd) + 1
    assert out["instances"]["gt_classes"].tolist() == [s["category_id"] for s in non_crowd]
    for mask, s in zip(out["instances"]["gt_masks"], non_crowd):
        assert torch.equal(mask, pan_ids == s["id"])
    check_aligned(out)


def test_bgr_format_reverses_channels(tiny):
    name, dicts = tiny
    rgb = build_mapper(make_cfg(name, "mask_former_panoptic"))(dict(dicts[0]))["image"]
    bgr = build_mapper(make_cfg(name, "mask_former_panoptic", **{"INPUT.FORMAT": "BGR"}))(dict(dicts[0]))["image"]
    assert torch.equal(bgr, rgb.flip(0))
    test_cfg = make_cfg(name, **{"INPUT.FORMAT": "BGR", "INPUT.MIN_SIZE_TEST": 0})  # 0: no resize
    test_bgr = InferenceDatasetMapper(test_cfg)(dict(dicts[0]))
    assert torch.equal(test_bgr["image"], rgb.flip(0))


AUG_SETTINGS = {
    "lsj": ("coco_panoptic_lsj", {"INPUT.RANDOM_FLIP": "horizontal", "INPUT.MIN_SCALE": 0.3, "INPUT.MAX_SCALE": 2.0}),
    "multiscale_choice_abs_crop": ("mask_former_panoptic", {
        "INPUT.MIN_SIZE_TRAIN": (48, 64, 96), "INPUT.RANDOM_FLIP": "horizontal",
        "INPUT.CROP.ENABLED": True, "INPUT.CROP.TYPE": "absolute", "INPUT.CROP.SIZE": [40, 56]}),
    "range_relative_range_vflip": ("mask_former_panoptic", {
        "INPUT.MIN_SIZE_TRAIN": (40, 100), "INPUT.MIN_SIZE_TRAIN_SAMPLING": "range", "INPUT.RANDOM_FLIP": "vertical",
        "INPUT.CROP.ENABLED": True, "INPUT.CROP.TYPE": "relative_range", "INPUT.CROP.SIZE": [0.5, 0.6]}),
    "relative_crop_category_area": ("mask_former_panoptic", {
        "INPUT.MIN_SIZE_TRAIN": (80,), "INPUT.CROP.ENABLED": True, "INPUT.CROP.TYPE": "relative",
        "INPUT.CROP.SIZE": [0.5, 0.5], "INPUT.CROP.SINGLE_CATEGORY_MAX_AREA": 0.6, "INPUT.SIZE_DIVISIBILITY": 32}),
    "instance_panoptic_source": ("mask_former_instance", {
        "INPUT.MIN_SIZE_TRAIN": (48, 96), "INPUT.RANDOM_FLIP": "horizontal",
        "INPUT.CROP.ENABLED": True, "INPUT.CROP.TYPE": "absolute", "INPUT.CROP.SIZE": [48, 48]}),
}


@pytest.mark.parametrize("setting", sorted(AUG_SETTINGS))
def test_masks_stay_aligned_under_augmentation(tiny, setting):
    name, dicts = tiny
    mapper_name, overrides = AUG_SETTINGS[setting]
    mapper = build_mapper(make_cfg(name, mapper_name, **overrides))
    flipped_seen = False
    for seed in range(12):
        d = dicts[seed % len(dicts)]
        out = _seeded(lambda: mapper(dict(d)), seed)
        check_aligned(out)
        assert (out["height"], out["width"]) == (64, 64)
        if mapper_name == "mask_former_instance":
            assert set(out["instances"]["gt_classes"].tolist()) <= {2, 3}
            assert set(out["sem_seg"].unique().tolist()) <= {2, 3, IGNORE}
        if mapper_name == "coco_panoptic_lsj":
            assert tuple(out["image"].shape[-2:]) == (96, 96)
        if "INPUT.SIZE_DIVISIBILITY" in overrides:
            assert out["image"].shape[-2] % 32 == 0 and out["image"].shape[-1] % 32 == 0
        # the red box sits in the upper-left quadrant: seeing it on the right/bottom means a flip happened
        red = out["instances"]["gt_masks"][out["instances"]["gt_classes"] == 2]
        if len(red) and overrides.get("INPUT.RANDOM_FLIP", "none") != "none" and mapper_name == "coco_panoptic_lsj":
            h, w = out["image"].shape[-2:]
            xs = red[0].nonzero()[:, 1].float()
            flipped_seen |= bool(xs.mean() > 0.5 * w * 0.6)
    if mapper_name == "coco_panoptic_lsj":
        assert flipped_seen


def test_lsj_output_size_and_padding(tiny):
    name, dicts = tiny
    # scale fixed at 0.5 of IMAGE_SIZE 128: the 64x64 image stays 64x64, padded to 128x128
    cfg = make_cfg(name, "coco_panoptic_lsj", **{"INPUT.IMAGE_SIZE": 128, "INPUT.MIN_SCALE": 0.5,
                                                 "INPUT.MAX_SCALE": 0.5})
    out = build_mapper(cfg)(dict(dicts[1]))
    assert tuple(out["image"].shape) == (3, 128, 128)
    assert (out["sem_seg"][64:, :] == IGNORE).all() and (out["sem_seg"][:, 64:] == IGNORE).all()
    assert not out["instances"]["gt_masks"][:, 64:, :].any() and not out["instances"]["gt_masks"][:, :, 64:].any()
    assert (out["image"][:, 64:, :] == 128).all()
    assert (out["sem_seg"][:64, 1:64] != IGNORE).all()
    check_aligned(out)
    # scale 2.0: 64 -> 256, then a 128x128 crop; no padding left
    cfg = make_cfg(name, "coco_panoptic_lsj", **{"INPUT.IMAGE_SIZE": 128, "INPUT.MIN_SCALE": 2.0,
                                                 "INPUT.MAX_SCALE": 2.0})
    for seed in range(4):
        out = _seeded(lambda: build_mapper(cfg)(dict(dicts[0])), seed)
        assert tuple(out["image"].shape) == (3, 128, 128)
        check_aligned(out)


def test_semantic_mapper(tiny):
    name, dicts = tiny
    cfg = make_cfg(name, "mask_former_semantic", **{"INPUT.MIN_SIZE_TRAIN": (48, 80), "INPUT.RANDOM_FLIP": "horizontal",
                                                    "INPUT.CROP.ENABLED": True, "INPUT.CROP.TYPE": "absolute",
                                                    "INPUT.CROP.SIZE": [40, 40]})
    mapper = build_mapper(cfg)
    for seed in range(6):
        out = _seeded(lambda: mapper(dict(dicts[seed % 4])), seed)
        sem, inst = out["sem_seg"], out["instances"]
        present = sorted(set(sem.unique().tolist()) - {IGNORE})
        assert inst["gt_classes"].tolist() == present
        for mask, c in zip(inst["gt_masks"], present):
            assert torch.equal(mask, sem == c)
        assert tuple(out["image"].shape[-2:]) == tuple(sem.shape)
    out = build_mapper(make_cfg(name, "mask_former_semantic"))(dict(dicts[0]))
    assert out["instances"]["gt_classes"].tolist() == [0, 1, 2, 3]  # the crowd region counts for class 2 here


def test_instance_mapper_from_annotations(tiny):
    """Detectron2-style instance dicts: polygons and RLE decoded, crowd dropped, things only."""
    from pycocotools import mask as mask_util

    name, dicts = tiny
    d = {k: v for k, v in dicts[0].items() if k not in ("pan_seg_file_name", "segments_info")}
    rle_mask = np.zeros((64, 64), dtype=np.uint8, order="F")
    rle_mask[30:58, 34:60] = 1  # the green box
    rle = mask_util.encode(rle_mask)
    rle["counts"] = rle["counts"].decode()
    d["annotations"] = [
        {"category_id": 2, "iscrowd": 0, "segmentation": [[6, 8, 25.99, 8, 25.99, 27.99, 6, 27.99]],
         "bbox": [6, 8, 20, 20]},
        {"category_id": 3, "iscrowd": 0, "segmentation": rle, "bbox": [34, 30, 26, 28]},
        {"category_id": 2, "iscrowd": 1, "segmentation": [[4, 50, 18, 50, 18, 64, 4, 64]], "bbox": [4, 50, 14, 14]},
    ]
    cfg = make_cfg(name, "mask_former_instance")
    out = build_mapper(cfg)(d)
    assert out["instances"]["gt_classes"].tolist() == [2, 3]
    assert torch.equal(out["instances"]["gt_masks"][1], torch.from_numpy(rle_mask).bool())
    assert out["instances"]["gt_masks"][0].sum() >= 19 * 19
    check_aligned(out)
    lsj = build_mapper(make_cfg(name, "coco_instance_lsj", **{"INPUT.RANDOM_FLIP": "horizontal"}))
    for seed in range(4):
        out = _seeded(lambda: lsj(dict(d)), seed)
        assert tuple(out["image"].shape[-2:]) == (96, 96)
        check_aligned(out)
    # no annotation left: empty tensors of the right shapes
    out = build_mapper(cfg)(dict(d, annotations=[d["annotations"][2]]))
    assert out["instances"]["gt_classes"].shape == (0,)
    assert out["instances"]["gt_masks"].shape == (0, 64, 64)
    assert (out["sem_seg"] == IGNORE).all()


def test_many_overlapping_instances_match_single_instance_mapping(tiny):
    """11 overlapping annotations (two packed bit planes) map exactly as each one mapped alone with the same seed."""
    name, dicts = tiny
    base = {k: v for k, v in dicts[0].items() if k not in ("pan_seg_file_name", "segments_info")}
    anns = [{"category_id": i % 2 + 2, "iscrowd": 0, "bbox": [0, 0, 1, 1],
             "segmentation": [[2 + 4 * i, 3 + 2 * i, 30 + 3 * i, 3 + 2 * i, 30 + 3 * i, 40 + i, 2 + 4 * i, 40 + i]]}
            for i in range(11)]
    mapper = build_mapper(make_cfg(name, "coco_instance_lsj", **{"INPUT.RANDOM_FLIP": "horizontal"}))
    for seed in range(3):
        together = _seeded(lambda: mapper(dict(base, annotations=anns)), seed)["instances"]["gt_masks"]
        assert len(together) == 11
        for i, ann in enumerate(anns):
            alone = _seeded(lambda: mapper(dict(base, annotations=[ann])), seed)["instances"]["gt_masks"]
            assert torch.equal(alone[0], together[i])


def test_empty_segments_give_empty_instances(tiny):
    name, dicts = tiny
    d = dict(dicts[0], segments_info=[])
    out = build_mapper(make_cfg(name, "mask_former_panoptic", **{"INPUT.MIN_SIZE_TRAIN": (32,)}))(d)
    assert out["instances"]["gt_classes"].shape == (0,) and out["instances"]["gt_classes"].dtype == torch.int64
    assert out["instances"]["gt_masks"].shape == (0, 32, 32) and out["instances"]["gt_masks"].dtype == torch.bool
    assert (out["sem_seg"] == IGNORE).all()


def test_test_mapper_resize_and_original_size(tmp_path):
    dicts = write_tiny_dataset(tmp_path, sizes=[(48, 64)])
    name = register_tiny(dicts)
    try:
        cfg = make_cfg(name, **{"INPUT.MIN_SIZE_TEST": 32, "INPUT.MAX_SIZE_TEST": 1000})
        out = InferenceDatasetMapper(cfg)(dicts[0])
        assert tuple(out["image"].shape) == (3, 32, 43)  # 64 * 32 / 48 = 42.7
        assert (out["height"], out["width"]) == (48, 64)
        assert out["pan_seg_file_name"] == dicts[0]["pan_seg_file_name"]  # other keys kept for evaluators
        out = InferenceDatasetMapper(make_cfg(name, **{"INPUT.MIN_SIZE_TEST": 64, "INPUT.MAX_SIZE_TEST": 80}))(dicts[0])
        assert tuple(out["image"].shape) == (3, 60, 80)  # long side capped
        # no flip, deterministic
        a = _seeded(lambda: InferenceDatasetMapper(make_cfg(name))(dicts[0])["image"], 0)
        b = _seeded(lambda: InferenceDatasetMapper(make_cfg(name))(dicts[0])["image"], 1)
        assert torch.equal(a, b)
    finally:
        unregister(name)


def test_corrupt_image_and_size_mismatch_name_the_file(tiny, tmp_path):
    name, dicts = tiny
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    mapper = build_mapper(make_cfg(name, "mask_former_panoptic"))
    with pytest.raises(ValueError, match="broken.png"):
        mapper(dict(dicts[0], file_name=str(bad)))
    with pytest.raises(ValueError, match="broken.png"):
        mapper(dict(dicts[0], pan_seg_file_name=str(bad)))
    with pytest.raises(ValueError, match="img_0.png"):
        mapper(dict(dicts[0], height=65))
    with pytest.raises(KeyError, match="sem_seg_file_name"):
        build_mapper(make_cfg(name, "mask_former_semantic"))({k: v for k, v in dicts[0].items()
                                                               if k != "sem_seg_file_name"})


# ------------------------------------------------------------------------------------------- augmentations
def _sample(h: int = 40, w: int = 60) -> dict:
    image = torch.randint(0, 256, (3, h, w), dtype=torch.uint8)
    ids = torch.arange(h * w, dtype=torch.int64).reshape(h, w)
    return {"image": tv_tensors.Image(image), "ids": tv_tensors.Mask(ids), "sem": SemSegMask(ids % 7)}


def test_transforms_keep_shapes_and_pixel_identity():
    """Each output pixel's id says where it came from: crops copy the image pixel there exactly, and a 2x resize
    maps output pixel (y, x) to source pixel (y // 2, x // 2) (nearest at pixel centres)."""
    src = _sample()
    src_ids = src["ids"].as_subclass(torch.Tensor)
    for t in (ResizeShortestEdge([80], 1000), ResizeScale(2.0, 2.0, 40, 60), FixedSizeCrop((30, 30)),
              RandomCropCategoryAreaConstraint("absolute", [20, 25])):
        out = _seeded(lambda: t(dict(src)), 3)
        h, w = out["image"].shape[-2:]
        ids = out["ids"].as_subclass(torch.Tensor)
        assert ids.shape == (h, w) and out["sem"].shape == (h, w)
        assert type(out["ids"]) is tv_tensors.Mask and type(out["sem"]) is SemSegMask
        assert torch.equal(out["sem"].as_subclass(torch.Tensor), ids % 7)
        if (h, w) == (80, 120):
            yy, xx = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
            assert torch.equal(ids, src_ids[yy // 2, xx // 2])
        else:
            copied = src["image"].reshape(3, -1)[:, ids.reshape(-1)].reshape(3, h, w)
            assert torch.equal(copied, out["image"].as_subclass(torch.Tensor))
    assert shortest_edge_output_shape(40, 60, 80, 1000) == (80, 120)
    assert shortest_edge_output_shape(40, 60, 80, 100) == (67, 100)


def test_resize_shortest_edge_sampling():
    t_choice = ResizeShortestEdge([20, 30], 1000, "choice")
    t_range = ResizeShortestEdge([20, 30], 1000, "range")
    src = _sample()
    choice = {_seeded(lambda: t_choice(dict(src)), s)["image"].shape[-2] for s in range(30)}
    rng = {_seeded(lambda: t_range(dict(src)), s)["image"].shape[-2] for s in range(30)}
    assert choice == {20, 30}
    assert rng <= set(range(20, 31)) and len(rng) > 3
    with pytest.raises(ValueError, match="range"):
        ResizeShortestEdge([20, 30, 40], 1000, "range")


def test_fixed_size_crop_pads_with_ignore_and_zero():
    src = _sample(20, 24)
    out = FixedSizeCrop((32, 32))(dict(src))
    assert out["image"].shape == (3, 32, 32)
    assert (out["sem"][20:] == 255).all() and (out["sem"][:, 24:] == 255).all()
    assert (out["ids"][20:] == 0).all() and (out["ids"][:, 24:] == 0).all()
    assert (out["image"][:, 20:] == 128).all()
    assert torch.equal(out["ids"][:20, :24].as_subclass(torch.Tensor), src["ids"].as_subclass(torch.Tensor))


def test_category_area_constraint_retries():
    """A 32x32 category-1 corner in a 64x64 category-0 image: 24x24 crops often hold one category only."""
    sem = torch.zeros(64, 64, dtype=torch.int64)
    sem[:32, :32] = 1
    sem[40:, 40:] = 255  # ignored pixels never count
    sample = {"image": tv_tensors.Image(torch.zeros(3, 64, 64, dtype=torch.uint8)), "sem": SemSegMask(sem)}

    def ok(out) -> bool:
        labels, counts = out["sem"].unique(return_counts=True)
        counts = counts[labels != 255]
        return len(counts) > 1 and counts.max() < 0.9 * counts.sum()

    free = RandomCropCategoryAreaConstraint("absolute", [24, 24], 1.0)
    constrained = RandomCropCategoryAreaConstraint("absolute", [24, 24], 0.9)
    # of the 41 x 41 crop positions 42% pass, so 10 tries pass with probability 1 - 0.58^10 = 0.996
    free_rate = np.mean([ok(_seeded(lambda: free(dict(sample)), s)) for s in range(60)])
    con_rate = np.mean([ok(_seeded(lambda: constrained(dict(sample)), s)) for s in range(60)])
    assert free_rate < 0.6
    assert con_rate >= 0.95
    with pytest.raises(ValueError, match="SemSegMask"):
        constrained({"image": sample["image"], "m": tv_tensors.Mask(sem)})


def test_color_aug_ssd_changes_image_only():
    src = _sample()
    aug = ColorAugSSD()
    changed = 0
    for s in range(8):
        out = _seeded(lambda: aug(dict(src)), s)
        assert out["image"].dtype == torch.uint8 and out["image"].shape == src["image"].shape
        assert torch.equal(out["ids"], src["ids"]) and torch.equal(out["sem"], src["sem"])
        changed += not torch.equal(out["image"], src["image"])
    assert changed >= 6  # each of 4 steps fires with p=1/2: all four skipped has p=1/16
    # saturation: alpha 0 -> grey at the pixel's value (max channel); alpha 1 -> identity
    img = src["image"].float()
    grey = _scale_hsv_saturation(img.clone(), 0.0)
    assert torch.allclose(grey, img.amax(0, keepdim=True).expand_as(img))
    assert torch.allclose(_scale_hsv_saturation(img.clone(), 1.0), img)
    sat = _scale_hsv_saturation(img.clone(), 3.0)
    assert torch.allclose(sat.amax(0), img.amax(0)) and sat.min() >= 0


SYNTHETIC_CASES = [
    ("synthetic_panoptic_train", "mask_former_panoptic"),
    ("synthetic_cityscapes_fine_panoptic_train", "mask_former_panoptic"),
    ("synthetic_cityscapes_fine_sem_seg_train", "mask_former_semantic"),
    ("synthetic_cityscapes_fine_instance_seg_train", "mask_former_instance"),
]


def test_synthetic_dataset_through_the_mappers(tmp_path, monkeypatch):
    """The project's synthetic dataset (tiny): targets agree with its semantic PNGs in every layout."""
    from eco_m2f.data.datasets.synthetic import generate_synthetic_dataset
    from eco_m2f.data.io import read_png_ids

    monkeypatch.setenv("DETECTRON2_DATASETS", str(tmp_path))
    generate_synthetic_dataset(tmp_path / "synthetic", num_train=3, num_val=1, image_size=64, seed=0)
    for name, mapper_name in SYNTHETIC_CASES:
        mapper = build_mapper(make_cfg(name, mapper_name))  # no resize (64 -> 64), no crop, no flip
        for d in DatasetCatalog.get(name):
            out = mapper(dict(d))
            inst = out["instances"]
            assert out["image"].shape == (3, 64, 64) and inst["gt_masks"].shape[1:] == (64, 64)
            assert inst["gt_masks"].dtype == torch.bool and len(inst["gt_classes"]) == len(inst["gt_masks"])
            for mask, c in zip(inst["gt_masks"], inst["gt_classes"].tolist()):
                assert mask.any() and (out["sem_seg"][mask] == c).all()
            if mapper_name != "mask_former_instance":
                sem_png = torch.from_numpy(read_png_ids(d["sem_seg_file_name"])).long()
                assert torch.equal(out["sem_seg"], sem_png), f"{name}: sem_seg differs from {d['sem_seg_file_name']}"
            if mapper_name == "mask_former_panoptic":
                expected = [s["category_id"] for s in d["segments_info"] if not s["iscrowd"]]
                assert sorted(inst["gt_classes"].tolist()) == sorted(expected)
            if mapper_name == "mask_former_instance":
                assert len(inst["gt_classes"]) == sum(not a["iscrowd"] for a in d["annotations"])
