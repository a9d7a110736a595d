"""Cityscapes fine (panoptic, semantic, instance) in Detectron2's layout and names.

Class definitions come from ``cityscapesscripts.helpers.labels``: 19 train classes (contiguous
id = trainId), 8 of them things. Registered names (``prefix`` is "" for the real dataset and
"synthetic_" for the Cityscapes layout of the synthetic dataset):

- ``{prefix}cityscapes_fine_panoptic_{train,val}``   evaluator_type ``cityscapes_panoptic_seg``
- ``{prefix}cityscapes_fine_sem_seg_{train,val}``    evaluator_type ``cityscapes_sem_seg``
- ``{prefix}cityscapes_fine_instance_seg_{train,val}`` evaluator_type ``cityscapes_instance``

Running the official scripts under numpy 2 is :mod:`eco_m2f.data.cityscapes_scripts`.
"""
from __future__ import annotations

import glob
import multiprocessing
import os
from collections.abc import Callable
from typing import Any, Optional

import numpy as np

from ..catalog import BoxMode, DatasetCatalog, DatasetPath, MetadataCatalog, datasets_root
from ..io import image_size, read_png_ids
from .common import DatasetNotFoundError, load_panoptic_json, panoptic_metadata, require_path

PREPARE_CMD = (
    "download leftImg8bit_trainvaltest.zip and gtFine_trainvaltest.zip (cityscapes-dataset.com) into "
    "$DETECTRON2_DATASETS/cityscapes, then: python datasets/prepare_cityscapes.py"
)


def _labels():
    from cityscapesscripts.helpers import labels

    return labels


def cityscapes_categories() -> list[dict[str, Any]]:
    """The 19 evaluated classes in trainId order: ``{id (labelId), trainId, name, isthing, color}``."""
    labels = _labels().labels
    cats = [
        {"id": int(l.id), "trainId": int(l.trainId), "name": l.name, "isthing": int(l.hasInstances), "color": list(l.color)}
        for l in labels
        if 0 <= l.trainId < 255 and not l.ignoreInEval
    ]
    cats.sort(key=lambda c: c["trainId"])
    assert [c["trainId"] for c in cats] == list(range(len(cats))), "cityscapesscripts trainIds are not contiguous"
    return cats


def cityscapes_thing_categories() -> list[dict[str, Any]]:
    """The 8 instance classes in label-id order (contiguous id for instance segmentation)."""
    labels = _labels().labels
    return [
        {"id": int(l.id), "name": l.name, "color": list(l.color)}
        for l in labels
        if l.hasInstances and not l.ignoreInEval
    ]


def get_cityscapes_panoptic_metadata() -> dict[str, Any]:
    """Panoptic class metadata; contiguous id == trainId."""
    return panoptic_metadata(cityscapes_categories())


def get_cityscapes_semantic_metadata() -> dict[str, Any]:
    cats = cityscapes_categories()
    return {
        "stuff_classes": [c["name"] for c in cats],
        "stuff_colors": [c["color"] for c in cats],
        "stuff_dataset_id_to_contiguous_id": {c["id"]: c["trainId"] for c in cats},
        "thing_classes": [c["name"] for c in cityscapes_thing_categories()],
        "thing_colors": [c["color"] for c in cityscapes_thing_categories()],
    }


def get_cityscapes_instance_metadata() -> dict[str, Any]:
    things = cityscapes_thing_categories()
    return {
        "thing_classes": [c["name"] for c in things],
        "thing_colors": [c["color"] for c in things],
        "thing_dataset_id_to_contiguous_id": {c["id"]: i for i, c in enumerate(things)},
    }


