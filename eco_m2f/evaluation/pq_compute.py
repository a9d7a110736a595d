"""Dataset PQ of COCO-panoptic prediction files, equal to panopticapi's ``pq_compute``.

Ground truth and predictions are each a JSON (``annotations`` with ``segments_info``) and a
folder of PNGs (ids as RGB); every image is scored with :func:`eco_m2f.evaluation.pq.pq_single_image`
and the statistics are summed. Also a command line tool::

    python -m eco_m2f.evaluation.pq_compute --gt-json J --gt-folder D \
        --pred-json J --pred-folder D [--out results.json]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections import OrderedDict
from pathlib import Path
from typing import Any, Mapping

from .pq import PanopticFormatError, PQStat, format_pq_table, pq_results, pq_single_image, read_panoptic_png

__all__ = ["load_panoptic_json", "main", "pq_compute", "pq_compute_per_image"]


def load_panoptic_json(src: str | os.PathLike | Mapping, what: str) -> dict:
    """A COCO-panoptic JSON file (or a dict, returned as is); ``what`` names it in errors."""
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
    gt = load_panoptic_json(gt_json, "ground-truth")
    pred = load_panoptic_json(pred_json, "prediction")
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


# --------------------------------------------------------------------------- CLI


def main(argv: list[str] | None = None) -> int:
    """``python -m eco_m2f.evaluation.pq_compute``: score COCO-panoptic files like panopticapi."""
    parser = argparse.ArgumentParser(
        prog="python -m eco_m2f.evaluation.pq_compute",
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
