"""Mask AP through pycocotools: perfect masks give AP 100, perturbed ones less."""
from __future__ import annotations

import json
import math
import uuid
from pathlib import Path

import numpy as np
import pycocotools.mask as mask_util
import pytest
import torch

from eco_m2f.evaluation.instance import COCOEvaluator, instances_to_coco_json

H, W = 64, 80
# dataset category ids 5 and 7 -> contiguous 0 and 1
BOXES = {
    1: [(5, 5, 25, 25, 5), (30, 40, 70, 60, 7)],  # (y0, x0, y1, x1, category): 400 px small, 1600 px medium
    2: [(10, 10, 50, 50, 7), (50, 55, 62, 75, 5)],  # 1600 px medium, 240 px small
}


def _mask(y0, x0, y1, x1) -> np.ndarray:
    m = np.zeros((H, W), bool)
    m[y0:y1, x0:x1] = True
    return m


@pytest.fixture
def coco_dataset(tmp_path: Path):
    from eco_m2f.data.catalog import DatasetCatalog, MetadataCatalog

    images, anns = [], []
    for image_id, boxes in BOXES.items():
        images.append({"id": image_id, "file_name": f"{image_id}.jpg", "height": H, "width": W})
        for y0, x0, y1, x1, cat in boxes:
            rle = mask_util.encode(np.asfortranarray(_mask(y0, x0, y1, x1).astype(np.uint8)))
            anns.append({
                "id": len(anns) + 1, "image_id": image_id, "category_id": cat, "iscrowd": 0,
                "segmentation": {"size": rle["size"], "counts": rle["counts"].decode("ascii")},
                "area": float(mask_util.area(rle)), "bbox": [float(v) for v in mask_util.toBbox(rle)],
            })
    cats = [{"id": 5, "name": "five"}, {"id": 7, "name": "seven"}]
    json_file = tmp_path / "instances.json"
    json_file.write_text(json.dumps({"images": images, "annotations": anns, "categories": cats}))
    name = f"_test_inst_{uuid.uuid4().hex[:8]}"
    DatasetCatalog.register(name, lambda: [])
    MetadataCatalog.get(name).set(
        json_file=str(json_file), thing_dataset_id_to_contiguous_id={5: 0, 7: 1}, thing_classes=["five", "seven"],
        evaluator_type="coco",
    )
    return name


def _outputs(image_id: int, shrink: int = 0, extra_fp: bool = False) -> dict:
    masks, classes, scores = [], [], []
    for y0, x0, y1, x1, cat in BOXES[image_id]:
        masks.append(_mask(y0, x0, y1 - shrink, x1))
        classes.append({5: 0, 7: 1}[cat])
        scores.append(0.9)
    if extra_fp:  # a confident prediction on empty background
        masks.append(_mask(0, 70, 20, 80))
        classes.append(0)
        scores.append(0.99)
    return {"instances": {"pred_masks": torch.from_numpy(np.stack(masks)), "scores": torch.tensor(scores),
                          "pred_classes": torch.tensor(classes)}}


def _run(name: str, **kw) -> dict:
    ev = COCOEvaluator(name)
    ev.reset()
    for image_id in BOXES:
        ev.process([{"image_id": image_id, "file_name": f"{image_id}.jpg"}], [_outputs(image_id, **kw)])
    return ev.evaluate()["segm"]


def test_perfect_masks_give_ap_100(coco_dataset):
    res = _run(coco_dataset)
    for k in ("AP", "AP50", "AP75", "APs", "APm"):
        assert res[k] == pytest.approx(100.0), k
    assert math.isnan(res["APl"])  # no large objects in the ground truth
    assert res["AP-five"] == pytest.approx(100.0) and res["AP-seven"] == pytest.approx(100.0)


def test_perturbed_masks_give_lower_ap(coco_dataset):
    # Shrinking every box by 8 rows: IoU 12/20 = 0.6 (20x20, "five"), 32/40 = 0.8 (the two
    # 40-row "seven" boxes), 4/12 = 0.33 (12x20, "five"). AP50 misses one "five" object
    # (AP50 = mean(0.5, 1) = 75), AP75 both "five" objects (AP75 = mean(0, 1) = 50).
    res = _run(coco_dataset, shrink=8)
    assert res["AP"] < 60.0
    assert res["AP50"] == pytest.approx(75.0, abs=0.5)  # 101-point interpolation: 75.2
    assert res["AP75"] == pytest.approx(50.0)
    # A confident false positive lowers AP at every threshold relative to the perfect run.
    res_fp = _run(coco_dataset, extra_fp=True)
    assert 0.0 < res_fp["AP"] < 100.0 and res_fp["AP50"] < 100.0


def test_unprocessed_images_are_not_scored_and_empty_outputs_count_as_misses(coco_dataset):
    ev = COCOEvaluator(coco_dataset)
    ev.process([{"image_id": 1}], [_outputs(1)])
    assert ev.evaluate()["segm"]["AP"] == pytest.approx(100.0)  # image 2 never processed
    ev.reset()
    ev.process([{"image_id": 1}], [_outputs(1)])
    ev.process([{"image_id": 2}], [{}])  # processed, nothing predicted: its GT are misses
    res = ev.evaluate()["segm"]
    assert 0.0 < res["AP"] < 100.0


def test_rle_encoding_and_bad_classes():
    out = _outputs(1)["instances"]
    res = instances_to_coco_json(out, 1, {0: 5, 1: 7})
    assert [r["category_id"] for r in res] == [5, 7]
    decoded = mask_util.decode(res[0]["segmentation"])
    assert decoded.sum() == 400 and decoded[5:25, 5:25].all()
    assert res[0]["bbox"] == [5.0, 5.0, 20.0, 20.0]
    with pytest.raises(KeyError, match="predicted class 1 not in"):
        instances_to_coco_json(out, 1, {0: 5})