# ------------------------------------------------------------------------------------ loaders
def load_cityscapes_panoptic(
    dataset_name: str, image_dir: str, panoptic_root: str, panoptic_json: str, gt_dir: str, prepare_cmd: str = PREPARE_CMD
) -> list[dict]:
    """Dataset dicts from ``gtFine/cityscapes_panoptic_{split}.json`` (createPanopticImgs' output)."""
    require_path(image_dir, dataset_name, prepare_cmd)
    require_path(panoptic_json, dataset_name, prepare_cmd, kind="file")
    require_path(panoptic_root, dataset_name, prepare_cmd)
    require_path(gt_dir, dataset_name, prepare_cmd)
    meta = get_cityscapes_panoptic_metadata()
    dicts = load_panoptic_json(panoptic_json, image_dir, panoptic_root, meta, dataset_name, check_files=False)
    for d in dicts:
        # the JSON's image file_name is "<id>_gtFine_leftImg8bit.png" (createPanopticImgs' naming),
        # so the image path is rebuilt from the id "<city>_<seq>_<frame>"
        image_id = str(d["image_id"])
        city = image_id.split("_")[0]
        d["file_name"] = os.path.join(image_dir, city, image_id + "_leftImg8bit.png")
        d["sem_seg_file_name"] = os.path.join(gt_dir, city, image_id + "_gtFine_labelTrainIds.png")
    if not os.path.isfile(dicts[0]["file_name"]):
        raise DatasetNotFoundError(f"Dataset '{dataset_name}': image {dicts[0]['file_name']} listed by {panoptic_json} does not exist. Prepare it with: {prepare_cmd}")
    if not os.path.isfile(dicts[0]["sem_seg_file_name"]):
        raise DatasetNotFoundError(
            f"Dataset '{dataset_name}': {dicts[0]['sem_seg_file_name']} does not exist "
            f"(the *_gtFine_labelTrainIds.png files are missing). Prepare them with: {prepare_cmd}"
        )
    return dicts


def _cityscapes_files(dataset_name: str, image_dir: str, gt_dir: str, suffix: str, prepare_cmd: str) -> list[tuple[str, str, str]]:
    """(image_file, gt_file, image_id) for every ``*_leftImg8bit.png`` under ``image_dir``."""
    require_path(image_dir, dataset_name, prepare_cmd)
    require_path(gt_dir, dataset_name, prepare_cmd)
    images = sorted(glob.glob(os.path.join(image_dir, "*", "*_leftImg8bit.png")))
    if not images:
        raise DatasetNotFoundError(
            f"Dataset '{dataset_name}': no <city>/*_leftImg8bit.png under {os.path.abspath(image_dir)}. Prepare it with: {prepare_cmd}"
        )
    out = []
    for f in images:
        city = os.path.basename(os.path.dirname(f))
        image_id = os.path.basename(f)[: -len("_leftImg8bit.png")]
        gt = os.path.join(gt_dir, city, image_id + suffix)
        if not os.path.isfile(gt):
            raise DatasetNotFoundError(f"Dataset '{dataset_name}': ground truth {gt} for {f} does not exist. Prepare it with: {prepare_cmd}")
        out.append((f, gt, image_id))
    return out


def load_cityscapes_semantic(dataset_name: str, image_dir: str, gt_dir: str, prepare_cmd: str = PREPARE_CMD) -> list[dict]:
    """Dataset dicts pairing ``leftImg8bit`` images with ``*_gtFine_labelTrainIds.png``."""
    dicts = []
    for f, gt, image_id in _cityscapes_files(dataset_name, image_dir, gt_dir, "_gtFine_labelTrainIds.png", prepare_cmd):
        h, w = image_size(f)
        dicts.append({"file_name": f, "image_id": image_id, "height": h, "width": w, "sem_seg_file_name": gt})
    return dicts


