"""ADE20K (SceneParsing, 150 classes) semantic and panoptic in Mask2Former's layout.

Registered names: ``ade20k_sem_seg_{train,val}`` (evaluator_type ``sem_seg``) and
``ade20k_panoptic_{train,val}`` (evaluator_type ``ade20k_panoptic_seg``; 100 things + 50 stuff,
category id = semantic class index 0..149). The class names are those of the SceneParsing
``objectInfo150`` list; the thing classes are the 100 classes of the ADE20K instance
challenge (its ids map in order onto the 100 thing classes below). Colours are our own.
"""
from __future__ import annotations

import glob
import os
from typing import Any

from ..catalog import DatasetCatalog, DatasetPath, MetadataCatalog, datasets_root
from .common import load_panoptic_json, palette, panoptic_metadata, register_sem_seg, require_path

ADE20K_150_NAMES: tuple[str, ...] = (
    "wall", "building", "sky", "floor", "tree", "ceiling", "road, route", "bed", "window ", "grass",
    "cabinet", "sidewalk, pavement", "person", "earth, ground", "door", "table", "mountain, mount",
    "plant", "curtain", "chair", "car", "water", "painting, picture", "sofa", "shelf", "house", "sea",
    "mirror", "rug", "field", "armchair", "seat", "fence", "desk", "rock, stone",
    "wardrobe, closet, press", "lamp", "tub", "rail", "cushion", "base, pedestal, stand", "box",
    "column, pillar", "signboard, sign", "chest of drawers, chest, bureau, dresser", "counter", "sand",
    "sink", "skyscraper", "fireplace", "refrigerator, icebox", "grandstand, covered stand", "path",
    "stairs", "runway", "case, display case, showcase, vitrine",
    "pool table, billiard table, snooker table", "pillow", "screen door, screen", "stairway, staircase",
    "river", "bridge, span", "bookcase", "blind, screen", "coffee table",
    "toilet, can, commode, crapper, pot, potty, stool, throne", "flower", "book", "hill", "bench",
    "countertop", "stove", "palm, palm tree", "kitchen island", "computer", "swivel chair", "boat", "bar",
    "arcade machine", "hovel, hut, hutch, shack, shanty", "bus", "towel", "light", "truck", "tower",
    "chandelier", "awning, sunshade, sunblind", "street lamp", "booth", "tv", "plane", "dirt track",
    "clothes", "pole", "land, ground, soil", "bannister, banister, balustrade, balusters, handrail",
    "escalator, moving staircase, moving stairway", "ottoman, pouf, pouffe, puff, hassock", "bottle",
    "buffet, counter, sideboard", "poster, posting, placard, notice, bill, card", "stage", "van", "ship",
    "fountain", "conveyer belt, conveyor belt, conveyer, conveyor, transporter", "canopy",
    "washer, automatic washer, washing machine", "plaything, toy", "pool", "stool", "barrel, cask",
    "basket, handbasket", "falls", "tent", "bag", "minibike, motorbike", "cradle", "oven", "ball",
    "food, solid food", "step, stair", "tank, storage tank", "trade name", "microwave", "pot", "animal",
    "bicycle", "lake", "dishwasher", "screen", "blanket, cover", "sculpture", "hood, exhaust hood",
    "sconce", "vase", "traffic light", "tray", "trash can", "fan", "pier", "crt screen", "plate",
    "monitor", "bulletin board", "shower", "radiator", "glass, drinking glass", "clock", "flag",
)
# 0-based indices of the 100 thing classes (instance-challenge category k -> k-th entry).
ADE20K_THING_IDS: tuple[int, ...] = (
    7, 8, 10, 12, 14, 15, 18, 19, 20, 22, 23, 24, 27, 30, 31, 32, 33, 35, 36, 37, 38, 39, 41, 42, 43,
    44, 45, 47, 49, 50, 53, 55, 56, 57, 58, 62, 64, 65, 66, 67, 69, 70, 71, 72, 73, 74, 75, 76, 78,
    80, 81, 82, 83, 85, 86, 87, 88, 89, 90, 92, 93, 95, 97, 98, 102, 103, 104, 107, 108, 110, 111,
    112, 115, 116, 118, 119, 120, 121, 123, 124, 125, 126, 127, 129, 130, 132, 133, 134, 135, 136,
    137, 138, 139, 142, 143, 144, 146, 147, 148, 149,
)
_COLORS = palette(len(ADE20K_150_NAMES), seed=3)
ADE20K_150_CATEGORIES: list[dict[str, Any]] = [
    {"id": i, "name": n, "isthing": int(i in ADE20K_THING_IDS), "color": _COLORS[i]}
    for i, n in enumerate(ADE20K_150_NAMES)
]

