"""COCO panoptic 2017 (133 classes: 80 things + 53 stuff) in Detectron2's layout.

Registered names (Detectron2 / Mask2Former): ``coco_2017_{train,val}_panoptic`` (panoptic JSON +
PNGs) and ``coco_2017_{train,val}_panoptic_with_sem_seg`` (plus the semantic PNGs made by
``datasets/prepare_coco_semantic_from_panoptic.py``; evaluator_type ``coco_panoptic_seg``).
Category ids, names and thing/stuff flags are those of the COCO panoptic release; the colours
are visualisation colours of our own.
"""
from __future__ import annotations

import os
from typing import Any

from ..catalog import DatasetCatalog, DatasetPath, MetadataCatalog, datasets_root
from .common import load_json, load_panoptic_json, map_jobs, palette, panoptic_metadata, require_path

# (id, isthing, name) of the 133 COCO panoptic categories, in the official order.
_COCO_PANOPTIC = (
    (1, 1, "person"), (2, 1, "bicycle"), (3, 1, "car"), (4, 1, "motorcycle"), (5, 1, "airplane"),
    (6, 1, "bus"), (7, 1, "train"), (8, 1, "truck"), (9, 1, "boat"), (10, 1, "traffic light"),
    (11, 1, "fire hydrant"), (13, 1, "stop sign"), (14, 1, "parking meter"), (15, 1, "bench"),
    (16, 1, "bird"), (17, 1, "cat"), (18, 1, "dog"), (19, 1, "horse"), (20, 1, "sheep"),
    (21, 1, "cow"), (22, 1, "elephant"), (23, 1, "bear"), (24, 1, "zebra"), (25, 1, "giraffe"),
    (27, 1, "backpack"), (28, 1, "umbrella"), (31, 1, "handbag"), (32, 1, "tie"),
    (33, 1, "suitcase"), (34, 1, "frisbee"), (35, 1, "skis"), (36, 1, "snowboard"),
    (37, 1, "sports ball"), (38, 1, "kite"), (39, 1, "baseball bat"), (40, 1, "baseball glove"),
    (41, 1, "skateboard"), (42, 1, "surfboard"), (43, 1, "tennis racket"), (44, 1, "bottle"),
    (46, 1, "wine glass"), (47, 1, "cup"), (48, 1, "fork"), (49, 1, "knife"), (50, 1, "spoon"),
    (51, 1, "bowl"), (52, 1, "banana"), (53, 1, "apple"), (54, 1, "sandwich"), (55, 1, "orange"),
    (56, 1, "broccoli"), (57, 1, "carrot"), (58, 1, "hot dog"), (59, 1, "pizza"), (60, 1, "donut"),
    (61, 1, "cake"), (62, 1, "chair"), (63, 1, "couch"), (64, 1, "potted plant"), (65, 1, "bed"),
    (67, 1, "dining table"), (70, 1, "toilet"), (72, 1, "tv"), (73, 1, "laptop"), (74, 1, "mouse"),
    (75, 1, "remote"), (76, 1, "keyboard"), (77, 1, "cell phone"), (78, 1, "microwave"),
    (79, 1, "oven"), (80, 1, "toaster"), (81, 1, "sink"), (82, 1, "refrigerator"), (84, 1, "book"),
    (85, 1, "clock"), (86, 1, "vase"), (87, 1, "scissors"), (88, 1, "teddy bear"),
    (89, 1, "hair drier"), (90, 1, "toothbrush"),
    (92, 0, "banner"), (93, 0, "blanket"), (95, 0, "bridge"), (100, 0, "cardboard"),
    (107, 0, "counter"), (109, 0, "curtain"), (112, 0, "door-stuff"), (118, 0, "floor-wood"),
    (119, 0, "flower"), (122, 0, "fruit"), (125, 0, "gravel"), (128, 0, "house"), (130, 0, "light"),
    (133, 0, "mirror-stuff"), (138, 0, "net"), (141, 0, "pillow"), (144, 0, "platform"),
    (145, 0, "playingfield"), (147, 0, "railroad"), (148, 0, "river"), (149, 0, "road"),
    (151, 0, "roof"), (154, 0, "sand"), (155, 0, "sea"), (156, 0, "shelf"), (159, 0, "snow"),
    (161, 0, "stairs"), (166, 0, "tent"), (168, 0, "towel"), (171, 0, "wall-brick"),
    (175, 0, "wall-stone"), (176, 0, "wall-tile"), (177, 0, "wall-wood"), (178, 0, "water-other"),
    (180, 0, "window-blind"), (181, 0, "window-other"), (184, 0, "tree-merged"),
    (185, 0, "fence-merged"), (186, 0, "ceiling-merged"), (187, 0, "sky-other-merged"),
    (188, 0, "cabinet-merged"), (189, 0, "table-merged"), (190, 0, "floor-other-merged"),
    (191, 0, "pavement-merged"), (192, 0, "mountain-merged"), (193, 0, "grass-merged"),
    (194, 0, "dirt-merged"), (195, 0, "paper-merged"), (196, 0, "food-other-merged"),
    (197, 0, "building-other-merged"), (198, 0, "rock-merged"), (199, 0, "wall-other-merged"),
    (200, 0, "rug-merged"),
)
_COLORS = palette(len(_COCO_PANOPTIC))
COCO_PANOPTIC_CATEGORIES: list[dict[str, Any]] = [
    {"id": cid, "isthing": isthing, "name": name, "color": _COLORS[i]}
    for i, (cid, isthing, name) in enumerate(_COCO_PANOPTIC)
]

