"""COCO-Stuff-10k semantic segmentation (171 classes: 80 things + 91 stuff) in MaskFormer's layout.

Registered names (MaskFormer's): ``coco_2017_train_stuff_10k_sem_seg`` (9,000 images) and
``coco_2017_test_stuff_10k_sem_seg`` (1,000 images), evaluator_type ``sem_seg``. Contiguous id =
rank of the COCO category id among the 171 COCO-Stuff ids (things 1..90 without the 11 unused
ids, stuff 92..182); ``cocostuff-10k-v1.1`` ``.mat`` labels hold those ids (0 = unlabeled -> 255).
Thing names, ids and colours are the COCO panoptic ones; stuff colours are our own.
"""
from __future__ import annotations

import os
import shutil
from typing import Any

import numpy as np

from .coco_panoptic import COCO_PANOPTIC_CATEGORIES
from .common import map_jobs, palette, register_sem_seg

COCO_STUFF_91_NAMES: tuple[str, ...] = (
    "banner", "blanket", "branch", "bridge", "building-other", "bush", "cabinet", "cage", "cardboard",
    "carpet", "ceiling-other", "ceiling-tile", "cloth", "clothes", "clouds", "counter", "cupboard",
    "curtain", "desk-stuff", "dirt", "door-stuff", "fence", "floor-marble", "floor-other",
    "floor-stone", "floor-tile", "floor-wood", "flower", "fog", "food-other", "fruit",
    "furniture-other", "grass", "gravel", "ground-other", "hill", "house", "leaves", "light", "mat",
    "metal", "mirror-stuff", "moss", "mountain", "mud", "napkin", "net", "paper", "pavement", "pillow",
    "plant-other", "plastic", "platform", "playingfield", "railing", "railroad", "river", "road",
    "rock", "roof", "rug", "salad", "sand", "sea", "shelf", "sky-other", "skyscraper", "snow",
    "solid-other", "stairs", "stone", "straw", "structural-other", "table", "tent", "textile-other",
    "towel", "tree", "vegetable", "wall-brick", "wall-concrete", "wall-other", "wall-panel",
    "wall-stone", "wall-tile", "wall-wood", "water-other", "waterdrops", "window-blind",
    "window-other", "wood",
)
_STUFF_COLORS = palette(len(COCO_STUFF_91_NAMES), seed=11)
# {id, name, isthing, color} of the 171 classes in contiguous order (stuff ids 92..182 in order)
COCO_STUFF_171_CATEGORIES: list[dict[str, Any]] = [
    {k: c[k] for k in ("id", "name", "isthing", "color")} for c in COCO_PANOPTIC_CATEGORIES if c["isthing"]
] + [{"id": 92 + i, "name": n, "isthing": 0, "color": _STUFF_COLORS[i]} for i, n in enumerate(COCO_STUFF_91_NAMES)]

ROOT = "coco/coco_stuff_10k"
PREPARE_CMD = (
    "download cocostuff-10k-v1.1.zip (github.com/nightrome/cocostuff10k) and unzip it into "
    "$DETECTRON2_DATASETS/coco/coco_stuff_10k, then: python datasets/prepare_coco_stuff_10k_sem_seg.py"
)
SPLITS = ("train", "test")


def coco_stuff_10k_label_lut() -> np.ndarray:
    """uint8 lookup table COCO category id (0..255) -> contiguous id; 0 (unlabeled) and unused ids -> 255."""
    lut = np.full(256, 255, dtype=np.uint8)
    for k, c in enumerate(COCO_STUFF_171_CATEGORIES):
        lut[c["id"]] = k
    return lut


def _metadata() -> dict[str, Any]:
    return {
        "stuff_classes": [c["name"] for c in COCO_STUFF_171_CATEGORIES],
        "stuff_colors": [list(c["color"]) for c in COCO_STUFF_171_CATEGORIES],
        "stuff_dataset_id_to_contiguous_id": {c["id"]: k for k, c in enumerate(COCO_STUFF_171_CATEGORIES)},
    }


def register_coco_stuff_10k() -> None:
    """Register ``coco_2017_{train,test}_stuff_10k_sem_seg``."""
    for split in SPLITS:
        register_sem_seg(f"coco_2017_{split}_stuff_10k_sem_seg", f"{ROOT}/images_detectron2/{split}",
                         f"{ROOT}/annotations_detectron2/{split}", PREPARE_CMD, _metadata())


# ------------------------------------------------------------------------------ preparation
def _convert_one(job: tuple[str, str, str, str]) -> None:
    """One image: link (or copy) the JPEG, map the ``.mat`` label map ``S`` to contiguous ids."""
    from scipy.io import loadmat

    from ..io import write_png

    image_in, mat_in, image_out, label_out = job
    if not os.path.isfile(image_out):
        try:
            os.link(image_in, image_out)
        except OSError:  # another file system, or links not allowed
            shutil.copyfile(image_in, image_out)
    try:
        labels = np.asarray(loadmat(mat_in)["S"])
    except (OSError, ValueError, KeyError) as err:
        raise ValueError(f"cannot read the label map 'S' of {mat_in}: {err}") from err
    bad = np.setdiff1d(np.unique(labels), [0] + [c["id"] for c in COCO_STUFF_171_CATEGORIES])
    if bad.size:
        raise ValueError(f"{mat_in}: labels {bad.tolist()} are not COCO-Stuff category ids (0 = unlabeled)")
    write_png(label_out, coco_stuff_10k_label_lut()[labels])


def prepare_coco_stuff_10k(root: str, workers: int = 1) -> dict[str, int]:
    """``imageLists/{split}.txt`` + ``images/*.jpg`` + ``annotations/*.mat`` -> ``images_detectron2/{split}`` and
    ``annotations_detectron2/{split}`` (PNG, 0..170, 255 = unlabeled); returns the image count per split."""
    counts = {}
    for split in SPLITS:
        list_file = os.path.join(root, "imageLists", f"{split}.txt")
        if not os.path.isfile(list_file):
            raise FileNotFoundError(f"expected {os.path.abspath(list_file)}: unzip cocostuff-10k-v1.1.zip into {root}")
        with open(list_file, encoding="utf-8") as f:
            stems = [line.strip() for line in f if line.strip()]
        out_images = os.path.join(root, "images_detectron2", split)
        out_labels = os.path.join(root, "annotations_detectron2", split)
        os.makedirs(out_images, exist_ok=True)
        os.makedirs(out_labels, exist_ok=True)
        jobs = []
        for stem in stems:
            image, mat = os.path.join(root, "images", stem + ".jpg"), os.path.join(root, "annotations", stem + ".mat")
            for path in (image, mat):
                if not os.path.isfile(path):
                    raise FileNotFoundError(f"{path} (listed in {list_file}) does not exist")
            jobs.append((image, mat, os.path.join(out_images, stem + ".jpg"), os.path.join(out_labels, stem + ".png")))
        map_jobs(_convert_one, jobs, workers)
        counts[split] = len(jobs)
    return counts
