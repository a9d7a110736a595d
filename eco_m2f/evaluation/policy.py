"""How well the CTS policy network tells one-class superpatches from mixed ones.

Per image, the targets are made from the semantic ground truth (``sem_seg_file_name``) exactly as
in training (:func:`eco_m2f.modeling.policy.superpatch_targets`), after a nearest-neighbour resize
of the label map to the network input (``input["image"]``), whose superpatch grid the model's
``"policy"`` output covers. Reported (percent, task ``policy``):

* the 2-class segmentation metrics of ``P(uniform) > 0.5`` over superpatches as Detectron2's
  SemSegEvaluator computes them: ``pACC`` (superpatch accuracy), ``IoU-mixed``, ``IoU-uniform``,
  ``mIoU``, ``fwIoU``, ``mACC``, ``ACC-*``;
* ``precision_at_S``: of the S highest-scoring superpatches per image, the share that truly are
  uniform. That is what CTS's fixed budget uses: S = round(``share_ratio`` x the image's
  superpatches), so CTS's 103 of 256 (ADE20K, 512 crops) or 336 of 576 (Cityscapes, 768 crops)
  scale with the image; ``S_mean`` is the mean S per image;
* ``uniform_fraction``: the share of uniform targets, the precision that random scores would get.

A policy that scores larger windows too (dCTS, ``"policy_windows"``) gets the 2-class metrics and
``uniform_fraction`` of every size n as well, under ``<metric>_w<n>`` (targets from
:func:`eco_m2f.modeling.policy.window_targets`).
"""
from __future__ import annotations

import json
import logging
import os
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ..modeling.policy.targets import superpatch_targets, window_targets
from ..utils import comm
from .evaluator import DatasetEvaluator
from .semantic import confusion_matrix, load_sem_seg_png, sem_seg_metrics

__all__ = ["PolicyEvaluator", "POLICY_CLASSES"]

logger = logging.getLogger(__name__)

#: Class 0 and 1 of the policy's targets and logits.
POLICY_CLASSES = ("mixed", "uniform")


