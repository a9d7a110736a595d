"""Semantic segmentation metrics as Detectron2's ``SemSegEvaluator``: mIoU, fwIoU, mACC, pACC.

A (C+1) x (C+1) confusion matrix is accumulated with rows = predicted class and
columns = ground-truth class; ground-truth pixels equal to the ignore label (255)
go to the extra column and are dropped from every metric. With ``tp`` the diagonal,
``pos_gt`` the column sums and ``pos_pred`` the row sums over real classes:

* ``acc = tp / pos_gt`` on classes with ground-truth pixels (``acc_valid = pos_gt > 0``);
  mACC is their mean, pACC = sum(tp) / sum(pos_gt);
* ``iou = tp / (pos_gt + pos_pred - tp)`` on classes with ground-truth pixels
  (``iou_valid = acc_valid & union > 0``, current Detectron2): classes absent from the
  ground truth are excluded from mIoU, whether or not they were predicted. (Detectron2
  releases up to 0.5 divided by the number of classes in GT *or* prediction instead; on
  full benchmark splits every class has GT pixels and the two agree exactly.)
* fwIoU = sum over valid classes of ``iou * pos_gt / sum(pos_gt)``.

Values are reported in percent, per class as ``IoU-<name>`` / ``ACC-<name>`` (NaN for
excluded classes).
"""
from __future__ import annotations

import json
import logging
import os
from collections import OrderedDict
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ..data.io import read_png_ids
from ..utils import comm
from .evaluator import DatasetEvaluator

__all__ = ["SemSegEvaluator", "confusion_matrix", "sem_seg_metrics", "load_sem_seg_png"]

logger = logging.getLogger(__name__)


def load_sem_seg_png(path: str | os.PathLike) -> np.ndarray:
    """Read a semantic label PNG (H x W class ids) as int64, with a clear error for bad files."""
    return read_png_ids(path, expect="single").astype(np.int64)


def confusion_matrix(
    pred: np.ndarray, gt: np.ndarray, num_classes: int, ignore_label: int = 255, name: str = "image"
) -> np.ndarray:
    """(C+1) x (C+1) int64 counts, ``[pred, gt]``; ignored GT pixels land in column C.

    Raises ValueError if sizes differ or a label is outside [0, C) (and not the ignore label).
    """
    pred = np.asarray(pred).astype(np.int64)
    gt = np.asarray(gt).astype(np.int64).copy()
    if pred.shape != gt.shape:
        raise ValueError(f"{name}: prediction size {pred.shape} differs from ground-truth size {gt.shape}")
    gt[gt == ignore_label] = num_classes
    bad_gt = (gt < 0) | (gt > num_classes)
    if bad_gt.any():
        raise ValueError(
            f"{name}: ground-truth label {int(gt[bad_gt][0])} outside [0, {num_classes}) "
            f"and not the ignore label {ignore_label}"
        )
    bad_pred = (pred < 0) | (pred >= num_classes)
    if bad_pred.any():
        raise ValueError(f"{name}: predicted label {int(pred[bad_pred][0])} outside [0, {num_classes})")
    n = num_classes + 1
    return np.bincount(n * pred.reshape(-1) + gt.reshape(-1), minlength=n * n).reshape(n, n)


def sem_seg_metrics(conf: np.ndarray, class_names: Sequence[str] | None = None) -> dict[str, float]:
    """Detectron2's semantic metrics (percent) from a (C+1) x (C+1) ``[pred, gt]`` confusion matrix."""
    num_classes = conf.shape[0] - 1
    names = list(class_names) if class_names is not None else [str(i) for i in range(num_classes)]
    acc = np.full(num_classes, np.nan, dtype=np.float64)
    iou = np.full(num_classes, np.nan, dtype=np.float64)
    tp = conf.diagonal()[:-1].astype(np.float64)
    pos_gt = np.sum(conf[:-1, :-1], axis=0).astype(np.float64)
    pos_pred = np.sum(conf[:-1, :-1], axis=1).astype(np.float64)
    total_gt = np.sum(pos_gt)
    class_weights = pos_gt / total_gt if total_gt > 0 else np.zeros_like(pos_gt)
    acc_valid = pos_gt > 0
    acc[acc_valid] = tp[acc_valid] / pos_gt[acc_valid]
    union = pos_gt + pos_pred - tp
    iou_valid = np.logical_and(acc_valid, union > 0)
    iou[iou_valid] = tp[iou_valid] / union[iou_valid]
    n_acc, n_iou = int(np.sum(acc_valid)), int(np.sum(iou_valid))
    macc = np.sum(acc[acc_valid]) / n_acc if n_acc else np.nan
    miou = np.sum(iou[iou_valid]) / n_iou if n_iou else np.nan
    fiou = np.sum(iou[iou_valid] * class_weights[iou_valid])
    pacc = np.sum(tp) / total_gt if total_gt > 0 else np.nan

    res: dict[str, float] = OrderedDict()
    res["mIoU"] = 100 * float(miou)
    res["fwIoU"] = 100 * float(fiou)
    for i, name in enumerate(names):
        res[f"IoU-{name}"] = 100 * float(iou[i])
    res["mACC"] = 100 * float(macc)
    res["pACC"] = 100 * float(pacc)
    for i, name in enumerate(names):
        res[f"ACC-{name}"] = 100 * float(acc[i])
    return res