PREPARE_CMD = (
    "download COCO 2017 images + panoptic annotations (cocodataset.org) into $DETECTRON2_DATASETS/coco, "
    "then: python datasets/prepare_coco_semantic_from_panoptic.py"
)

# name -> (image_root, panoptic_root, panoptic_json, semantic_root, instances_json), relative to the root
_SPLITS = {
    "coco_2017_train_panoptic": (
        "coco/train2017",
        "coco/panoptic_train2017",
        "coco/annotations/panoptic_train2017.json",
        "coco/panoptic_semseg_train2017",
        "coco/annotations/instances_train2017.json",
    ),
    "coco_2017_val_panoptic": (
        "coco/val2017",
        "coco/panoptic_val2017",
        "coco/annotations/panoptic_val2017.json",
        "coco/panoptic_semseg_val2017",
        "coco/annotations/instances_val2017.json",
    ),
}


def get_coco_panoptic_metadata() -> dict[str, Any]:
    """Class metadata of COCO panoptic (contiguous id = index in the 133 categories)."""
    return panoptic_metadata(COCO_PANOPTIC_CATEGORIES)


def load_coco_panoptic(
    dataset_name: str, image_root: str, panoptic_root: str, panoptic_json: str, sem_seg_root: str | None
) -> list[dict]:
    """Dataset dicts of a COCO-panoptic-layout dataset, checking its folders first."""
    require_path(panoptic_json, dataset_name, PREPARE_CMD, kind="file")
    require_path(image_root, dataset_name, PREPARE_CMD)
    require_path(panoptic_root, dataset_name, PREPARE_CMD)
    if sem_seg_root is not None:
        require_path(sem_seg_root, dataset_name, "python datasets/prepare_coco_semantic_from_panoptic.py")
    meta = get_coco_panoptic_metadata()
    info = load_json(panoptic_json, dataset_name)
    known = {c["id"] for c in COCO_PANOPTIC_CATEGORIES}
    unknown = sorted({c["id"] for c in info.get("categories", [])} - known)
    if unknown:
        raise ValueError(f"Dataset '{dataset_name}': {panoptic_json} has categories {unknown} that are not COCO panoptic ones")
    return load_panoptic_json(panoptic_json, image_root, panoptic_root, meta, dataset_name, sem_seg_root)


def register_coco_panoptic() -> None:
    """Register ``coco_2017_{train,val}_panoptic`` and their ``_with_sem_seg`` variants."""
    meta = get_coco_panoptic_metadata()
    for name, (image_root, pan_root, pan_json, sem_root, inst_json) in _SPLITS.items():
        for full_name, with_sem in ((name, False), (name + "_with_sem_seg", True)):
            if full_name in DatasetCatalog:
                continue

            def _load(n=full_name, a=image_root, b=pan_root, c=pan_json, s=sem_root if with_sem else None):
                root = datasets_root()
                return load_coco_panoptic(
                    n, os.path.join(root, a), os.path.join(root, b), os.path.join(root, c),
                    os.path.join(root, s) if s else None,
                )

            DatasetCatalog.register(full_name, _load)
            fields = dict(
                image_root=DatasetPath(image_root),
                panoptic_root=DatasetPath(pan_root),
                panoptic_json=DatasetPath(pan_json),
                json_file=DatasetPath(inst_json),
                evaluator_type="coco_panoptic_seg",
                ignore_label=255,
                label_divisor=1000,
                **meta,
            )
            if with_sem:
                fields["sem_seg_root"] = DatasetPath(sem_root)
            MetadataCatalog.get(full_name).set(**fields)


# ------------------------------------------------------------------------------ preparation
def _semantic_from_panoptic(args: tuple[str, str, list[dict], dict[int, int]]) -> None:
    import numpy as np

    from ..io import read_png_ids, write_png

    pan_file, out_file, segments_info, id_map = args
    ids = read_png_ids(pan_file)
    sem = np.full(ids.shape, 255, dtype=np.uint8)  # void and unknown ids stay 255
    for seg in segments_info:
        if seg["category_id"] not in id_map:
            raise ValueError(f"{pan_file}: segment {seg['id']} has category_id {seg['category_id']} missing from the categories")
        sem[ids == seg["id"]] = id_map[seg["category_id"]]
    write_png(out_file, sem)


def panoptic_to_semantic(
    panoptic_json: str,
    panoptic_root: str,
    out_dir: str,
    categories: list[dict[str, Any]] | None = None,
    num_workers: int = 0,
) -> int:
    """Write semantic PNGs (contiguous id = index in ``categories``, 255 = void) for every
    annotation of a COCO-panoptic JSON; returns the number written.

    ``categories`` defaults to the 133 COCO panoptic categories; crowd segments get their
    class like any other segment (as the official conversion does).
    """
    categories = COCO_PANOPTIC_CATEGORIES if categories is None else categories
    id_map = {c["id"]: i for i, c in enumerate(categories)}
    info = load_json(panoptic_json)
    jobs = [
        (os.path.join(panoptic_root, ann["file_name"]), os.path.join(out_dir, ann["file_name"]), ann["segments_info"], id_map)
        for ann in info["annotations"]
    ]
    os.makedirs(out_dir, exist_ok=True)
    map_jobs(_semantic_from_panoptic, jobs, num_workers)
    return len(jobs)
