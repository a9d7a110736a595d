"""PASCAL-Context with 59 classes (the benchmark of CTS and mmseg's ``pascal_context_59``).

Registered names: ``pascal_context_59_sem_seg_{train,val}`` (4,998 / 5,105 images of VOC2010),
evaluator_type ``sem_seg``; every pixel outside the 59 classes (PASCAL-Context's other 400 classes
and unlabeled pixels) is ignored (255). Contiguous ids follow mmseg's ``PascalContext59Dataset``
order (alphabetical, which is also the order of the classes' ids in the 459-class ``labels.txt``).
Colours are our own.

Two sources convert to the same labels (``datasets/prepare_pascal_context_59.py``):

* PASCAL-Context ``trainval.tar.gz`` (``trainval/<image>.mat``, ``LabelMap`` of 459-class ids, 0 =
  unlabeled) with the split lists ``ImageSets/Main/{train,val}.txt`` of VOC2010;
* mmseg's converted ``SegmentationClassContext/*.png`` (0 = background, 1..59) with
  ``ImageSets/SegmentationContext/{train,val}.txt``.
"""
from __future__ import annotations

import os
from typing import Any

import numpy as np

from .common import map_jobs, palette, register_sem_seg

# (name, id in PASCAL-Context's 459-class labels.txt) in contiguous order
PASCAL_CONTEXT_59: tuple[tuple[str, int], ...] = (
    ("aeroplane", 2), ("bag", 9), ("bed", 18), ("bedclothes", 19), ("bench", 22), ("bicycle", 23),
    ("bird", 25), ("boat", 31), ("book", 33), ("bottle", 34), ("building", 44), ("bus", 45),
    ("cabinet", 46), ("car", 59), ("cat", 65), ("ceiling", 68), ("chair", 72), ("cloth", 80),
    ("computer", 85), ("cow", 98), ("cup", 104), ("curtain", 105), ("dog", 113), ("door", 115),
    ("fence", 144), ("floor", 158), ("flower", 159), ("food", 162), ("grass", 187), ("ground", 189),
    ("horse", 207), ("keyboard", 220), ("light", 232), ("motorbike", 258), ("mountain", 259),
    ("mouse", 260), ("person", 284), ("plate", 295), ("platform", 296), ("pottedplant", 308),
    ("road", 324), ("rock", 326), ("sheep", 347), ("shelves", 349), ("sidewalk", 354), ("sign", 355),
    ("sky", 360), ("snow", 366), ("sofa", 368), ("table", 397), ("track", 415), ("train", 416),
    ("tree", 420), ("truck", 424), ("tvmonitor", 427), ("wall", 440), ("water", 445), ("window", 454),
    ("wood", 458),
)
PASCAL_CONTEXT_59_NAMES: tuple[str, ...] = tuple(n for n, _ in PASCAL_CONTEXT_59)
NUM_CONTEXT_CLASSES = 459

ROOT = "VOCdevkit/VOC2010"
PREPARE_CMD = (
    "extract VOCtrainval_03-May-2010.tar (host.robots.ox.ac.uk/pascal/VOC/voc2010) into $DETECTRON2_DATASETS and "
    "PASCAL-Context trainval.tar.gz (cs.stanford.edu/~roozbeh/pascal-context) into "
    "$DETECTRON2_DATASETS/VOCdevkit/VOC2010, then: python datasets/prepare_pascal_context_59.py"
)
SPLITS = ("train", "val")


def context_459_to_59_lut() -> np.ndarray:
    """Lookup table 459-class id (0..459, 0 = unlabeled) -> 0..58, 255 for the other classes."""
    lut = np.full(NUM_CONTEXT_CLASSES + 1, 255, dtype=np.uint8)
    for k, (_, cid) in enumerate(PASCAL_CONTEXT_59):
        lut[cid] = k
    return lut


