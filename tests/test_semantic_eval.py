"""Semantic metrics (Detectron2's SemSegEvaluator semantics) on hand-computed cases."""
from __future__ import annotations

import math
import uuid
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from eco_m2f.evaluation.semantic import SemSegEvaluator, confusion_matrix, sem_seg_metrics

IGN = 255
# Classes a=0, b=1, c=2, d=3.
GT1 = np.array(
    [
        [0, 0, 1, 1],
        [0, 0, 1, 1],
        [2, 2, IGN, IGN],
        [2, 2, IGN, IGN],
    ]
)
PRED1 = np.array(
    [
        [0, 0, 0, 1],
        [0, 0, 1, 1],
        [2, 1, 0, 0],  # the four ignored pixels are predicted "a": they must not count
        [2, 3, 0, 0],
    ]
)
# Hand count over the 12 labelled pixels of image 1:
#   a: gt 4, tp 4, predicted 5 (one b pixel)   -> IoU 4/(4+5-4) = 0.8, acc 4/4 = 1
#   b: gt 4, tp 3, predicted 4 (one c pixel)   -> IoU 3/(4+4-3) = 0.6, acc 3/4 = 0.75
#   c: gt 4, tp 2, predicted 2                 -> IoU 2/(4+2-2) = 0.5, acc 2/4 = 0.5
#   d: gt 0, predicted 1                       -> excluded from mIoU and mACC (no GT pixels)
# mIoU = (0.8 + 0.6 + 0.5)/3 = 0.63333; fwIoU = (0.8*4 + 0.6*4 + 0.5*4)/12 = 0.63333
# pACC = (4 + 3 + 2)/12 = 0.75; mACC = (1 + 0.75 + 0.5)/3 = 0.75
# (If the ignored pixels counted, a would be predicted 9 times: IoU 4/9.)


def test_metrics_with_ignore_pixels_hand_computed():
    conf = confusion_matrix(PRED1, GT1, num_classes=4, ignore_label=IGN)
    assert conf.shape == (5, 5)
    assert conf[:-1, :-1].sum() == 12  # ignored pixels dropped
    res = sem_seg_metrics(conf, ["a", "b", "c", "d"])
    assert res["IoU-a"] == pytest.approx(80.0)
    assert res["IoU-b"] == pytest.approx(60.0)
    assert res["IoU-c"] == pytest.approx(50.0)
    assert math.isnan(res["IoU-d"]) and math.isnan(res["ACC-d"])
    assert res["mIoU"] == pytest.approx(100 * 1.9 / 3)
    assert res["fwIoU"] == pytest.approx(100 * 1.9 / 3)
    assert res["pACC"] == pytest.approx(75.0)
    assert res["mACC"] == pytest.approx(75.0)
    assert res["ACC-b"] == pytest.approx(75.0)


def test_class_absent_from_gt_and_prediction_is_excluded():
    gt = np.array([[0, 0], [1, 1]])
    res = sem_seg_metrics(confusion_matrix(gt, gt, num_classes=5), [str(i) for i in range(5)])
    # classes 2, 3, 4 occur nowhere: the mean is over classes 0 and 1 only.
    assert res["mIoU"] == pytest.approx(100.0)
    assert sum(math.isnan(res[f"IoU-{i}"]) for i in range(5)) == 3


def test_bad_labels_and_sizes_raise():
    with pytest.raises(ValueError, match="ground-truth label 7 outside"):
        confusion_matrix(np.zeros((2, 2)), np.full((2, 2), 7), num_classes=4, name="x.png")
    with pytest.raises(ValueError, match=r"x.png: prediction size \(2, 3\) differs"):
        confusion_matrix(np.zeros((2, 3)), np.zeros((2, 2)), num_classes=4, name="x.png")


def _one_hot(pred: np.ndarray, c: int) -> torch.Tensor:
    """C x H x W scores whose argmax is ``pred``."""
    return torch.nn.functional.one_hot(torch.from_numpy(pred).long(), c).permute(2, 0, 1).float()


