"""The COCO-panoptic dataset evaluator: PQ/SQ/RQ of a model's ``panoptic_seg`` outputs.

Predictions are encoded per process (PNG bytes), gathered on the main process, written as
COCO-panoptic files and scored against the dataset's ``panoptic_json`` / ``panoptic_root`` with
:func:`eco_m2f.evaluation.pq_compute.pq_compute_per_image` (panopticapi's semantics).
"""
from __future__ import annotations

import io
import json
import logging
import os
import shutil
import tempfile
from collections import OrderedDict
from pathlib import Path
from typing import Any, Mapping

import numpy as np
from PIL import Image

from ..data.io import id2rgb
from .evaluator import DatasetEvaluator
from .pq import PQStat, format_pq_table, percent_metrics, pq_results, to_numpy
from .pq_compute import load_panoptic_json, pq_compute_per_image

__all__ = ["COCOPanopticEvaluator"]

logger = logging.getLogger(__name__)


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
            id_map = to_numpy(id_map).astype(np.int64)
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
        gt = load_panoptic_json(gt_json_path, "ground-truth")
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
            image_id: {"file_name": source[image_id], "stat": stat, **percent_metrics(stat.summary(categories))}
            for image_id, stat in per_image.items()
        }
        results = pq_results(total, categories)
        logger.info("Panoptic evaluation results on %s:\n%s", self._dataset_name, format_pq_table(results))
        if self._output_dir is not None:
            with open(self._output_dir / "panoptic_results.json", "w") as f:
                json.dump({k: v for k, v in results.items() if k != "per_class"}, f, indent=2)
        return OrderedDict({"panoptic_seg": percent_metrics(results)})
