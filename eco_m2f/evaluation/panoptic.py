"""Panoptic quality (PQ, SQ, RQ) with panopticapi's exact semantics, per dataset and per image.

Definitions (Kirillov et al., "Panoptic Segmentation", and panopticapi's ``pq_compute``):

* A predicted and a ground-truth segment of the same category match when their IoU is
  strictly greater than 0.5 (so matches are unique). IoU uses
  ``union = pred_area + gt_area - intersection - |pred ∩ VOID|``: ground-truth pixels
  labelled 0 (VOID) do not count against a prediction. ``gt_area`` is the ``area`` field
  of the ground-truth segment (as panopticapi reads it from the JSON), ``pred_area`` is
  counted from the predicted id map.
* Ground-truth segments with ``iscrowd == 1`` are never matched and never false
  negatives; the crowd region of a category absorbs unmatched predictions of that
  category.
* An unmatched prediction is a false positive only if at most half of its area lies on
  VOID plus the crowd region of its own category.
* Per category: ``PQ = sum(IoU of TP) / (TP + FP/2 + FN/2)``, ``SQ = sum(IoU)/TP`` (0 if
  no TP), ``RQ = TP / (TP + FP/2 + FN/2)``. Averages over All/Things/Stuff are plain means
  over the categories with ``TP + FP + FN > 0`` (``n``); other categories are excluded.
* Predicted id 0 is VOID (unassigned pixels, as Mask2Former leaves them).

Per-image convention: :func:`pq_single_image` returns the raw per-category statistics
(:class:`PQStat`) of one image, and summing them over images gives exactly the dataset
statistics (``tp``/``fp``/``fn`` equal, ``iou`` sums equal up to float rounding order).
When a category set has no category with ``TP + FP + FN > 0`` in an image (nothing to
find and nothing falsely found, e.g. Things of an image without objects and without
predicted objects), :meth:`PQStat.pq_average` reports ``PQ = SQ = RQ = 1`` with
``n = 0`` for that set; in dataset PQ such an image contributes nothing to any category.

The module is also a command line tool equal to panopticapi's ``pq_compute``::

    python -m eco_m2f.evaluation.panoptic --gt-json J --gt-folder D \
        --pred-json J --pred-folder D [--out results.json]
"""
from __future__ import annotations

import argparse
import io
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from collections import OrderedDict, defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np
from PIL import Image

from ..data.io import id2rgb, read_png_ids, rgb2id
from .evaluator import DatasetEvaluator

__all__ = [
    "OFFSET",
    "VOID",
    "PanopticFormatError",
    "PQStatCat",
    "PQStat",
    "rgb2id",
    "id2rgb",
    "read_panoptic_png",
    "pq_single_image",
    "pq_compute_per_image",
    "pq_compute",
    "pq_results",
    "format_pq_table",
    "panoptic_categories",
    "pq_for_model_output",
    "COCOPanopticEvaluator",
    "main",
]

logger = logging.getLogger(__name__)

OFFSET = 256 * 256 * 256  # joint (gt, pred) label = gt * OFFSET + pred; ids are < 2**24
VOID = 0


class PanopticFormatError(KeyError):
    """Inconsistent panoptic prediction or ground truth (segment ids / category ids).

    A ``KeyError`` like panopticapi's, but printed as a plain sentence.
    """

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


# --------------------------------------------------------------------------- statistics


@dataclass
class PQStatCat:
    """Raw counts of one category: summed IoU of true positives, TP, FP, FN."""

    iou: float = 0.0
    tp: int = 0
    fp: int = 0
    fn: int = 0

    def __iadd__(self, other: "PQStatCat") -> "PQStatCat":
        self.iou += other.iou
        self.tp += other.tp
        self.fp += other.fp
        self.fn += other.fn
        return self