@pytest.fixture
def sem_dataset(tmp_path: Path):
    from eco_m2f.data.catalog import DatasetCatalog, MetadataCatalog

    gt2 = np.full((2, 2), 3)
    files = []
    for i, gt in enumerate((GT1, gt2)):
        f = tmp_path / f"gt_{i}.png"
        Image.fromarray(gt.astype(np.uint8)).save(f)
        files.append(str(f))
    dicts = [{"file_name": f"/img/{i}.jpg", "sem_seg_file_name": f, "image_id": i} for i, f in enumerate(files)]
    name = f"_test_sem_{uuid.uuid4().hex[:8]}"
    DatasetCatalog.register(name, lambda: dicts)
    MetadataCatalog.get(name).set(stuff_classes=["a", "b", "c", "d"], ignore_label=IGN, evaluator_type="sem_seg")
    return name, dicts


def test_evaluator_accumulates_images_and_finds_gt_through_catalog(sem_dataset, tmp_path):
    name, dicts = sem_dataset
    ev = SemSegEvaluator(name, output_dir=tmp_path / "out")
    ev.reset()
    # image 1 carries its GT path; image 2 (GT all d, predicted all d) is looked up by file_name
    ev.process([dicts[0]], [{"sem_seg": _one_hot(PRED1, 4)}])
    ev.process([{"file_name": dicts[1]["file_name"], "image_id": 1}], [{"sem_seg": _one_hot(np.full((2, 2), 3), 4)}])
    res = ev.evaluate()["sem_seg"]
    # d now has 4 GT pixels, 4 TP, 5 predictions (one in image 1): IoU 4/5 = 0.8, acc 1.
    # mIoU = (0.8 + 0.6 + 0.5 + 0.8)/4 = 0.675; pACC = (4+3+2+4)/16 = 0.8125;
    # mACC = (1 + 0.75 + 0.5 + 1)/4 = 0.8125; fwIoU = (0.8+0.6+0.5+0.8)*4/16 = 0.675.
    assert res["mIoU"] == pytest.approx(67.5)
    assert res["pACC"] == pytest.approx(81.25)
    assert res["mACC"] == pytest.approx(81.25)
    assert res["fwIoU"] == pytest.approx(67.5)
    assert res["IoU-d"] == pytest.approx(80.0)
    assert (tmp_path / "out" / "sem_seg_evaluation.json").is_file()
    # reset() starts over
    ev.reset()
    ev.process([dicts[0]], [{"sem_seg": _one_hot(GT1 % IGN, 4)}])
    assert ev.evaluate()["sem_seg"]["mIoU"] == pytest.approx(100.0)


def test_evaluator_errors_name_the_culprit(sem_dataset):
    name, dicts = sem_dataset
    ev = SemSegEvaluator(name)
    with pytest.raises(ValueError, match="sem_seg has 3 channels"):
        ev.process([dicts[0]], [{"sem_seg": torch.zeros(3, 4, 4)}])
    with pytest.raises(KeyError, match="no sem_seg_file_name for input '/img/unknown.jpg'"):
        ev.process([{"file_name": "/img/unknown.jpg"}], [{"sem_seg": torch.zeros(4, 4, 4)}])
    with pytest.raises(FileNotFoundError, match="missing.png"):
        ev.process([{"file_name": "x", "sem_seg_file_name": "/nonexistent/missing.png"}],
                   [{"sem_seg": torch.zeros(4, 4, 4)}])


def test_inference_on_dataset_runs_in_eval_mode_without_grad_and_restores_training(sem_dataset):
    from eco_m2f.evaluation import DatasetEvaluators, inference_on_dataset

    name, dicts = sem_dataset

    class Replay(torch.nn.Module):
        """Returns prepared scores; records mode and grad state of each call."""

        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.ones(()))
            self.calls = []

        def forward(self, batch):
            self.calls.append((self.training, torch.is_grad_enabled()))
            preds = {0: PRED1, 1: np.full((2, 2), 3)}
            return [{"sem_seg": _one_hot(preds[x["image_id"]], 4) * self.w} for x in batch]

    model = Replay().train()
    loader = [[dicts[0]], [dicts[1]]]
    res = inference_on_dataset(model, loader, [SemSegEvaluator(name)])
    assert res["sem_seg"]["mIoU"] == pytest.approx(67.5)  # as in the evaluator test above
    assert model.calls == [(False, False), (False, False)]
    assert model.training  # restored
    # No evaluator: inference only, empty results.
    assert inference_on_dataset(model.eval(), loader, None) == {}
    assert not model.training
    # Two evaluators reporting the same task are a configuration error.
    with pytest.raises(KeyError, match="sem_seg"):
        inference_on_dataset(model, loader, DatasetEvaluators([SemSegEvaluator(name), SemSegEvaluator(name)]))