class PolicyEvaluator(DatasetEvaluator):
    """Accuracy of ``outputs[i]["policy"]`` against targets from the semantic ground truth.

    Args:
        dataset_name: for the logs and the ignore label of its metadata.
        output_dir: where ``policy_evaluation.json`` goes (None: not written).
        share_ratio: S / superpatches for ``precision_at_S`` (``MODEL.POLICY.TEST.SHARE_RATIO``).
        ignore_label: the ground truth's ignore label (default: the metadata's, else 255).
        ignore_as_class: as ``MODEL.POLICY.IGNORE_AS_CLASS`` in training.
    """

    def __init__(
        self,
        dataset_name: str,
        output_dir: str | os.PathLike | None = None,
        share_ratio: float = 103 / 256,
        ignore_label: int | None = None,
        ignore_as_class: bool = False,
    ) -> None:
        if not 0.0 < float(share_ratio) <= 1.0:
            raise ValueError(f"MODEL.POLICY.TEST.SHARE_RATIO must be in (0, 1], got {share_ratio}")
        from ..data.catalog import MetadataCatalog

        self._dataset_name = dataset_name
        self._output_dir = Path(output_dir).resolve() if output_dir else None
        self._share_ratio = float(share_ratio)
        meta = MetadataCatalog.get(dataset_name)
        self._ignore_label = int(ignore_label if ignore_label is not None else meta.get("ignore_label", 255))
        self._ignore_as_class = bool(ignore_as_class)
        self.reset()

    @classmethod
    def from_config(cls, cfg: Any, dataset_name: str, output_dir: str | os.PathLike | None = None) -> "PolicyEvaluator":
        return cls(dataset_name, output_dir, share_ratio=cfg.MODEL.POLICY.TEST.SHARE_RATIO,
                   ignore_label=cfg.MODEL.SEM_SEG_HEAD.IGNORE_VALUE, ignore_as_class=cfg.MODEL.POLICY.IGNORE_AS_CLASS)

    def reset(self) -> None:
        self._conf = np.zeros((3, 3), dtype=np.int64)  # [pred, target], 2 classes + the unused ignore column
        self._window_conf: dict[int, np.ndarray] = {}  # larger window sizes: their own matrices
        self._top_hits = 0
        self._top_total = 0
        self._images = 0

    def targets_for(self, inp: dict, window: int = 2) -> torch.Tensor:
        """rows x cols targets of one input for windows of ``window`` patches: its ground truth at
        the size of ``inp["image"]``."""
        path = inp.get("sem_seg_file_name")
        if not path:
            raise KeyError(f"{self._dataset_name}: input {inp.get('file_name')!r} has no sem_seg_file_name")
        gt = torch.from_numpy(load_sem_seg_png(path))
        size = tuple(inp["image"].shape[-2:]) if "image" in inp else tuple(gt.shape)
        if tuple(gt.shape) != size:  # the test mapper resized the image: resize its labels alike
            # pixel-centre nearest, as the mappers resize label maps
            gt = F.interpolate(gt[None, None].float(), size=size, mode="nearest-exact")[0, 0].to(torch.int64)
        if window == 2:
            return superpatch_targets(gt, self._ignore_label, self._ignore_as_class)
        return window_targets(gt, window, self._ignore_label, self._ignore_as_class)

    def process(self, inputs: list[dict], outputs: list[dict]) -> None:
        for inp, out in zip(inputs, outputs):
            if "policy" not in out:
                raise KeyError(f"{inp.get('file_name')}: the model's output has no 'policy' scores")
            scores = out["policy"].detach().float().cpu()
            targets = self.targets_for(inp)
            if scores.shape != targets.shape:
                raise ValueError(
                    f"{inp.get('file_name')}: policy scores {tuple(scores.shape)} do not cover the superpatch grid "
                    f"{tuple(targets.shape)} of the input image"
                )
            pred = (scores > 0.5).to(torch.int64)
            self._conf += confusion_matrix(pred.numpy(), targets.numpy(), len(POLICY_CLASSES),
                                           ignore_label=self._ignore_label, name=str(inp.get("file_name")))
            share = max(1, round(self._share_ratio * scores.numel()))
            top = scores.flatten().topk(share).indices
            self._top_hits += int(targets.flatten()[top].sum())
            self._top_total += share
            self._images += 1
            for n, window_scores in out.get("policy_windows", {}).items():
                window_scores = window_scores.detach().float().cpu()
                window_targets_ = self.targets_for(inp, int(n))
                if window_scores.shape != window_targets_.shape:
                    raise ValueError(
                        f"{inp.get('file_name')}: policy scores of {n}x{n} windows {tuple(window_scores.shape)} do not "
                        f"cover their grid {tuple(window_targets_.shape)} of the input image"
                    )
                conf = self._window_conf.setdefault(int(n), np.zeros((3, 3), dtype=np.int64))
                conf += confusion_matrix((window_scores > 0.5).to(torch.int64).numpy(), window_targets_.numpy(),
                                         len(POLICY_CLASSES), ignore_label=self._ignore_label,
                                         name=str(inp.get("file_name")))

    def evaluate(self) -> dict[str, Any] | None:
        comm.synchronize()
        gathered = comm.all_gather((self._conf, self._top_hits, self._top_total, self._images, self._window_conf))
        if not comm.is_main_process():
            return None
        conf = np.sum(np.stack([g[0] for g in gathered]), axis=0)
        hits, total, images = (sum(g[k] for g in gathered) for k in (1, 2, 3))
        if images == 0:
            logger.warning("%s: no image was processed; nothing to evaluate", self._dataset_name)
            return None
        res: dict[str, float] = OrderedDict(sem_seg_metrics(conf, POLICY_CLASSES))
        res["precision_at_S"] = 100.0 * hits / total
        res["S_mean"] = total / images
        res["uniform_fraction"] = 100.0 * float(conf[:, 1].sum()) / float(conf[:, :2].sum())
        for n in sorted({n for g in gathered for n in g[4]}):
            window_conf = np.sum(np.stack([g[4][n] for g in gathered if n in g[4]]), axis=0)
            if window_conf[:, :2].sum() == 0:
                continue  # images too small for a single window of this size
            for key, value in sem_seg_metrics(window_conf, POLICY_CLASSES).items():
                res[f"{key}_w{n}"] = value
            res[f"uniform_fraction_w{n}"] = 100.0 * float(window_conf[:, 1].sum()) / float(window_conf[:, :2].sum())
        if self._output_dir is not None:
            self._output_dir.mkdir(parents=True, exist_ok=True)
            with open(self._output_dir / "policy_evaluation.json", "w") as f:
                json.dump(res, f, indent=2)
        logger.info(
            "Policy on %s: superpatch accuracy %.2f, IoU mixed %.2f / uniform %.2f, precision of the top S "
            "(%.1f per image) %.2f, uniform share %.2f",
            self._dataset_name, res["pACC"], res["IoU-mixed"], res["IoU-uniform"], res["S_mean"],
            res["precision_at_S"], res["uniform_fraction"],
        )
        return OrderedDict({"policy": res})