class PQStat:
    """Per-category PQ statistics; add images with ``+=``, average with :meth:`pq_average`."""

    def __init__(self) -> None:
        self.pq_per_cat: defaultdict[int, PQStatCat] = defaultdict(PQStatCat)

    def __getitem__(self, category_id: int) -> PQStatCat:
        return self.pq_per_cat[category_id]

    def __iadd__(self, other: "PQStat") -> "PQStat":
        for category_id, stat in other.pq_per_cat.items():
            self.pq_per_cat[category_id] += stat
        return self

    def __add__(self, other: "PQStat") -> "PQStat":
        out = PQStat()
        out += self
        out += other
        return out

    def __repr__(self) -> str:
        cats = ", ".join(
            f"{k}: tp={v.tp} fp={v.fp} fn={v.fn} iou={v.iou:.4f}" for k, v in sorted(self.pq_per_cat.items())
        )
        return f"PQStat({cats})"

    @staticmethod
    def _selected(categories: Mapping[int, Mapping], isthing: bool | None) -> Iterable[int]:
        for category_id, info in categories.items():
            if isthing is not None and bool(info["isthing"] == 1) != isthing:
                continue
            yield category_id

    def per_class(self, categories: Mapping[int, Mapping]) -> dict[int, dict[str, float]]:
        """``{category_id: {"pq","sq","rq"}}``; categories with TP+FP+FN = 0 get zeros (as panopticapi)."""
        out: dict[int, dict[str, float]] = {}
        for category_id in categories:
            s = self.pq_per_cat.get(category_id, PQStatCat())
            if s.tp + s.fp + s.fn == 0:
                out[category_id] = {"pq": 0.0, "sq": 0.0, "rq": 0.0}
                continue
            denom = s.tp + 0.5 * s.fp + 0.5 * s.fn
            out[category_id] = {
                "pq": s.iou / denom,
                "sq": s.iou / s.tp if s.tp != 0 else 0,
                "rq": s.tp / denom,
            }
        return out

    def pq_average(
        self, categories: Mapping[int, Mapping], isthing: bool | None = None, empty_value: float = 1.0
    ) -> dict[str, float]:
        """Mean PQ/SQ/RQ (in [0, 1]) over the categories of the set that occur (TP+FP+FN > 0).

        ``isthing``: None = all categories, True = things, False = stuff (from
        ``categories[id]["isthing"]``). If no category of the set occurs, returns
        ``empty_value`` (default 1: nothing to find and nothing falsely found) with ``n = 0``.
        """
        pq = sq = rq = 0.0
        n = 0
        for category_id in self._selected(categories, isthing):
            s = self.pq_per_cat.get(category_id)
            if s is None or s.tp + s.fp + s.fn == 0:
                continue
            n += 1
            denom = s.tp + 0.5 * s.fp + 0.5 * s.fn
            pq += s.iou / denom
            sq += s.iou / s.tp if s.tp != 0 else 0
            rq += s.tp / denom
        if n == 0:
            return {"pq": float(empty_value), "sq": float(empty_value), "rq": float(empty_value), "n": 0}
        return {"pq": pq / n, "sq": sq / n, "rq": rq / n, "n": n}

    def summary(self, categories: Mapping[int, Mapping], empty_value: float = 1.0) -> dict[str, dict[str, float]]:
        """``{"All", "Things", "Stuff"}`` -> :meth:`pq_average` of that set."""
        return {
            name: self.pq_average(categories, isthing=isthing, empty_value=empty_value)
            for name, isthing in (("All", None), ("Things", True), ("Stuff", False))
        }

    def to_dict(self) -> dict[str, dict[str, float]]:
        """JSON-friendly ``{str(category_id): {"tp","fp","fn","iou"}}`` (categories seen only)."""
        return {
            str(k): {"tp": v.tp, "fp": v.fp, "fn": v.fn, "iou": v.iou} for k, v in sorted(self.pq_per_cat.items())
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Mapping[str, float]]) -> "PQStat":
        """Inverse of :meth:`to_dict`."""
        out = cls()
        for k, v in data.items():
            out.pq_per_cat[int(k)] = PQStatCat(iou=float(v["iou"]), tp=int(v["tp"]), fp=int(v["fp"]), fn=int(v["fn"]))
        return out


# --------------------------------------------------------------------------- id maps


