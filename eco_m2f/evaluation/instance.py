"""Instance segmentation mask AP with pycocotools' ``COCOeval(iouType="segm")``.

Predicted masks are RLE-encoded, contiguous classes are mapped back to the dataset's
category ids (``metadata.thing_dataset_id_to_contiguous_id``) and scored against
``metadata.json_file`` (COCO instances format). Only the images that were processed are
evaluated (``params.imgIds``), so an image with no prediction still counts its ground
truth as missed. Results are in percent: AP, AP50, AP75, APs, APm, APl and ``AP-<class>``.
"""
from __future__ import annotations

import contextlib
import io
import json
import logging
import os
from collections import OrderedDict
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import pycocotools.mask as mask_util
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from ..utils import comm
from .evaluator import DatasetEvaluator

__all__ = ["COCOEvaluator", "instances_to_coco_json", "evaluate_coco_segm"]

logger = logging.getLogger(__name__)

_METRICS = ["AP", "AP50", "AP75", "APs", "APm", "APl"]


def _field(instances: Any, key: str) -> Any:
    if isinstance(instances, Mapping):
        return instances[key]
    return getattr(instances, key)


def _numpy(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    return np.asarray(x)


def instances_to_coco_json(
    instances: Any, image_id: Any, contiguous_to_dataset_id: Mapping[int, int] | None = None
) -> list[dict]:
    """``{"pred_masks" N x H x W, "scores" N, "pred_classes" N}`` -> COCO result dicts with RLE masks."""
    masks = _numpy(_field(instances, "pred_masks")).astype(bool)
    scores = _numpy(_field(instances, "scores")).astype(np.float64).reshape(-1)
    classes = _numpy(_field(instances, "pred_classes")).astype(np.int64).reshape(-1)
    if masks.ndim != 3 or not (len(masks) == len(scores) == len(classes)):
        raise ValueError(
            f"image {image_id}: pred_masks must be N x H x W with N scores and classes, got masks "
            f"{masks.shape}, {scores.shape[0]} scores, {classes.shape[0]} classes"
        )
    if len(masks) == 0:
        return []
    # pycocotools wants Fortran-ordered H x W x N uint8.
    rles = mask_util.encode(np.asfortranarray(masks.transpose(1, 2, 0).astype(np.uint8)))
    boxes = mask_util.toBbox(rles)
    results = []
    for k in range(len(masks)):
        rle = rles[k]
        rle["counts"] = rle["counts"].decode("ascii")
        cls = int(classes[k])
        if contiguous_to_dataset_id is not None:
            if cls not in contiguous_to_dataset_id:
                raise KeyError(f"image {image_id}: predicted class {cls} not in thing_dataset_id_to_contiguous_id")
            cls = contiguous_to_dataset_id[cls]
        results.append(
            {
                "image_id": image_id,
                "category_id": cls,
                "segmentation": rle,
                "bbox": [float(v) for v in boxes[k]],
                "score": float(scores[k]),
            }
        )
    return results


def evaluate_coco_segm(
    coco_gt: COCO, results: list[dict], img_ids: list | None = None, max_dets: int = 100
) -> COCOeval | None:
    """Run COCOeval(segm) on ``results``; its printed summary goes to the log. None if no results."""
    if not results:
        return None
    with contextlib.redirect_stdout(io.StringIO()) as out:
        coco_dt = coco_gt.loadRes(results)
        coco_eval = COCOeval(coco_gt, coco_dt, "segm")
        if img_ids is not None:
            coco_eval.params.imgIds = sorted(img_ids)
        coco_eval.params.maxDets = [1, 10, max_dets]
        coco_eval.evaluate()
        coco_eval.accumulate()
        coco_eval.summarize()
    logger.info("COCOeval segm:\n%s", out.getvalue())
    return coco_eval


class COCOEvaluator(DatasetEvaluator):
    """Mask AP of ``outputs["instances"]`` against ``metadata.json_file`` (COCO instances JSON)."""

    def __init__(
        self,
        dataset_name: str,
        output_dir: str | os.PathLike | None = None,
        max_dets_per_image: int = 100,
        per_category: bool = True,
    ):
        from ..data.catalog import MetadataCatalog

        self._dataset_name = dataset_name
        self._metadata = MetadataCatalog.get(dataset_name)
        self._output_dir = Path(output_dir).resolve() if output_dir else None
        self._max_dets = int(max_dets_per_image)
        self._per_category = per_category
        json_file = self._metadata.get("json_file", None)
        if not json_file:
            raise KeyError(f"metadata of {dataset_name} has no json_file (COCO instances JSON) for mask AP")
        if not Path(json_file).is_file():
            raise FileNotFoundError(f"{dataset_name}: COCO instances JSON not found: {json_file}")
        self._json_file = str(json_file)
        with contextlib.redirect_stdout(io.StringIO()):
            self._coco_gt = COCO(self._json_file)
        thing_map = self._metadata.get("thing_dataset_id_to_contiguous_id", None)
        self._contiguous_to_dataset = {int(v): int(k) for k, v in thing_map.items()} if thing_map else None
        self.reset()

    def reset(self) -> None:
        self._predictions: list[dict] = []
        self._image_ids: list = []

    def process(self, inputs: list[dict], outputs: list[dict]) -> None:
        for inp, out in zip(inputs, outputs):
            image_id = inp["image_id"]
            self._image_ids.append(image_id)
            if "instances" in out:
                self._predictions.extend(instances_to_coco_json(out["instances"], image_id, self._contiguous_to_dataset))

    def evaluate(self) -> dict[str, Any] | None:
        comm.synchronize()
        gathered = comm.gather((self._image_ids, self._predictions), dst=0)
        if not comm.is_main_process():
            return None
        image_ids: list = []
        predictions: list[dict] = []
        seen: set = set()
        for ids, preds in gathered:
            fresh = [i for i in ids if i not in seen]
            seen.update(fresh)
            image_ids.extend(fresh)
            fresh_set = set(fresh)
            predictions.extend(p for p in preds if p["image_id"] in fresh_set)
        if not image_ids:
            logger.warning("%s: no images were processed; nothing to evaluate", self._dataset_name)
            return None
        unknown = [i for i in image_ids if i not in self._coco_gt.imgs]
        if unknown:
            raise KeyError(f"{self._dataset_name}: image ids not in {self._json_file}: {unknown[:10]}")
        if self._output_dir is not None:
            self._output_dir.mkdir(parents=True, exist_ok=True)
            with open(self._output_dir / "coco_instances_results.json", "w") as f:
                json.dump(predictions, f)

        coco_eval = evaluate_coco_segm(self._coco_gt, predictions, image_ids, self._max_dets)
        if coco_eval is None:
            logger.warning("%s: no instance predictions; AP is NaN", self._dataset_name)
            return OrderedDict({"segm": {m: float("nan") for m in _METRICS}})
        res: dict[str, float] = OrderedDict(
            (m, float(coco_eval.stats[i] * 100) if coco_eval.stats[i] >= 0 else float("nan"))
            for i, m in enumerate(_METRICS)
        )
        if self._per_category:
            precision = coco_eval.eval["precision"]  # [IoU thr, recall, category, area range, max dets]
            for k, cat_id in enumerate(coco_eval.params.catIds):
                p = precision[:, :, k, 0, -1]
                p = p[p > -1]
                name = self._coco_gt.cats[cat_id].get("name", str(cat_id))
                res[f"AP-{name}"] = float(np.mean(p) * 100) if p.size else float("nan")
        logger.info(
            "Mask AP on %s: %s", self._dataset_name, " ".join(f"{m} {res[m]:.3f}" for m in _METRICS)
        )
        return OrderedDict({"segm": res})