def _instance_dict(args: tuple[str, str, str]) -> dict:
    """One image's instances from its ``*_gtFine_instanceIds.png`` (ids >= 1000: instance, < 1000: crowd)."""
    from pycocotools import mask as mask_util

    image_file, inst_file, image_id = args
    id2label = _labels().id2label
    contiguous = get_cityscapes_instance_metadata()["thing_dataset_id_to_contiguous_id"]
    inst = read_png_ids(inst_file)
    annos = []
    for iid in np.unique(inst):
        iid = int(iid)
        label = id2label.get(iid // 1000 if iid >= 1000 else iid)
        if label is None or not label.hasInstances or label.ignoreInEval:
            continue
        mask = inst == iid
        ys, xs = np.nonzero(mask)
        rle = mask_util.encode(np.asfortranarray(mask.astype(np.uint8)))
        rle["counts"] = rle["counts"].decode("ascii")
        annos.append(
            {
                "iscrowd": int(iid < 1000),
                "category_id": contiguous[label.id],
                "segmentation": rle,
                "bbox": [int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1],
                "bbox_mode": BoxMode.XYXY_ABS,
            }
        )
    return {"file_name": image_file, "image_id": image_id, "height": int(inst.shape[0]), "width": int(inst.shape[1]), "annotations": annos}


def load_cityscapes_instances(dataset_name: str, image_dir: str, gt_dir: str, prepare_cmd: str = PREPARE_CMD) -> list[dict]:
    """Instance dataset dicts (RLE masks, XYXY boxes, contiguous ids over the 8 things).

    Reads ``*_gtFine_instanceIds.png`` (Detectron2's ``from_json=False`` path); large splits
    are decoded with a process pool.
    """
    files = _cityscapes_files(dataset_name, image_dir, gt_dir, "_gtFine_instanceIds.png", prepare_cmd)
    if len(files) > 200 and (os.cpu_count() or 1) > 1:
        with multiprocessing.get_context("spawn").Pool(min(8, os.cpu_count() or 1)) as pool:
            return pool.map(_instance_dict, files, chunksize=8)
    return [_instance_dict(f) for f in files]


# ------------------------------------------------------------------------------ registration
def _splits(base: str) -> dict[str, dict[str, str]]:
    return {
        split: {
            "image_dir": f"{base}/leftImg8bit/{split}",
            "gt_dir": f"{base}/gtFine/{split}",
            "panoptic_root": f"{base}/gtFine/cityscapes_panoptic_{split}",
            "panoptic_json": f"{base}/gtFine/cityscapes_panoptic_{split}.json",
        }
        for split in ("train", "val")
    }


def register_cityscapes(
    prefix: str = "",
    base: str = "cityscapes",
    before_read: Optional[Callable[[], Any]] = None,
    prepare_cmd: str = PREPARE_CMD,
) -> None:
    """Register the panoptic, semantic and instance variants of a Cityscapes-layout dataset.

    ``base`` is the dataset folder relative to ``$DETECTRON2_DATASETS``; ``before_read`` runs
    before any loading or path read (the synthetic dataset uses it to generate itself).
    """

    def p(rel: str) -> DatasetPath:
        return DatasetPath(rel, before_read)

    def absolute(rel: str) -> str:
        if before_read is not None:
            before_read()
        return os.path.join(datasets_root(), rel)

    pan_meta = get_cityscapes_panoptic_metadata()
    sem_meta = get_cityscapes_semantic_metadata()
    ins_meta = get_cityscapes_instance_metadata()
    for split, rel in _splits(base).items():
        name = f"{prefix}cityscapes_fine_panoptic_{split}"
        if name not in DatasetCatalog:
            DatasetCatalog.register(
                name,
                lambda n=name, r=rel: load_cityscapes_panoptic(
                    n, absolute(r["image_dir"]), absolute(r["panoptic_root"]), absolute(r["panoptic_json"]),
                    absolute(r["gt_dir"]), prepare_cmd,
                ),
            )
            MetadataCatalog.get(name).set(
                image_root=p(rel["image_dir"]), image_dir=p(rel["image_dir"]), panoptic_root=p(rel["panoptic_root"]),
                panoptic_json=p(rel["panoptic_json"]), gt_dir=p(rel["gt_dir"]),
                evaluator_type="cityscapes_panoptic_seg", ignore_label=255, label_divisor=1000, **pan_meta,
            )
        name = f"{prefix}cityscapes_fine_sem_seg_{split}"
        if name not in DatasetCatalog:
            DatasetCatalog.register(
                name, lambda n=name, r=rel: load_cityscapes_semantic(n, absolute(r["image_dir"]), absolute(r["gt_dir"]), prepare_cmd)
            )
            MetadataCatalog.get(name).set(
                image_root=p(rel["image_dir"]), image_dir=p(rel["image_dir"]), gt_dir=p(rel["gt_dir"]),
                evaluator_type="cityscapes_sem_seg", ignore_label=255, **sem_meta,
            )
        name = f"{prefix}cityscapes_fine_instance_seg_{split}"
        if name not in DatasetCatalog:
            DatasetCatalog.register(
                name, lambda n=name, r=rel: load_cityscapes_instances(n, absolute(r["image_dir"]), absolute(r["gt_dir"]), prepare_cmd)
            )
            MetadataCatalog.get(name).set(
                image_root=p(rel["image_dir"]), image_dir=p(rel["image_dir"]), gt_dir=p(rel["gt_dir"]),
                evaluator_type="cityscapes_instance", **ins_meta,
            )