SEM_PREPARE_CMD = (
    "download ADEChallengeData2016.zip (sceneparsing.csail.mit.edu) into $DETECTRON2_DATASETS, "
    "then: python datasets/prepare_ade20k_sem_seg.py"
)
PAN_PREPARE_CMD = (
    "download ADEChallengeData2016.zip and annotations_instance.tar (sceneparsing.csail.mit.edu) into "
    "$DETECTRON2_DATASETS/ADEChallengeData2016, then: python datasets/prepare_ade20k_panoptic.py"
)

_SEM_SPLITS = {
    "ade20k_sem_seg_train": ("ADEChallengeData2016/images/training", "ADEChallengeData2016/annotations_detectron2/training"),
    "ade20k_sem_seg_val": ("ADEChallengeData2016/images/validation", "ADEChallengeData2016/annotations_detectron2/validation"),
}
# name -> (image_root, panoptic_root, panoptic_json, semantic_root, instances_json)
_PAN_SPLITS = {
    "ade20k_panoptic_train": (
        "ADEChallengeData2016/images/training",
        "ADEChallengeData2016/ade20k_panoptic_train",
        "ADEChallengeData2016/ade20k_panoptic_train.json",
        "ADEChallengeData2016/annotations_detectron2/training",
        "ADEChallengeData2016/ade20k_instance_train.json",
    ),
    "ade20k_panoptic_val": (
        "ADEChallengeData2016/images/validation",
        "ADEChallengeData2016/ade20k_panoptic_val",
        "ADEChallengeData2016/ade20k_panoptic_val.json",
        "ADEChallengeData2016/annotations_detectron2/validation",
        "ADEChallengeData2016/ade20k_instance_val.json",
    ),
}


def get_ade20k_panoptic_metadata() -> dict[str, Any]:
    return panoptic_metadata(ADE20K_150_CATEGORIES)


def load_ade20k_panoptic(
    dataset_name: str, image_root: str, panoptic_root: str, panoptic_json: str, sem_seg_root: str
) -> list[dict]:
    require_path(panoptic_json, dataset_name, PAN_PREPARE_CMD, kind="file")
    require_path(image_root, dataset_name, PAN_PREPARE_CMD)
    require_path(panoptic_root, dataset_name, PAN_PREPARE_CMD)
    require_path(sem_seg_root, dataset_name, SEM_PREPARE_CMD)
    return load_panoptic_json(panoptic_json, image_root, panoptic_root, get_ade20k_panoptic_metadata(), dataset_name, sem_seg_root)


def register_ade20k() -> None:
    """Register ``ade20k_sem_seg_{train,val}`` and ``ade20k_panoptic_{train,val}``."""
    sem_meta = {
        "stuff_classes": list(ADE20K_150_NAMES),
        "stuff_colors": [c["color"] for c in ADE20K_150_CATEGORIES],
        "stuff_dataset_id_to_contiguous_id": {i: i for i in range(len(ADE20K_150_NAMES))},
    }
    for name, (image_dir, gt_dir) in _SEM_SPLITS.items():
        register_sem_seg(name, image_dir, gt_dir, SEM_PREPARE_CMD, sem_meta)
    pan_meta = get_ade20k_panoptic_metadata()
    for name, (image_root, pan_root, pan_json, sem_root, inst_json) in _PAN_SPLITS.items():
        if name in DatasetCatalog:
            continue
        DatasetCatalog.register(
            name,
            lambda n=name, a=image_root, b=pan_root, c=pan_json, s=sem_root: load_ade20k_panoptic(
                n, *(os.path.join(datasets_root(), x) for x in (a, b, c, s))
            ),
        )
        MetadataCatalog.get(name).set(
            image_root=DatasetPath(image_root), panoptic_root=DatasetPath(pan_root),
            panoptic_json=DatasetPath(pan_json), sem_seg_root=DatasetPath(sem_root),
            json_file=DatasetPath(inst_json), evaluator_type="ade20k_panoptic_seg",
            ignore_label=255, label_divisor=1000, **pan_meta,
        )


