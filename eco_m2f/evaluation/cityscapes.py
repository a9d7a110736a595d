"""Cityscapes evaluation through the official ``cityscapesscripts`` (semantic, instance, panoptic).

Predictions are encoded on each process (PNG bytes), gathered on the main process and
written to a working folder there, so no shared file system is needed across machines.
The official scripts are then run on the ground truth under ``metadata.gt_dir``
(``gtFine/<split>`` with ``<city>/<city>_<seq>_<frame>_gtFine_{labelIds,instanceIds}.png``)
and, for panoptic, ``metadata.panoptic_json``/``panoptic_root``. Only the images that
were processed are scored.

The scripts predate numpy 2 and exit the interpreter on errors: they run inside
:func:`eco_m2f.data.cityscapes_scripts.cityscapes_scripts` (numpy shim patched onto their module
objects for the duration, output to the log, ``sys.exit`` turned into ``RuntimeError``, the
working directory moved to a scratch folder).
"""
from __future__ import annotations

import copy
import glob
import logging
import os
import tempfile
from collections import OrderedDict
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from ..data.cityscapes_scripts import cityscapes_scripts
from ..data.io import png_bytes
from ..utils import comm
from .evaluator import DatasetEvaluator
from .panoptic import COCOPanopticEvaluator
from .pq import PQStat

__all__ = [
    "CityscapesSemSegEvaluator",
    "CityscapesInstanceEvaluator",
    "CityscapesPanopticEvaluator",
    "cityscapes_image_key",
]

logger = logging.getLogger(__name__)


def cityscapes_image_key(file_name: str) -> str:
    """``.../frankfurt_000000_000294_leftImg8bit.png`` -> ``frankfurt_000000_000294``."""
    parts = os.path.basename(file_name).split("_")
    if len(parts) < 4:
        raise ValueError(f"not a Cityscapes file name (<city>_<seq>_<frame>_<type>.png): {file_name}")
    return "_".join(parts[:3])


