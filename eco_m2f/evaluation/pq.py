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

Dataset PQ from files (panopticapi's ``pq_compute``) is :mod:`.pq_compute`; the dataset
evaluator of model outputs is :mod:`.panoptic`.
"""
from __future__ import annotations

import os
from collections import defaultdict
from dataclasses import dataclass
from typing import Any, Iterable, Mapping

import numpy as np

from ..data.io import id2rgb, read_png_ids, rgb2id

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
    "pq_results",
    "percent_metrics",
    "format_pq_table",
    "panoptic_categories",
    "pq_for_model_output",
]

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


def to_numpy(x: Any) -> np.ndarray:
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
    gt_ids = to_numpy(gt_ids)
    pred_ids = to_numpy(pred_ids)
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


def pq_results(stat: PQStat, categories: Mapping[int, Mapping]) -> dict[str, Any]:
    """panopticapi's result dict: ``{"All","Things","Stuff": {"pq","sq","rq","n"}, "per_class": {...}}``."""
    results: dict[str, Any] = dict(stat.summary(categories))
    results["per_class"] = stat.per_class(categories)
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


def percent_metrics(summary: Mapping[str, Mapping[str, float]]) -> dict[str, float]:
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
    pred_ids = to_numpy(id_map).astype(np.int64)
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