# ------------------------------------------------------------------------------ preparation
def ade20k_semantic_to_detectron2(in_dir: str, out_dir: str) -> int:
    """SceneParsing labels (0 = other, 1..150) -> 0..149 with 255 = ignore; returns files written."""
    import numpy as np

    from ..io import read_png_ids, write_png

    files = sorted(glob.glob(os.path.join(in_dir, "*.png")))
    for f in files:
        lab = read_png_ids(f)
        if lab.max(initial=0) > 150:
            raise ValueError(f"{f}: label {int(lab.max())} is outside 0..150")
        write_png(os.path.join(out_dir, os.path.basename(f)), (lab.astype(np.int64) - 1).astype(np.uint8))  # 0 -> 255
    return len(files)


def ade20k_panoptic_from_annotations(image_dir: str, semantic_dir: str, instance_dir: str) -> tuple[dict, dict, dict]:
    """Combine SceneParsing semantic labels and ADE20K instance-challenge annotations.

    Semantic PNGs hold 1..150 (0 other); instance PNGs hold, per pixel, R = instance-challenge
    category 1..100 (k-th thing class) and G = instance index (0 = none). Stuff segments come
    from the semantic map, thing segments from the instance map; thing-class pixels without an
    instance are void. Returns (panoptic_json, {png_name: id_map}, instances_json); segment ids
    are 1..S per image, category ids are the 0-based ADE20K-150 ids.
    """
    import numpy as np
    from pycocotools import mask as mask_util

    from ..io import read_image, read_png_ids

    thing_of_instance_cat = {k + 1: cid for k, cid in enumerate(ADE20K_THING_IDS)}
    is_thing = np.zeros(256, dtype=bool)
    is_thing[list(ADE20K_THING_IDS)] = True
    images, annotations, inst_annotations, id_maps = [], [], [], {}
    ann_id = 1
    for f in sorted(glob.glob(os.path.join(image_dir, "*.jpg"))):
        stem = os.path.splitext(os.path.basename(f))[0]
        sem = read_png_ids(os.path.join(semantic_dir, stem + ".png")) - 1  # -1 = other
        inst_rgb = read_image(os.path.join(instance_dir, stem + ".png"), "RGB")
        h, w = sem.shape
        if inst_rgb.shape[:2] != (h, w):
            raise ValueError(f"{instance_dir}/{stem}.png: size {inst_rgb.shape[:2]} differs from the semantic map {(h, w)}")
        ids = np.zeros((h, w), dtype=np.int32)
        segs = []

        def add(mask, cat_id, isthing):
            nonlocal ann_id
            sid = len(segs) + 1
            ids[mask] = sid
            ys, xs = np.nonzero(mask)
            bbox = [int(xs.min()), int(ys.min()), int(xs.max() - xs.min() + 1), int(ys.max() - ys.min() + 1)]
            area = int(mask.sum())
            segs.append({"id": sid, "category_id": int(cat_id), "area": area, "bbox": bbox, "iscrowd": 0})
            if isthing:
                rle = mask_util.encode(np.asfortranarray(mask.astype(np.uint8)))
                inst_annotations.append({"id": ann_id, "image_id": stem, "category_id": int(cat_id), "iscrowd": 0, "area": area,
                                         "bbox": bbox, "segmentation": {"size": [h, w], "counts": rle["counts"].decode("ascii")}})
                ann_id += 1

        for cat in np.unique(sem):
            if cat < 0 or is_thing[cat]:
                continue
            add(sem == cat, cat, False)
        inst_cat, inst_idx = inst_rgb[..., 0].astype(np.int32), inst_rgb[..., 1].astype(np.int32)
        for k in np.unique(inst_idx):
            if k == 0:
                continue
            mask = inst_idx == k
            cats = np.unique(inst_cat[mask])
            if len(cats) != 1 or int(cats[0]) not in thing_of_instance_cat:
                raise ValueError(f"{instance_dir}/{stem}.png: instance {k} has instance categories {cats.tolist()}, expected one of 1..100")
            add(mask, thing_of_instance_cat[int(cats[0])], True)
        images.append({"id": stem, "file_name": stem + ".jpg", "height": h, "width": w})
        annotations.append({"image_id": stem, "file_name": stem + ".png", "segments_info": segs})
        id_maps[stem + ".png"] = ids
    categories = [{"id": c["id"], "name": c["name"], "isthing": c["isthing"], "color": c["color"]} for c in ADE20K_150_CATEGORIES]
    pan = {"images": images, "annotations": annotations, "categories": categories}
    inst = {"images": images, "annotations": inst_annotations,
            "categories": [{"id": c["id"], "name": c["name"]} for c in ADE20K_150_CATEGORIES if c["isthing"]]}
    return pan, id_maps, inst