def read_panoptic_png(path: str | os.PathLike) -> np.ndarray:
    """Read a COCO-panoptic PNG into an H x W int64 id map (clear errors for missing/corrupt files)."""
    return read_png_ids(path, expect="rgb").astype(np.int64)


def _to_numpy(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):  # torch.Tensor without importing torch here
        x = x.detach().cpu().numpy()
    return np.asarray(x)


# --------------------------------------------------------------------------- per image


def pq_single_image(
    gt_ids: np.ndarray,
    gt_segments: list[Mapping],
    pred_ids: np.ndarray,
    pred_segments: list[Mapping],
    categories: Mapping[int, Mapping],
    image_id: Any = None,
) -> PQStat:
    """Per-category PQ statistics of one image, exactly as panopticapi counts them.

    Args:
        gt_ids: H x W ground-truth segment ids (0 = VOID), e.g. ``rgb2id`` of the GT PNG.
        gt_segments: ``[{"id", "category_id", "iscrowd", "area"}]``; ``area`` defaults to the
            pixel count in ``gt_ids`` when absent, ``iscrowd`` to 0.
        pred_ids: H x W predicted segment ids (0 = VOID / unassigned).
        pred_segments: ``[{"id", "category_id"}]``, every id present in ``pred_ids`` and vice versa.
        categories: ``{category_id: {"isthing": 0|1, ...}}`` in the same id space as the segments.
        image_id: used in error messages only.

    Returns:
        :class:`PQStat`; ``.pq_average(categories, isthing)`` gives this image's PQ/SQ/RQ
        (1.0 with n = 0 for a category set absent from both sides, see the module docstring).

    Raises:
        ValueError: sizes differ, ids negative, or duplicate segment ids.
        PanopticFormatError (a KeyError): a predicted id in the map but not in
            ``pred_segments`` (or the reverse), or an unknown category id.
    """
    where = f"the image with ID {image_id}" if image_id is not None else "the image"
    gt_ids = _to_numpy(gt_ids)
    pred_ids = _to_numpy(pred_ids)
    if gt_ids.ndim != 2 or pred_ids.ndim != 2:
        raise ValueError(f"In {where}: id maps must be 2-D, got gt {gt_ids.shape} and prediction {pred_ids.shape}")
    if gt_ids.shape != pred_ids.shape:
        raise ValueError(
            f"In {where}: prediction size {tuple(pred_ids.shape)} (H, W) differs from "
            f"ground-truth size {tuple(gt_ids.shape)}"
        )
    if pred_ids.size and pred_ids.min() < 0:
        raise ValueError(f"In {where}: negative predicted segment id {int(pred_ids.min())}")
    if gt_ids.size and gt_ids.min() < 0:
        raise ValueError(f"In {where}: negative ground-truth segment id {int(gt_ids.min())}")

    gt_segms = {int(s["id"]): s for s in gt_segments}
    if len(gt_segms) != len(gt_segments):
        raise ValueError(f"In {where}: duplicate ground-truth segment ids {[s['id'] for s in gt_segments]}")
    pred_segms = {int(s["id"]): s for s in pred_segments}
    if len(pred_segms) != len(pred_segments):
        raise ValueError(f"In {where}: duplicate predicted segment ids {[s['id'] for s in pred_segments]}")

    # Predicted areas + sanity checks (panopticapi's order and messages).
    pred_area: dict[int, int] = {}
    labels, counts = np.unique(pred_ids, return_counts=True)
    for label, count in zip(labels.tolist(), counts.tolist()):
        if label not in pred_segms:
            if label == VOID:
                continue
            raise PanopticFormatError(
                f"In {where} segment with ID {label} is presented in PNG and not presented in JSON."
            )
        pred_area[label] = count
        if pred_segms[label]["category_id"] not in categories:
            raise PanopticFormatError(
                f"In {where} segment with ID {label} has unknown category_id {pred_segms[label]['category_id']}."
            )
    not_in_map = [i for i in pred_segms if i not in pred_area]
    if not_in_map:
        raise PanopticFormatError(
            f"In {where} the following segment IDs {not_in_map} are presented in JSON and not presented in PNG."
        )
    gt_counts: dict[int, int] | None = None
    gt_area: dict[int, int] = {}
    for gid, s in gt_segms.items():
        if s["category_id"] not in categories:
            raise PanopticFormatError(
                f"In {where} ground-truth segment with ID {gid} has unknown category_id {s['category_id']}."
            )
        if "area" in s and s["area"] is not None:
            gt_area[gid] = int(s["area"])
        else:
            if gt_counts is None:
                u, c = np.unique(gt_ids, return_counts=True)
                gt_counts = dict(zip(u.tolist(), c.tolist()))
            gt_area[gid] = gt_counts.get(gid, 0)

    # Intersections of every (gt id, pred id) pair, in increasing joint-label order.
    joint = gt_ids.astype(np.uint64) * np.uint64(OFFSET) + pred_ids.astype(np.uint64)
    labels, counts = np.unique(joint, return_counts=True)
    gt_pred: dict[tuple[int, int], int] = {}
    for label, inter in zip(labels.tolist(), counts.tolist()):
        gt_pred[(label // OFFSET, label % OFFSET)] = inter

    stat = PQStat()
    gt_matched: set[int] = set()
    pred_matched: set[int] = set()
    for (gt_label, pred_label), inter in gt_pred.items():
        if gt_label not in gt_segms or pred_label not in pred_segms:
            continue
        gt_seg = gt_segms[gt_label]
        if gt_seg.get("iscrowd", 0) == 1:
            continue
        if gt_seg["category_id"] != pred_segms[pred_label]["category_id"]:
            continue
        union = pred_area[pred_label] + gt_area[gt_label] - inter - gt_pred.get((VOID, pred_label), 0)
        iou = inter / union
        if iou > 0.5:
            stat[gt_seg["category_id"]].tp += 1
            stat[gt_seg["category_id"]].iou += iou
            gt_matched.add(gt_label)
            pred_matched.add(pred_label)

    # False negatives; crowd regions are remembered per category (last one wins, as panopticapi).
    crowd_by_cat: dict[int, int] = {}
    for gt_label, gt_seg in gt_segms.items():
        if gt_label in gt_matched:
            continue
        if gt_seg.get("iscrowd", 0) == 1:
            crowd_by_cat[gt_seg["category_id"]] = gt_label
            continue
        stat[gt_seg["category_id"]].fn += 1

    # False positives: unmatched predictions not mostly (> 1/2) on VOID + same-category crowd.
    for pred_label, pred_seg in pred_segms.items():
        if pred_label in pred_matched:
            continue
        ignored = gt_pred.get((VOID, pred_label), 0)
        if pred_seg["category_id"] in crowd_by_cat:
            ignored += gt_pred.get((crowd_by_cat[pred_seg["category_id"]], pred_label), 0)
        if ignored / pred_area[pred_label] > 0.5:
            continue
        stat[pred_seg["category_id"]].fp += 1
    return stat


# --------------------------------------------------------------------------- files


def _load_json(src: str | os.PathLike | Mapping, what: str) -> dict:
    if isinstance(src, Mapping):
        return dict(src)
    path = Path(src)
    if not path.is_file():
        raise FileNotFoundError(f"{what} JSON not found: {path}")
    try:
        with open(path) as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{what} JSON {path} is not valid JSON: {e}") from e


def _default_folder(json_src: Any, folder: str | os.PathLike | None, what: str) -> Path:
    if folder is not None:
        return Path(folder)
    if isinstance(json_src, Mapping):
        raise ValueError(f"{what} folder must be given when the {what} JSON is passed as a dict")
    return Path(os.path.splitext(str(json_src))[0])  # panopticapi: "x.json" -> "x"


def pq_compute_per_image(
    gt_json: str | os.PathLike | Mapping,
    gt_folder: str | os.PathLike | None,
    pred_json: str | os.PathLike | Mapping,
    pred_folder: str | os.PathLike | None,
    allow_missing_predictions: bool = False,
) -> tuple[dict[Any, PQStat], dict[int, dict]]:
    """Per-image :class:`PQStat` of COCO-panoptic prediction files against ground truth.

    Returns ``({image_id: PQStat}, categories)`` in the ground-truth annotation order;
    ``categories`` is ``{id: category dict}`` from the GT JSON. A GT image without a
    prediction is an error (as panopticapi) unless ``allow_missing_predictions``.
    """
    gt = _load_json(gt_json, "ground-truth")
    pred = _load_json(pred_json, "prediction")
    gt_dir = _default_folder(gt_json, gt_folder, "ground-truth")
    pred_dir = _default_folder(pred_json, pred_folder, "prediction")
    for key in ("annotations", "categories"):
        if key not in gt:
            raise KeyError(f"ground-truth JSON {gt_json if not isinstance(gt_json, Mapping) else ''} has no {key!r}")
    if "annotations" not in pred:
        raise KeyError(f"prediction JSON {pred_json if not isinstance(pred_json, Mapping) else ''} has no 'annotations'")
    if not gt_dir.is_dir():
        raise FileNotFoundError(f"Folder {gt_dir} with ground truth segmentations doesn't exist")
    if not pred_dir.is_dir():
        raise FileNotFoundError(f"Folder {pred_dir} with predicted segmentations doesn't exist")

    categories = {el["id"]: el for el in gt["categories"]}
    pred_anns = {el["image_id"]: el for el in pred["annotations"]}
    per_image: dict[Any, PQStat] = OrderedDict()
    for gt_ann in gt["annotations"]:
        image_id = gt_ann["image_id"]
        if image_id not in pred_anns:
            if allow_missing_predictions:
                continue
            raise KeyError(f"no prediction for the image with id: {image_id}")
        pred_ann = pred_anns[image_id]
        gt_ids = read_panoptic_png(gt_dir / gt_ann["file_name"])
        pred_ids = read_panoptic_png(pred_dir / pred_ann["file_name"])
        per_image[image_id] = pq_single_image(
            gt_ids, gt_ann["segments_info"], pred_ids, pred_ann["segments_info"], categories, image_id=image_id
        )
    return per_image, categories


def pq_results(stat: PQStat, categories: Mapping[int, Mapping]) -> dict[str, Any]:
    """panopticapi's result dict: ``{"All","Things","Stuff": {"pq","sq","rq","n"}, "per_class": {...}}``."""
    results: dict[str, Any] = dict(stat.summary(categories))
    results["per_class"] = stat.per_class(categories)
    return results


def pq_compute(
    gt_json: str | os.PathLike | Mapping,
    gt_folder: str | os.PathLike | None,
    pred_json: str | os.PathLike | Mapping,
    pred_folder: str | os.PathLike | None,
    verbose: bool = False,
) -> dict[str, Any]:
    """Dataset PQ of COCO-panoptic files, equal to panopticapi's ``pq_compute`` on the same files.

    ``gt_folder``/``pred_folder`` default (None) to the JSON path without ``.json``.
    Returns ``{"All","Things","Stuff": {"pq","sq","rq","n"}, "per_class": {id: {...}}}``
    with values in [0, 1]; ``verbose`` prints the table.
    """
    start = time.time()
    per_image, categories = pq_compute_per_image(gt_json, gt_folder, pred_json, pred_folder)
    total = PQStat()
    for stat in per_image.values():
        total += stat
    results = pq_results(total, categories)
    if verbose:
        print(format_pq_table(results))
        print(f"Time elapsed: {time.time() - start:0.2f} seconds")
    return results


def format_pq_table(results: Mapping[str, Mapping[str, float]]) -> str:
    """The All/Things/Stuff table as panopticapi prints it (PQ, SQ, RQ in percent, N)."""
    lines = ["{:10s}| {:>5s}  {:>5s}  {:>5s} {:>5s}".format("", "PQ", "SQ", "RQ", "N"), "-" * (10 + 7 * 4)]
    for name in ("All", "Things", "Stuff"):
        r = results[name]
        lines.append(
            "{:10s}| {:5.1f}  {:5.1f}  {:5.1f} {:5d}".format(
                name, 100 * r["pq"], 100 * r["sq"], 100 * r["rq"], int(r["n"])
            )
        )
    return "\n".join(lines)


def _percent_metrics(summary: Mapping[str, Mapping[str, float]]) -> dict[str, float]:
    out: dict[str, float] = {}
    for name, suffix in (("All", ""), ("Things", "_th"), ("Stuff", "_st")):
        for key in ("pq", "sq", "rq"):
            out[key.upper() + suffix] = 100.0 * summary[name][key]
    return out


# --------------------------------------------------------------------------- model outputs


def panoptic_categories(metadata: Any) -> dict[int, dict]:
    """``{contiguous_id: {"id", "name", "isthing"}}`` for a dataset's metadata.

    Contiguous ids are the model's class indices (and the dataset dicts' ``category_id``);
    a class is a thing when its contiguous id is a value of ``thing_dataset_id_to_contiguous_id``.
    """
    names = list(metadata.get("stuff_classes", None) or [])
    thing_ids = set((metadata.get("thing_dataset_id_to_contiguous_id", None) or {}).values())
    stuff_map = metadata.get("stuff_dataset_id_to_contiguous_id", None) or {}
    contiguous = set(stuff_map.values()) | thing_ids | set(range(len(names)))
    return {
        c: {"id": c, "name": names[c] if c < len(names) else str(c), "isthing": int(c in thing_ids)}
        for c in sorted(contiguous)
    }


def pq_for_model_output(
    panoptic_seg: tuple[Any, list[Mapping]],
    dataset_dict: Mapping,
    categories: Mapping[int, Mapping],
) -> PQStat:
    """Per-image :class:`PQStat` of a model's ``"panoptic_seg"`` output against its dataset dict.

    Both sides use contiguous category ids (``dataset_dict["segments_info"]`` and the model's
    ``segments_info``), so ``categories`` comes from :func:`panoptic_categories`. The ground
    truth is read from ``dataset_dict["pan_seg_file_name"]``. No files are written.
    """
    id_map, segments_info = panoptic_seg
    if segments_info is None:
        raise ValueError("pq_for_model_output needs segments_info (Mask2Former's panoptic output format)")
    pred_ids = _to_numpy(id_map).astype(np.int64)
    present = set(np.unique(pred_ids).tolist())
    pred_segments = [s for s in segments_info if int(s["id"]) in present]
    gt_ids = read_panoptic_png(dataset_dict["pan_seg_file_name"])
    return pq_single_image(
        gt_ids,
        dataset_dict["segments_info"],
        pred_ids,
        pred_segments,
        categories,
        image_id=dataset_dict.get("image_id", dataset_dict.get("file_name")),
    )


class COCOPanopticEvaluator(DatasetEvaluator):
    """PQ/SQ/RQ of ``outputs["panoptic_seg"]`` against ``metadata.panoptic_json``/``panoptic_root``.

    Contiguous category ids of the model are mapped back to dataset ids, predictions are
    written as COCO-panoptic PNGs + JSON (under ``output_dir`` when given, else a temporary
    folder) and scored image by image with :func:`pq_single_image`. After ``evaluate``,
    ``per_image_results[image_id]`` holds ``{"file_name", "stat": PQStat, "PQ", "SQ", ...}``
    on the main process. Only the images that were processed are scored (a warning says
    how many ground-truth images were left out).
    """

    def __init__(self, dataset_name: str, output_dir: str | os.PathLike | None = None):
        from ..data.catalog import MetadataCatalog

        self._dataset_name = dataset_name
        self._metadata = MetadataCatalog.get(dataset_name)
        self._output_dir = Path(output_dir).resolve() if output_dir else None
        thing_map = self._metadata.get("thing_dataset_id_to_contiguous_id", None) or {}
        stuff_map = self._metadata.get("stuff_dataset_id_to_contiguous_id", None) or {}
        self._thing_contiguous_to_dataset = {int(v): int(k) for k, v in thing_map.items()}
        self._stuff_contiguous_to_dataset = {int(v): int(k) for k, v in stuff_map.items()}
        self._warned_empty = False
        self.per_image_results: dict[Any, dict[str, Any]] = {}
        self.reset()

    def reset(self) -> None:
        self._predictions: list[dict[str, Any]] = []
        self.per_image_results = {}

    def _convert_category_id(self, segment: Mapping) -> dict:
        seg = dict(segment)
        isthing = seg.pop("isthing", None)
        if isthing is None:  # the model already produced dataset category ids
            return seg
        cid = int(seg["category_id"])
        primary, secondary = (
            (self._thing_contiguous_to_dataset, self._stuff_contiguous_to_dataset)
            if isthing
            else (self._stuff_contiguous_to_dataset, self._thing_contiguous_to_dataset)
        )
        if cid in primary:
            seg["category_id"] = primary[cid]
        elif cid in secondary:
            seg["category_id"] = secondary[cid]
        else:
            raise KeyError(
                f"{self._dataset_name}: predicted contiguous category id {cid} (isthing={bool(isthing)}) "
                "is in neither thing_ nor stuff_dataset_id_to_contiguous_id"
            )
        return seg

    def _from_label_divisor(self, id_map: np.ndarray) -> tuple[np.ndarray, list[dict]]:
        """``category * label_divisor + instance`` maps with -1 = VOID -> (ids + 1, segments_info)."""
        divisor = int(self._metadata.get("label_divisor", 1000))
        thing_ids = set(self._thing_contiguous_to_dataset)
        segments = []
        for label in np.unique(id_map).tolist():
            if label == -1:
                continue
            cls = label // divisor
            segments.append({"id": int(label) + 1, "category_id": int(cls), "isthing": cls in thing_ids})
        return id_map + 1, segments

    def process(self, inputs: list[dict], outputs: list[dict]) -> None:
        for inp, out in zip(inputs, outputs):
            id_map, segments_info = out["panoptic_seg"]
            id_map = _to_numpy(id_map).astype(np.int64)
            if segments_info is None:
                id_map, segments_info = self._from_label_divisor(id_map)
            present = set(np.unique(id_map).tolist())
            kept = [s for s in segments_info if int(s["id"]) in present]
            if len(kept) != len(segments_info) and not self._warned_empty:
                logger.warning("Dropping predicted segments with no pixels in the id map (e.g. %s)", inp.get("file_name"))
                self._warned_empty = True
            segments = [self._convert_category_id(s) for s in kept]
            for s in segments:
                s["id"] = int(s["id"])
                s["category_id"] = int(s["category_id"])
            file_name = inp.get("file_name") or str(inp["image_id"])
            png_name = os.path.splitext(os.path.basename(file_name))[0] + ".png"
            buf = io.BytesIO()
            Image.fromarray(id2rgb(id_map)).save(buf, format="PNG")
            self._predictions.append(
                {
                    "image_id": inp["image_id"],
                    "file_name": png_name,
                    "source_file_name": file_name,
                    "png_string": buf.getvalue(),
                    "segments_info": segments,
                }
            )

    def _gather(self) -> list[dict] | None:
        from ..utils import comm

        comm.synchronize()
        gathered = comm.gather(self._predictions, dst=0)
        if not comm.is_main_process():
            return None
        seen: set = set()
        predictions = []
        for part in gathered:
            for p in part:
                if p["image_id"] in seen:  # padded distributed samplers can repeat images
                    continue
                seen.add(p["image_id"])
                predictions.append(p)
        return predictions

    def _score(
        self, gt: dict, gt_folder: Path, pred_json: dict, pred_folder: Path
    ) -> tuple[PQStat, dict[Any, PQStat], dict[int, dict]]:
        per_image, categories = pq_compute_per_image(gt, gt_folder, pred_json, pred_folder)
        total = PQStat()
        for stat in per_image.values():
            total += stat
        return total, per_image, categories

    def evaluate(self) -> dict | None:
        predictions = self._gather()
        if predictions is None:
            return None
        if not predictions:
            logger.warning("%s: no panoptic predictions were processed; nothing to evaluate", self._dataset_name)
            return None
        gt_json_path = self._metadata.get("panoptic_json", None)
        gt_folder = self._metadata.get("panoptic_root", None)
        if not gt_json_path or not gt_folder:
            raise KeyError(f"metadata of {self._dataset_name} needs panoptic_json and panoptic_root for PQ")
        gt = _load_json(gt_json_path, "ground-truth")
        gt_ids = {a["image_id"] for a in gt["annotations"]}
        predicted = {p["image_id"] for p in predictions}
        unknown = sorted(map(str, predicted - gt_ids))
        if unknown:
            raise KeyError(f"{self._dataset_name}: predicted image ids not in {gt_json_path}: {unknown[:10]}")
        if len(predicted) < len(gt_ids):
            logger.warning(
                "%s: scoring %d of %d ground-truth images (the others were not processed)",
                self._dataset_name,
                len(predicted),
                len(gt_ids),
            )
        gt = dict(gt)
        gt["annotations"] = [a for a in gt["annotations"] if a["image_id"] in predicted]

        tmp = None
        if self._output_dir is not None:
            pred_folder = self._output_dir / "panoptic_predictions"
            if pred_folder.exists():
                shutil.rmtree(pred_folder)
            pred_folder.mkdir(parents=True)
        else:
            tmp = tempfile.TemporaryDirectory(prefix="panoptic_eval_")
            pred_folder = Path(tmp.name)
        try:
            annotations = []
            for p in predictions:
                (pred_folder / p["file_name"]).write_bytes(p["png_string"])
                annotations.append(
                    {"image_id": p["image_id"], "file_name": p["file_name"], "segments_info": p["segments_info"]}
                )
            pred_json = {"annotations": annotations}
            if self._output_dir is not None:
                with open(self._output_dir / "panoptic_predictions.json", "w") as f:
                    json.dump(pred_json, f)
            total, per_image, categories = self._score(gt, Path(gt_folder), pred_json, pred_folder)
        finally:
            if tmp is not None:
                tmp.cleanup()

        source = {p["image_id"]: p["source_file_name"] for p in predictions}
        self.per_image_results = {
            image_id: {"file_name": source[image_id], "stat": stat, **_percent_metrics(stat.summary(categories))}
            for image_id, stat in per_image.items()
        }
        results = pq_results(total, categories)
        logger.info("Panoptic evaluation results on %s:\n%s", self._dataset_name, format_pq_table(results))
        if self._output_dir is not None:
            with open(self._output_dir / "panoptic_results.json", "w") as f:
                json.dump({k: v for k, v in results.items() if k != "per_class"}, f, indent=2)
        return OrderedDict({"panoptic_seg": _percent_metrics(results)})


# --------------------------------------------------------------------------- CLI


def main(argv: list[str] | None = None) -> int:
    """``python -m eco_m2f.evaluation.panoptic``: score COCO-panoptic files like panopticapi."""
    parser = argparse.ArgumentParser(
        prog="python -m eco_m2f.evaluation.panoptic",
        description="PQ/SQ/RQ of COCO-panoptic predictions (PNG + JSON) against ground truth, as panopticapi.",
    )
    parser.add_argument("--gt-json", required=True, help="ground-truth panoptic JSON")
    parser.add_argument("--gt-folder", default=None, help="ground-truth PNG folder (default: gt JSON path without .json)")
    parser.add_argument("--pred-json", required=True, help="prediction panoptic JSON")
    parser.add_argument("--pred-folder", default=None, help="prediction PNG folder (default: pred JSON path without .json)")
    parser.add_argument("--out", default=None, help="write the results as JSON to this file")
    args = parser.parse_args(argv)

    try:
        results = pq_compute(args.gt_json, args.gt_folder, args.pred_json, args.pred_folder)
    except (FileNotFoundError, KeyError, ValueError) as e:
        msg = str(e) if not isinstance(e, KeyError) or isinstance(e, PanopticFormatError) else str(e.args[0])
        print(f"error: {msg}", file=sys.stderr)
        return 2
    print(format_pq_table(results))
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        serialisable = {k: v for k, v in results.items() if k != "per_class"}
        serialisable["per_class"] = {str(k): v for k, v in results["per_class"].items()}
        with open(out, "w") as f:
            json.dump(serialisable, f, indent=2)
        print(f"results written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