class SemSegEvaluator(DatasetEvaluator):
    """mIoU/fwIoU/mACC/pACC of ``argmax(outputs["sem_seg"])`` against the semantic PNGs.

    The ground truth of an input is ``input["sem_seg_file_name"]``, or, if absent, that
    of the dataset dict with the same ``file_name`` (looked up in ``DatasetCatalog``).
    Class names come from ``metadata.stuff_classes``; ignore label from ``metadata.ignore_label``.
    """

    def __init__(
        self,
        dataset_name: str,
        output_dir: str | os.PathLike | None = None,
        num_classes: int | None = None,
        ignore_label: int | None = None,
    ):
        from ..data.catalog import MetadataCatalog

        self._dataset_name = dataset_name
        self._metadata = MetadataCatalog.get(dataset_name)
        self._output_dir = Path(output_dir).resolve() if output_dir else None
        names = self._metadata.get("stuff_classes", None)
        if num_classes is None:
            if not names:
                raise KeyError(f"metadata of {dataset_name} has no stuff_classes; pass num_classes")
            num_classes = len(names)
        self._num_classes = int(num_classes)
        self._class_names = list(names) if names and len(names) == self._num_classes else [
            str(i) for i in range(self._num_classes)
        ]
        self._ignore_label = int(ignore_label if ignore_label is not None else self._metadata.get("ignore_label", 255))
        self._file_to_gt: dict[str, str] | None = None
        self.reset()

    def reset(self) -> None:
        n = self._num_classes + 1
        self._conf_matrix = np.zeros((n, n), dtype=np.int64)

    def _gt_file(self, inp: dict) -> str:
        if inp.get("sem_seg_file_name"):
            return inp["sem_seg_file_name"]
        if self._file_to_gt is None:
            from ..data.catalog import DatasetCatalog

            self._file_to_gt = {
                d["file_name"]: d["sem_seg_file_name"]
                for d in DatasetCatalog.get(self._dataset_name)
                if d.get("sem_seg_file_name")
            }
        try:
            return self._file_to_gt[inp["file_name"]]
        except KeyError:
            raise KeyError(
                f"{self._dataset_name}: no sem_seg_file_name for input {inp.get('file_name')!r} "
                "(neither in the input nor in the dataset dicts)"
            ) from None

    def process(self, inputs: list[dict], outputs: list[dict]) -> None:
        for inp, out in zip(inputs, outputs):
            if "sem_seg" not in out:
                raise KeyError(
                    f"{self._dataset_name}: the model's output for {inp.get('file_name')} has no 'sem_seg' "
                    f"(it has {sorted(out)}); mIoU needs a model whose tasks include sem_seg"
                )
            scores = out["sem_seg"]
            if scores.shape[0] != self._num_classes:
                raise ValueError(
                    f"{inp.get('file_name')}: sem_seg has {scores.shape[0]} channels, "
                    f"{self._dataset_name} has {self._num_classes} classes"
                )
            pred = scores.argmax(dim=0).cpu().numpy()
            gt_file = self._gt_file(inp)
            gt = load_sem_seg_png(gt_file)
            self._conf_matrix += confusion_matrix(pred, gt, self._num_classes, self._ignore_label, name=gt_file)

    def evaluate(self) -> dict[str, Any] | None:
        comm.synchronize()
        matrices = comm.all_gather(self._conf_matrix)
        if not comm.is_main_process():
            return None
        conf = np.sum(np.stack(matrices), axis=0)
        self.conf_matrix = conf
        if conf[:-1, :-1].sum() == 0:
            logger.warning("%s: no labelled pixels were processed; nothing to evaluate", self._dataset_name)
            return None
        res = sem_seg_metrics(conf, self._class_names)
        if self._output_dir is not None:
            self._output_dir.mkdir(parents=True, exist_ok=True)
            with open(self._output_dir / "sem_seg_evaluation.json", "w") as f:
                json.dump(res, f, indent=2)
        logger.info(
            "Semantic segmentation on %s: mIoU %.3f fwIoU %.3f mACC %.3f pACC %.3f",
            self._dataset_name,
            res["mIoU"],
            res["fwIoU"],
            res["mACC"],
            res["pACC"],
        )
        return OrderedDict({"sem_seg": res})