def _numpy(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    return np.asarray(x)


def _gt_files(gt_dir: str | os.PathLike, suffix: str, keys: set[str], dataset_name: str) -> list[str]:
    gt_dir = Path(gt_dir)
    if not gt_dir.is_dir():
        raise FileNotFoundError(f"{dataset_name}: Cityscapes gt_dir not found: {gt_dir}")
    files = sorted(glob.glob(os.path.join(str(gt_dir), "*", f"*_gtFine_{suffix}.png")))
    if not files:
        raise FileNotFoundError(f"{dataset_name}: no *_gtFine_{suffix}.png under {gt_dir}/<city>/")
    chosen = [os.path.abspath(f) for f in files if cityscapes_image_key(f) in keys]
    missing = keys - {cityscapes_image_key(f) for f in chosen}
    if missing:
        raise FileNotFoundError(f"{dataset_name}: no ground truth in {gt_dir} for images {sorted(missing)[:10]}")
    if len(chosen) < len(files):
        logger.warning("%s: scoring %d of %d ground-truth images (the others were not processed)",
                       dataset_name, len(chosen), len(files))
    return chosen


class _CityscapesEvaluator(DatasetEvaluator):
    def __init__(self, dataset_name: str):
        from ..data.catalog import MetadataCatalog

        self._dataset_name = dataset_name
        self._metadata = MetadataCatalog.get(dataset_name)
        gt_dir = self._metadata.get("gt_dir", None)
        if not gt_dir:
            raise KeyError(f"metadata of {dataset_name} has no gt_dir (gtFine/<split> folder) for Cityscapes evaluation")
        self._gt_dir = str(gt_dir)
        self.reset()

    def reset(self) -> None:
        self._files: dict[str, dict[str, bytes | str]] = {}  # image key -> {relative name: content}

    def _gathered(self) -> dict[str, dict[str, bytes | str]] | None:
        comm.synchronize()
        parts = comm.gather(self._files, dst=0)
        if not comm.is_main_process():
            return None
        merged: dict[str, dict[str, bytes | str]] = {}
        for part in parts:
            for key, files in part.items():
                merged.setdefault(key, files)
        return merged

    @staticmethod
    def _write(folder: Path, files: Mapping[str, Mapping[str, bytes | str]]) -> None:
        for per_image in files.values():
            for name, content in per_image.items():
                path = folder / name
                if isinstance(content, bytes):
                    path.write_bytes(content)
                else:
                    path.write_text(content)


class CityscapesSemSegEvaluator(_CityscapesEvaluator):
    """IoU / iIoU (class and category level) with ``evalPixelLevelSemanticLabeling``.

    ``argmax(outputs["sem_seg"])`` (contiguous ids) is written as a labelIds PNG: through
    ``metadata.stuff_dataset_id_to_contiguous_id`` / ``thing_dataset_id_to_contiguous_id``
    inverted when present (dataset ids are Cityscapes label ids), otherwise contiguous
    id = Cityscapes trainId (``cityscapesscripts.helpers.labels.trainId2label``).
    Returns ``{"sem_seg": {"IoU", "iIoU", "IoU_sup", "iIoU_sup"}}`` in percent.
    """

    def __init__(self, dataset_name: str):
        super().__init__(dataset_name)
        lut = {}
        for key in ("stuff_dataset_id_to_contiguous_id", "thing_dataset_id_to_contiguous_id"):
            for dataset_id, contiguous in (self._metadata.get(key, None) or {}).items():
                lut.setdefault(int(contiguous), int(dataset_id))
        if not lut:
            from cityscapesscripts.helpers.labels import trainId2label

            lut = {t: lab.id for t, lab in trainId2label.items() if 0 <= t < 255 and not lab.ignoreInEval}
        self._contiguous_to_label_id = lut

    def process(self, inputs: list[dict], outputs: list[dict]) -> None:
        for inp, out in zip(inputs, outputs):
            key = cityscapes_image_key(inp["file_name"])
            pred = _numpy(out["sem_seg"].argmax(dim=0))
            label_ids = np.zeros(pred.shape, dtype=np.uint8)  # 0 = "unlabeled" for unmapped classes
            for contiguous, label_id in self._contiguous_to_label_id.items():
                label_ids[pred == contiguous] = label_id
            self._files[key] = {f"{key}_pred.png": png_bytes(label_ids)}

    def evaluate(self) -> dict[str, Any] | None:
        files = self._gathered()
        if files is None:
            return None
        if not files:
            logger.warning("%s: no images were processed; nothing to evaluate", self._dataset_name)
            return None
        import cityscapesscripts.evaluation.evalPixelLevelSemanticLabeling as cs_eval

        gt_list = _gt_files(self._gt_dir, "labelIds", set(files), self._dataset_name)
        with tempfile.TemporaryDirectory(prefix="cityscapes_sem_") as tmp:
            folder = Path(tmp)
            self._write(folder, files)
            pred_list = [str(folder / f"{cityscapes_image_key(g)}_pred.png") for g in gt_list]
            args = copy.copy(cs_eval.args)
            args.predictionPath = str(folder)
            args.predictionWalk = None
            args.JSONOutput = False
            args.colorized = False
            args.bold = args.nocol = ""
            args.quiet = True
            args.evalPixelAccuracy = False
            args.evalLabels = []
            with cityscapes_scripts(cs_eval, workdir=folder):
                results = cs_eval.evaluateImgLists(pred_list, gt_list, args)
        res = OrderedDict(
            IoU=100.0 * float(results["averageScoreClasses"]),
            iIoU=100.0 * float(results["averageScoreInstClasses"]),
            IoU_sup=100.0 * float(results["averageScoreCategories"]),
            iIoU_sup=100.0 * float(results["averageScoreInstCategories"]),
        )
        logger.info("Cityscapes semantic on %s: %s", self._dataset_name, dict(res))
        return OrderedDict({"sem_seg": res})


class CityscapesInstanceEvaluator(_CityscapesEvaluator):
    """Mask AP / AP50 with ``evalInstanceLevelSemanticLabeling`` (txt + PNG per instance).

    Classes map to Cityscapes label ids through ``thing_dataset_id_to_contiguous_id``
    inverted when present, otherwise by ``metadata.thing_classes`` names
    (``cityscapesscripts.helpers.labels.name2label``). Returns ``{"segm": {"AP", "AP50"}}``.
    """

    def __init__(self, dataset_name: str):
        super().__init__(dataset_name)
        thing_map = self._metadata.get("thing_dataset_id_to_contiguous_id", None)
        if thing_map:
            self._contiguous_to_label_id = {int(v): int(k) for k, v in thing_map.items()}
        else:
            from cityscapesscripts.helpers.labels import name2label

            names = self._metadata.get("thing_classes", None) or []
            unknown = [n for n in names if n not in name2label]
            if not names or unknown:
                raise KeyError(
                    f"{dataset_name}: need thing_dataset_id_to_contiguous_id or Cityscapes thing_classes "
                    f"(unknown names: {unknown})"
                )
            self._contiguous_to_label_id = {i: name2label[n].id for i, n in enumerate(names)}

    def process(self, inputs: list[dict], outputs: list[dict]) -> None:
        for inp, out in zip(inputs, outputs):
            key = cityscapes_image_key(inp["file_name"])
            files: dict[str, bytes | str] = {}
            lines = []
            inst = out.get("instances")
            if inst is not None:
                get = (lambda k: inst[k]) if isinstance(inst, Mapping) else (lambda k: getattr(inst, k))
                masks = _numpy(get("pred_masks")).astype(bool)
                scores = _numpy(get("scores")).reshape(-1)
                classes = _numpy(get("pred_classes")).reshape(-1)
                for i in range(len(masks)):
                    cls = int(classes[i])
                    if cls not in self._contiguous_to_label_id:
                        raise KeyError(f"{inp['file_name']}: predicted thing class {cls} has no Cityscapes label id")
                    label_id = self._contiguous_to_label_id[cls]
                    name = f"{key}_{i}_{label_id}.png"
                    files[name] = png_bytes(masks[i].astype(np.uint8) * 255)
                    lines.append(f"{name} {label_id} {float(scores[i])}\n")
            # Every ground-truth image needs a prediction file, possibly empty.
            files[f"{key}_pred.txt"] = "".join(lines)
            self._files[key] = files

    def evaluate(self) -> dict[str, Any] | None:
        files = self._gathered()
        if files is None:
            return None
        if not files:
            logger.warning("%s: no images were processed; nothing to evaluate", self._dataset_name)
            return None
        import cityscapesscripts.evaluation.evalInstanceLevelSemanticLabeling as cs_eval
        import cityscapesscripts.evaluation.instances2dict as cs_inst

        gt_list = _gt_files(self._gt_dir, "instanceIds", set(files), self._dataset_name)
        with tempfile.TemporaryDirectory(prefix="cityscapes_inst_") as tmp:
            folder = Path(tmp)
            self._write(folder, files)
            pred_list = [str(folder / f"{cityscapes_image_key(g)}_pred.txt") for g in gt_list]
            args = copy.copy(cs_eval.args)
            args.predictionPath = os.path.abspath(folder)
            args.predictionWalk = None
            args.JSONOutput = False
            args.colorized = False
            args.quiet = True
            args.gtInstancesFile = str(folder / "gtInstances.json")
            args.instLabels = []
            with cityscapes_scripts(cs_eval, cs_inst, workdir=folder):
                results = cs_eval.evaluateImgLists(pred_list, gt_list, args)["averages"]
        res = OrderedDict(AP=float(results["allAp"]) * 100, AP50=float(results["allAp50%"]) * 100)
        logger.info("Cityscapes instance on %s: %s", self._dataset_name, dict(res))
        return OrderedDict({"segm": res})


class CityscapesPanopticEvaluator(COCOPanopticEvaluator):
    """PQ with ``evalPanopticSemanticLabeling`` on ``metadata.panoptic_json``/``panoptic_root``.

    Same inputs, prediction files and result keys as :class:`COCOPanopticEvaluator`; the
    statistics come from the official Cityscapes script (panopticapi's algorithm), so
    ``per_image_results`` stays empty here (use :func:`eco_m2f.evaluation.pq.pq_single_image`).
    """

    def _score(
        self, gt: dict, gt_folder: Path, pred_json: dict, pred_folder: Path
    ) -> tuple[PQStat, dict[Any, PQStat], dict[int, dict]]:
        import cityscapesscripts.evaluation.evalPanopticSemanticLabeling as cs_pan

        categories = {el["id"]: el for el in gt["categories"]}
        preds = {a["image_id"]: copy.deepcopy(a) for a in pred_json["annotations"]}
        pairs = [(gt_ann, preds[gt_ann["image_id"]]) for gt_ann in gt["annotations"]]
        if not gt_folder.is_dir():
            raise FileNotFoundError(f"Folder {gt_folder} with ground truth segmentations doesn't exist")
        with tempfile.TemporaryDirectory(prefix="cityscapes_pan_") as tmp, cityscapes_scripts(cs_pan, workdir=tmp):
            cs_stat = cs_pan.pq_compute_single_core(
                0, pairs, str(gt_folder.resolve()), str(Path(pred_folder).resolve()), categories
            )
        total = PQStat()
        for category_id, s in cs_stat.pq_per_cat.items():
            total[category_id].iou += float(s.iou)
            total[category_id].tp += int(s.tp)
            total[category_id].fp += int(s.fp)
            total[category_id].fn += int(s.fn)
        return total, {}, categories
