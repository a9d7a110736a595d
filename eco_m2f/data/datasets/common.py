"""Helpers shared by the dataset loaders: existence checks with actionable errors, JSON I/O."""
from __future__ import annotations

import json
import os
from typing import Any

from ..catalog import datasets_root


class DatasetNotFoundError(FileNotFoundError):
    """A dataset file or folder is missing; the message names it and the command preparing it."""


def require_path(path: str, dataset_name: str, prepare_cmd: str, kind: str = "folder") -> str:
    """Return ``path`` if it exists, else raise :class:`DatasetNotFoundError` saying how to make it."""
    ok = os.path.isdir(path) if kind == "folder" else os.path.isfile(path)
    if not ok:
        raise DatasetNotFoundError(
            f"Dataset '{dataset_name}': expected {kind} {os.path.abspath(path)} does not exist. "
            f"Datasets are read from $DETECTRON2_DATASETS (now {os.path.abspath(datasets_root())!s}). "
            f"Prepare it with: {prepare_cmd}  (see datasets/README.md)"
        )
    return path


def load_json(path: str, dataset_name: str = "") -> Any:
    """json.load with an error naming the file on malformed content."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as err:
        who = f"Dataset '{dataset_name}': " if dataset_name else ""
        raise ValueError(f"{who}cannot parse JSON file {path}: {err}") from err


def dump_json(obj: Any, path: str, indent: int | None = None) -> None:
    """Deterministic JSON (sorted keys, no timestamps), parent folders created."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, sort_keys=True, indent=indent)


def palette(n: int, seed: int = 0) -> list[list[int]]:
    """``n`` distinct visualisation colours (golden-ratio hue walk), deterministic."""
    import colorsys

    out = []
    for i in range(n):
        h = (0.13 + 0.61803398875 * (i + seed)) % 1.0
        s = 0.55 + 0.4 * ((i * 7) % 5) / 4
        v = 0.6 + 0.35 * ((i * 3) % 4) / 3
        r, g, b = colorsys.hsv_to_rgb(h, s, v)
        out.append([int(round(255 * r)), int(round(255 * g)), int(round(255 * b))])
    return out


def panoptic_metadata(categories: list[dict]) -> dict[str, Any]:
    """Class metadata in Mask2Former's panoptic convention from ``[{id, name, isthing, color}]``.

    Contiguous id = position in ``categories``. ``stuff_classes``/``stuff_colors`` list *all*
    classes (so semantic evaluation covers every class); ``thing_classes`` only the things.
    ``stuff_dataset_id_to_contiguous_id`` maps every category, ``thing_...`` only the things.
    """
    return {
        "thing_classes": [c["name"] for c in categories if c["isthing"]],
        "thing_colors": [list(c["color"]) for c in categories if c["isthing"]],
        "stuff_classes": [c["name"] for c in categories],
        "stuff_colors": [list(c["color"]) for c in categories],
        "thing_dataset_id_to_contiguous_id": {c["id"]: i for i, c in enumerate(categories) if c["isthing"]},
        "stuff_dataset_id_to_contiguous_id": {c["id"]: i for i, c in enumerate(categories)},
    }


def convert_segments_info(segments_info: list[dict], meta: dict[str, Any], where: str) -> list[dict]:
    """Dataset category ids -> contiguous ids (+ ``isthing``); unknown ids fail naming ``where``."""
    things = meta["thing_dataset_id_to_contiguous_id"]
    stuff = meta["stuff_dataset_id_to_contiguous_id"]
    out = []
    for seg in segments_info:
        seg = dict(seg)
        cid = seg["category_id"]
        if cid in things:
            seg["category_id"] = things[cid]
            seg["isthing"] = True
        elif cid in stuff:
            seg["category_id"] = stuff[cid]
            seg["isthing"] = False
        else:
            raise ValueError(f"{where}: segment {seg.get('id')} has unknown category_id {cid}")
        out.append(seg)
    return out


def load_panoptic_json(
    json_file: str,
    image_root: str,
    panoptic_root: str,
    meta: dict[str, Any],
    dataset_name: str,
    sem_seg_root: str | None = None,
    check_files: bool = True,
) -> list[dict]:
    """COCO-panoptic-format JSON -> Detectron2 dataset dicts (no image is opened).

    With ``check_files`` the first entry's files must exist, so a wrong layout fails here
    rather than deep inside a data-loading worker.
    """
    info = load_json(json_file, dataset_name)
    for key in ("images", "annotations"):
        if key not in info:
            raise ValueError(f"Dataset '{dataset_name}': panoptic JSON {json_file} has no '{key}' list")
    images = {img["id"]: img for img in info["images"]}
    dicts = []
    for ann in info["annotations"]:
        image_id = ann["image_id"]
        if image_id not in images:
            raise ValueError(f"Dataset '{dataset_name}': annotation of image_id {image_id!r} in {json_file} has no entry in 'images'")
        img = images[image_id]
        d = {
            "file_name": os.path.join(image_root, img["file_name"]),
            "image_id": image_id,
            "height": int(img["height"]),
            "width": int(img["width"]),
            "pan_seg_file_name": os.path.join(panoptic_root, ann["file_name"]),
            "segments_info": convert_segments_info(ann["segments_info"], meta, f"{json_file} image {image_id!r}"),
        }
        if sem_seg_root is not None:
            d["sem_seg_file_name"] = os.path.join(sem_seg_root, ann["file_name"])
        dicts.append(d)
    if not dicts:
        raise ValueError(f"Dataset '{dataset_name}': no annotations in {json_file}")
    first = dicts[0]
    for key in ("file_name", "pan_seg_file_name", "sem_seg_file_name"):
        if check_files and key in first and not os.path.isfile(first[key]):
            raise FileNotFoundError(f"Dataset '{dataset_name}': {key} {first[key]} listed by {json_file} does not exist")
    return dicts
