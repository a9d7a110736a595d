"""Helpers shared by the dataset loaders: existence checks with actionable errors, JSON I/O,
semantic folder pairing, and generation-on-first-use of the project's synthetic datasets."""
from __future__ import annotations

import glob
import json
import os
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from ..catalog import DatasetCatalog, DatasetPath, MetadataCatalog, datasets_root


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


def load_sem_seg(dataset_name: str, gt_dir: str, image_dir: str, prepare_cmd: str,
                 gt_ext: str = "png", image_ext: str = "jpg") -> list[dict]:
    """Detectron2's ``load_sem_seg``: every ``gt_dir/<stem>.<gt_ext>`` paired with ``image_dir/<stem>.<image_ext>``.

    Missing folders, an empty label folder and a label without its image fail naming the path and
    ``prepare_cmd``. No file is opened (sizes are read by the mappers).
    """
    require_path(image_dir, dataset_name, prepare_cmd)
    require_path(gt_dir, dataset_name, prepare_cmd)
    labels = sorted(glob.glob(os.path.join(glob.escape(gt_dir), f"*.{gt_ext}")))
    if not labels:
        raise DatasetNotFoundError(
            f"Dataset '{dataset_name}': no *.{gt_ext} under {os.path.abspath(gt_dir)}. Prepare it with: {prepare_cmd}"
        )
    dicts = []
    for gt in labels:
        stem = os.path.splitext(os.path.basename(gt))[0]
        image = os.path.join(image_dir, f"{stem}.{image_ext}")
        if not os.path.isfile(image):
            raise DatasetNotFoundError(
                f"Dataset '{dataset_name}': image {os.path.abspath(image)} of label {gt} does not exist. "
                f"Prepare it with: {prepare_cmd}"
            )
        dicts.append({"file_name": image, "image_id": stem, "sem_seg_file_name": gt})
    return dicts


def register_sem_seg(name: str, image_dir: str, gt_dir: str, prepare_cmd: str, metadata: dict[str, Any]) -> None:
    """Register a Detectron2 semantic dataset (folders relative to ``$DETECTRON2_DATASETS``, read by
    :func:`load_sem_seg`; evaluator_type ``sem_seg``, ignore label 255) unless the name is taken."""
    if name in DatasetCatalog:
        return
    DatasetCatalog.register(name, lambda: load_sem_seg(
        name, os.path.join(datasets_root(), gt_dir), os.path.join(datasets_root(), image_dir), prepare_cmd))
    MetadataCatalog.get(name).set(image_root=DatasetPath(image_dir), sem_seg_root=DatasetPath(gt_dir),
                                  evaluator_type="sem_seg", ignore_label=255, **metadata)


def prepare_cli(argv: list[str] | None, description: str, default_root: str,
                prepare: Callable[[str, int], Any]) -> tuple[int, str, Any, float]:
    """The shared command line of the ``datasets/prepare_*.py`` converters: ``--root`` (default
    ``$DETECTRON2_DATASETS/<default_root>``) and ``--workers``; runs ``prepare(root, workers)``.

    Returns (exit code, root, result, seconds); a missing input is printed as ``error: ...`` with exit code 1.
    """
    import argparse
    import sys
    import time

    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", default=None, help=f"default: $DETECTRON2_DATASETS/{default_root}")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args(argv)
    root = args.root or os.path.join(datasets_root(), default_root)
    t0 = time.perf_counter()
    try:
        result = prepare(root, args.workers)
    except FileNotFoundError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1, root, None, time.perf_counter() - t0
    return 0, root, result, time.perf_counter() - t0


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


def map_jobs(func: Callable[[Any], Any], jobs: list, workers: int = 1, chunksize: int | None = None) -> list:
    """``[func(j) for j in jobs]``, in order, over ``workers`` spawned processes when ``workers > 1``.

    ``func`` must be a module-level function (it is pickled by name). Spawned rather than forked
    workers: the caller may hold threads (torch), which forked children must not inherit.
    """
    if workers <= 1 or len(jobs) <= 1:
        return [func(j) for j in jobs]
    import multiprocessing

    chunksize = chunksize or max(1, min(64, len(jobs) // (4 * workers)))
    with multiprocessing.get_context("spawn").Pool(min(workers, len(jobs))) as pool:
        return list(pool.imap(func, jobs, chunksize=chunksize))


# ------------------------------------------------------------------------------ generated datasets
@contextmanager
def file_lock(path: str) -> Iterator[None]:
    """Exclusive advisory lock (POSIX flock); a no-op where fcntl is unavailable."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - non-POSIX
        yield
        return
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "a") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def lock_path(root: str) -> str:
    """The lock file guarding the generation of the dataset folder ``root``."""
    return os.path.join(os.path.dirname(root), f".{os.path.basename(root)}.lock")


def ensure_generated(root: str, info_file: str, generate: Callable[[], Any], prepare_cmd: str) -> str:
    """Return ``root`` once ``root/info_file`` exists, calling ``generate()`` under a file lock if it does not.

    ``info_file`` is written last by a generator, so its presence marks a complete dataset; several
    processes may call this at once: one generates, the others wait and reuse the result. A folder
    with content but without ``info_file`` is reported, never overwritten.
    """
    root = os.path.abspath(root)
    if os.path.isfile(os.path.join(root, info_file)):
        return root
    with file_lock(lock_path(root)):
        if os.path.isfile(os.path.join(root, info_file)):
            return root
        if os.path.isdir(root) and os.listdir(root):
            raise FileExistsError(
                f"{root} exists but is not a complete generated dataset (no {info_file}); "
                f"remove it or regenerate it with: {prepare_cmd} --root {root}"
            )
        generate()
    return root


def replace_folder(src: str, dst: str) -> None:
    """Move the finished folder ``src`` onto ``dst`` (replacing a previous ``dst``) with renames only,
    so readers see either the old or the new dataset, never a half-written one."""
    if os.path.exists(dst):
        trash = src + ".old"
        os.rename(dst, trash)
        os.rename(src, dst)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.rename(src, dst)
