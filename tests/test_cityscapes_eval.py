"""Cityscapes evaluators (cityscapesscripts) on a tiny Cityscapes-layout ground truth built here."""
from __future__ import annotations

import json
import uuid
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from eco_m2f.evaluation.pq import id2rgb

H, W = 64, 128
CITY = "testcity"


def _labels():
    from cityscapesscripts.helpers.labels import labels

    return [lab for lab in labels if 0 <= lab.trainId < 255 and not lab.ignoreInEval]


def _layouts() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """key -> (labelIds, instanceIds) with sky, road, cars, a person and an unlabeled corner."""
    out = {}
    lab = np.full((H, W), 23, np.uint8)  # sky
    lab[H // 2 :] = 7  # road
    inst = lab.astype(np.int32).copy()
    for k, (y0, y1, x0, x1) in enumerate([(35, 55, 10, 40), (35, 55, 50, 80)]):
        lab[y0:y1, x0:x1] = 26  # car
        inst[y0:y1, x0:x1] = 26000 + k
    lab[20:50, 90:104] = 24  # person
    inst[20:50, 90:104] = 24000
    lab[0:6, 0:10] = 0  # unlabeled (ignored in evaluation, VOID in panoptic)
    inst[0:6, 0:10] = 0
    out[f"{CITY}_000000_000019"] = (lab, inst)

    lab2 = np.full((H, W), 7, np.uint8)  # road
    lab2[:20] = 11  # building
    inst2 = lab2.astype(np.int32).copy()
    lab2[30:60, 60:110] = 26
    inst2[30:60, 60:110] = 26000
    out[f"{CITY}_000001_000019"] = (lab2, inst2)
    return out


@pytest.fixture(scope="module")
def cityscapes_root(tmp_path_factory) -> Path:
    """gtFine/val/<city>/*_gtFine_{labelIds,instanceIds}.png + cityscapes_panoptic_val(.json)."""
    from cityscapesscripts.helpers.labels import id2label

    root = tmp_path_factory.mktemp("cityscapes")
    gt_dir = root / "gtFine" / "val" / CITY
    gt_dir.mkdir(parents=True)
    pan_dir = root / "gtFine" / "cityscapes_panoptic_val"
    pan_dir.mkdir()
    annotations = []
    for key, (lab, inst) in _layouts().items():
        Image.fromarray(lab).save(gt_dir / f"{key}_gtFine_labelIds.png")
        Image.fromarray(inst.astype(np.uint16)).save(gt_dir / f"{key}_gtFine_instanceIds.png")
        # COCO-panoptic GT as cityscapesscripts' createPanopticImgs writes it:
        # stuff segment id = label id, thing segment id = instance id, ignored labels = VOID 0.
        pan = np.zeros((H, W), np.int64)
        segments = []
        for seg_id in np.unique(inst).tolist():
            label = id2label[seg_id // 1000 if seg_id >= 1000 else seg_id]
            if label.ignoreInEval:
                continue
            mask = inst == seg_id
            pan[mask] = seg_id
            ys, xs = np.nonzero(mask)
            segments.append({
                "id": seg_id, "category_id": label.id, "area": int(mask.sum()), "iscrowd": 0,
                "bbox": [int(xs.min()), int(ys.min()), int(xs.max() - xs.min() + 1), int(ys.max() - ys.min() + 1)],
            })
        Image.fromarray(id2rgb(pan)).save(pan_dir / f"{key}_gtFine_panoptic.png")
        annotations.append({"image_id": key, "file_name": f"{key}_gtFine_panoptic.png", "segments_info": segments})
    categories = [
        {"id": lab.id, "name": lab.name, "color": list(lab.color), "supercategory": lab.category,
         "isthing": int(lab.hasInstances)}
        for lab in _labels()
    ]
    images = [{"id": k, "file_name": f"{k}_leftImg8bit.png", "height": H, "width": W} for k in _layouts()]
    (root / "gtFine" / "cityscapes_panoptic_val.json").write_text(
        json.dumps({"images": images, "annotations": annotations, "categories": categories})
    )
    return root


def _register(root: Path, with_id_maps: bool) -> str:
    """Metadata as Detectron2 registers Cityscapes (panoptic: both id maps; sem_seg: names only)."""
    from eco_m2f.data.catalog import DatasetCatalog, MetadataCatalog

    name = f"_test_cityscapes_{uuid.uuid4().hex[:8]}"
    labels = sorted(_labels(), key=lambda lab: lab.trainId)
    dicts = [{"file_name": str(root / "leftImg8bit" / "val" / CITY / f"{k}_leftImg8bit.png"), "image_id": k}
             for k in _layouts()]
    DatasetCatalog.register(name, lambda: dicts)
    meta = dict(
        stuff_classes=[lab.name for lab in labels],
        gt_dir=str(root / "gtFine" / "val"),
        ignore_label=255,
        evaluator_type="cityscapes_panoptic_seg" if with_id_maps else "cityscapes_sem_seg",
    )
    if with_id_maps:
        meta.update(
            thing_classes=[lab.name for lab in labels],
            thing_dataset_id_to_contiguous_id={lab.id: lab.trainId for lab in labels if lab.hasInstances},
            stuff_dataset_id_to_contiguous_id={lab.id: lab.trainId for lab in labels if not lab.hasInstances},
            panoptic_root=str(root / "gtFine" / "cityscapes_panoptic_val"),
            panoptic_json=str(root / "gtFine" / "cityscapes_panoptic_val.json"),
            label_divisor=1000,
        )
    MetadataCatalog.get(name).set(**meta)
    return name


def _gt_as_prediction(key: str, corrupt: bool = False) -> dict:
    """Model outputs (contiguous = trainId) that reproduce the ground truth of ``key``."""
    from cityscapesscripts.helpers.labels import id2label

    lab, inst = _layouts()[key]
    train = np.vectorize(lambda i: id2label[int(i)].trainId)(lab)
    train[train == 255] = 0  # ignored pixels: any class
    if corrupt:
        train[H // 2 :, : W // 2] = 10  # half of the road called sky
    sem = torch.nn.functional.one_hot(torch.from_numpy(train).long(), 19).permute(2, 0, 1).float()
    masks, classes, segments = [], [], []
    id_map = np.zeros((H, W), np.int32)
    for n, seg_id in enumerate(np.unique(inst).tolist(), start=1):
        label = id2label[seg_id // 1000 if seg_id >= 1000 else seg_id]
        if label.ignoreInEval:
            continue
        m = inst == seg_id
        id_map[m] = n
        segments.append({"id": n, "category_id": label.trainId, "isthing": label.hasInstances})
        if label.hasInstances:
            masks.append(m)
            classes.append(label.trainId)
    instances = {"pred_masks": torch.from_numpy(np.stack(masks)), "scores": torch.full((len(masks),), 0.9),
                 "pred_classes": torch.tensor(classes)}
    return {"sem_seg": sem, "instances": instances, "panoptic_seg": (torch.from_numpy(id_map), segments)}


def _inputs(root: Path, key: str) -> dict:
    return {"file_name": str(root / "leftImg8bit" / "val" / CITY / f"{key}_leftImg8bit.png"), "image_id": key}


def test_gt_as_prediction_scores_100_on_all_three_tasks(cityscapes_root, tmp_path, monkeypatch):
    from eco_m2f.config import get_cfg
    from eco_m2f.evaluation import build_evaluators
    from eco_m2f.evaluation.cityscapes import (
        CityscapesInstanceEvaluator,
        CityscapesPanopticEvaluator,
        CityscapesSemSegEvaluator,
    )

    name = _register(cityscapes_root, with_id_maps=True)
    cfg = get_cfg()
    cfg.MODEL.MASK_FORMER.TEST.PANOPTIC_ON = True
    cfg.MODEL.MASK_FORMER.TEST.SEMANTIC_ON = True
    cfg.MODEL.MASK_FORMER.TEST.INSTANCE_ON = True
    cfg.OUTPUT_DIR = "out"  # relative on purpose: the Cityscapes scripts change directory
    monkeypatch.chdir(tmp_path)
    evaluators = build_evaluators(cfg, name, None, {"panoptic_seg", "sem_seg", "instances"})
    assert sorted(type(e).__name__ for e in evaluators) == sorted(
        [CityscapesPanopticEvaluator.__name__, CityscapesSemSegEvaluator.__name__, CityscapesInstanceEvaluator.__name__]
    )
    evaluators.reset()
    for key in _layouts():
        evaluators.process([_inputs(cityscapes_root, key)], [_gt_as_prediction(key)])
    res = evaluators.evaluate()
    for k in ("IoU", "iIoU", "IoU_sup", "iIoU_sup"):
        assert res["sem_seg"][k] == pytest.approx(100.0), k
        assert type(res["sem_seg"][k]) is float  # plain floats, JSON-serialisable as metrics
    assert res["segm"]["AP"] == pytest.approx(100.0) and res["segm"]["AP50"] == pytest.approx(100.0)
    for k in ("PQ", "SQ", "RQ", "PQ_th", "PQ_st"):
        assert res["panoptic_seg"][k] == pytest.approx(100.0), k
    assert (tmp_path / "out" / "inference" / "panoptic_predictions.json").is_file()


def test_imperfect_prediction_and_train_id_fallback(cityscapes_root):
    import cityscapesscripts.evaluation.evalPixelLevelSemanticLabeling as cs_eval

    from eco_m2f.evaluation.cityscapes import CityscapesPanopticEvaluator, CityscapesSemSegEvaluator
    from eco_m2f.evaluation.panoptic import COCOPanopticEvaluator

    key = next(iter(_layouts()))
    # Semantic metadata without id maps: contiguous id = trainId.
    ev = CityscapesSemSegEvaluator(_register(cityscapes_root, with_id_maps=False))
    ev.process([_inputs(cityscapes_root, key)], [_gt_as_prediction(key, corrupt=True)])
    res = ev.evaluate()["sem_seg"]
    assert 50.0 < res["IoU"] < 100.0
    assert cs_eval.np is np  # the numpy shim is removed after the run

    # Panoptic: half of the road predicted as sky. Road: IoU well below 1 (or unmatched),
    # sky gains false-positive area. Official script and our PQ agree.
    name = _register(cityscapes_root, with_id_maps=True)
    outs = _gt_as_prediction(key, corrupt=True)
    road = np.asarray(_layouts()[key][0]) == 7
    id_map = outs["panoptic_seg"][0].numpy().copy()
    segs = outs["panoptic_seg"][1]
    sky_id = next(s["id"] for s in segs if s["category_id"] == 10)
    id_map[road & (np.arange(W)[None, :] < W // 2)] = sky_id
    outs["panoptic_seg"] = (torch.from_numpy(id_map), segs)
    results = []
    for cls in (CityscapesPanopticEvaluator, COCOPanopticEvaluator):
        ev = cls(name)
        ev.process([_inputs(cityscapes_root, key)], [outs])
        results.append(ev.evaluate()["panoptic_seg"])
    assert results[0]["PQ_st"] < 100.0 and results[0]["PQ_th"] == pytest.approx(100.0)
    for k in results[0]:
        assert results[0][k] == pytest.approx(results[1][k], abs=1e-9), k


def test_missing_gt_dir_is_a_clear_error(tmp_path):
    from eco_m2f.data.catalog import DatasetCatalog, MetadataCatalog
    from eco_m2f.evaluation.cityscapes import CityscapesSemSegEvaluator, cityscapes_image_key

    name = f"_test_cityscapes_{uuid.uuid4().hex[:8]}"
    DatasetCatalog.register(name, lambda: [])
    MetadataCatalog.get(name).set(stuff_classes=["road"], gt_dir=str(tmp_path / "nowhere"))
    ev = CityscapesSemSegEvaluator(name)
    ev.process([{"file_name": "a/b/x_000000_000001_leftImg8bit.png"}], [{"sem_seg": torch.zeros(19, 2, 2)}])
    with pytest.raises(FileNotFoundError, match="nowhere"):
        ev.evaluate()
    assert cityscapes_image_key("/d/aachen_000000_000019_leftImg8bit.png") == "aachen_000000_000019"
    with pytest.raises(ValueError, match="not a Cityscapes file name"):
        cityscapes_image_key("img.png")