def register_pascal_context_59() -> None:
    """Register ``pascal_context_59_sem_seg_{train,val}``."""
    meta: dict[str, Any] = {
        "stuff_classes": list(PASCAL_CONTEXT_59_NAMES),
        "stuff_colors": palette(len(PASCAL_CONTEXT_59), seed=7),
        "stuff_dataset_id_to_contiguous_id": {cid: k for k, (_, cid) in enumerate(PASCAL_CONTEXT_59)},
    }
    for split in SPLITS:
        register_sem_seg(f"pascal_context_59_sem_seg_{split}", f"{ROOT}/JPEGImages",
                         f"{ROOT}/annotations_detectron2/pc59_{split}", PREPARE_CMD, meta)


# ------------------------------------------------------------------------------ preparation
def _convert_mat(job: tuple[str, str]) -> None:
    from scipy.io import loadmat

    from ..io import write_png

    mat_in, label_out = job
    try:
        labels = np.asarray(loadmat(mat_in)["LabelMap"]).astype(np.int64)
    except (OSError, ValueError, KeyError) as err:
        raise ValueError(f"cannot read the 'LabelMap' of {mat_in}: {err}") from err
    if labels.min(initial=0) < 0 or labels.max(initial=0) > NUM_CONTEXT_CLASSES:
        raise ValueError(f"{mat_in}: labels {int(labels.min())}..{int(labels.max())} outside 0..{NUM_CONTEXT_CLASSES}")
    write_png(label_out, context_459_to_59_lut()[labels])


def _convert_mmseg_png(job: tuple[str, str]) -> None:
    from ..io import read_png_ids, write_png

    png_in, label_out = job
    labels = read_png_ids(png_in, expect="single")
    if labels.max(initial=0) > len(PASCAL_CONTEXT_59):
        raise ValueError(f"{png_in}: label {int(labels.max())} outside 0..{len(PASCAL_CONTEXT_59)} (0 = background)")
    write_png(label_out, (labels.astype(np.int64) - 1).astype(np.uint8))  # 0 -> 255


def prepare_pascal_context_59(root: str, workers: int = 1) -> dict[str, Any]:
    """Write ``annotations_detectron2/pc59_{train,val}/*.png`` (0..58, 255 = ignore) under the VOC2010 folder
    ``root`` from ``trainval/*.mat`` or, when absent, from mmseg's ``SegmentationClassContext``; returns the
    source used and the count per split."""
    if os.path.isdir(os.path.join(root, "trainval")):
        source, list_dir, src_dir, ext, func = "trainval", "ImageSets/Main", "trainval", ".mat", _convert_mat
    elif os.path.isdir(os.path.join(root, "SegmentationClassContext")):
        source, list_dir, src_dir, ext, func = ("SegmentationClassContext", "ImageSets/SegmentationContext",
                                                "SegmentationClassContext", ".png", _convert_mmseg_png)
    else:
        raise FileNotFoundError(
            f"neither {os.path.abspath(os.path.join(root, 'trainval'))} (PASCAL-Context trainval.tar.gz) nor "
            f"{os.path.abspath(os.path.join(root, 'SegmentationClassContext'))} (mmseg's conversion) exists")
    counts: dict[str, Any] = {"source": source}
    for split in SPLITS:
        list_file = os.path.join(root, list_dir, f"{split}.txt")
        if not os.path.isfile(list_file):
            raise FileNotFoundError(f"expected the split list {os.path.abspath(list_file)}")
        with open(list_file, encoding="utf-8") as f:
            stems = [line.split()[0] for line in f if line.strip()]
        out_dir = os.path.join(root, "annotations_detectron2", f"pc59_{split}")
        os.makedirs(out_dir, exist_ok=True)
        jobs = []
        for stem in stems:
            src = os.path.join(root, src_dir, stem + ext)
            if not os.path.isfile(src):
                raise FileNotFoundError(f"{src} (listed in {list_file}) does not exist")
            jobs.append((src, os.path.join(out_dir, stem + ".png")))
        map_jobs(func, jobs, workers)
        counts[split] = len(jobs)
    return counts
