"""Synthetic panoptic dataset: determinism, both layouts, catalog, and official Cityscapes scoring."""
from __future__ import annotations

import hashlib
import importlib.util
import json
import multiprocessing
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from eco_m2f.data import DatasetCatalog, MetadataCatalog
from eco_m2f.data.datasets import synthetic
from eco_m2f.data.cityscapes_scripts import call_cityscapesscripts, import_cityscapes_evaluation
from eco_m2f.data.datasets.coco_panoptic import panoptic_to_semantic
from eco_m2f.data.io import read_png_ids

REPO = Path(__file__).resolve().parents[1]
TINY = {"num_train": 6, "num_val": 4, "image_size": 64, "seed": 0}


def _load_script(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "datasets" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _hashes(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def datasets_dir(tmp_path_factory) -> Path:
    """$DETECTRON2_DATASETS holding a tiny synthetic dataset (6 train / 4 val, 64x64)."""
    d = tmp_path_factory.mktemp("datasets")
    synthetic.generate_synthetic_dataset(d / "synthetic", **TINY)
    return d


@pytest.fixture()
def env(datasets_dir, monkeypatch) -> Path:
    monkeypatch.setenv("DETECTRON2_DATASETS", str(datasets_dir))
    return datasets_dir / "synthetic"


# ------------------------------------------------------------------------------ determinism
def test_same_seed_gives_byte_identical_files(datasets_dir, tmp_path):
    synthetic.generate_synthetic_dataset(tmp_path / "again", **TINY)
    a, b = _hashes(datasets_dir / "synthetic"), _hashes(tmp_path / "again")
    assert len(a) > 6 * 8  # every layout and label kind is there
    assert a == b


def test_worker_processes_write_the_same_files(datasets_dir, tmp_path):
    synthetic.generate_synthetic_dataset(tmp_path / "parallel", **TINY, workers=3)
    assert _hashes(tmp_path / "parallel") == _hashes(datasets_dir / "synthetic")
    with pytest.raises(ValueError, match="workers must be an integer >= 1"):
        synthetic.generate_synthetic_dataset(tmp_path / "bad", **TINY, workers=0)


def test_different_seed_differs(datasets_dir, tmp_path):
    synthetic.generate_synthetic_dataset(tmp_path / "other", **{**TINY, "seed": 1})
    a, b = _hashes(datasets_dir / "synthetic"), _hashes(tmp_path / "other")
    assert a.keys() == b.keys()
    images = [k for k in a if k.startswith("images/")]
    assert all(a[k] != b[k] for k in images)


def test_regenerating_in_place_replaces_the_folder(tmp_path):
    root = tmp_path / "syn"
    synthetic.generate_synthetic_dataset(root, 2, 1, 48, seed=3)
    synthetic.generate_synthetic_dataset(root, 1, 1, 48, seed=3)
    assert sorted(p.name for p in (root / "images" / "train").iterdir()) == ["000000.png"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp folders left


# ------------------------------------------------------------------------------ classes
def test_classes_are_cityscapes_classes_with_things_and_stuff():
    from cityscapesscripts.helpers.labels import name2label

    cats = synthetic.synthetic_categories()
    things = [c for c in cats if c["isthing"]]
    stuff = [c for c in cats if not c["isthing"]]
    assert len(things) >= 4 and len(stuff) >= 3
    for c in cats:
        assert name2label[c["name"]].id == c["id"]
        assert bool(name2label[c["name"]].hasInstances) == bool(c["isthing"])
    assert len({synthetic.THING_SHAPES[c["name"]] for c in things}) == len(things)  # distinct shapes


def test_complexity_ranges_from_one_object_to_dozens():
    counts = [synthetic.render_scene(np.random.default_rng([0, 0, i]), 64).num_objects for i in range(40)]
    assert min(counts) <= 2
    assert max(counts) >= 20
    assert len(set(counts)) >= 10


def test_stuff_regions_are_textured_not_flat(env):
    img = np.asarray(Image.open(env / "images" / "train" / "000000.png"))
    sem = np.asarray(Image.open(env / "panoptic_semseg_train" / "000000.png"))
    for c in np.unique(sem):
        if c == 255 or c >= 4:  # stuff classes are contiguous 0..3
            continue
        pix = img[sem == c].astype(np.float64)
        if len(pix) > 50:
            assert pix.std(axis=0).max() > 3.0


# ------------------------------------------------------------------------------ COCO layout
@pytest.mark.filterwarnings("ignore::DeprecationWarning:pycocotools")
def test_panoptic_json_pngs_and_instances_agree(env):
    from pycocotools import mask as mask_util
    from pycocotools.coco import COCO

    pan = json.loads((env / "panoptic_val.json").read_text())
    coco = COCO(str(env / "instances_val.json"))
    thing_ids = {c["id"] for c in pan["categories"] if c["isthing"]}
    assert set(coco.getCatIds()) == thing_ids
    for ann in pan["annotations"]:
        ids = read_png_ids(env / "panoptic_val" / ann["file_name"])
        segs = {s["id"]: s for s in ann["segments_info"]}
        assert set(np.unique(ids)) - {0} == set(segs)
        for sid, s in segs.items():
            m = ids == sid
            ys, xs = np.nonzero(m)
            assert s["area"] == m.sum()
            assert s["bbox"] == [xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1]
            assert s["iscrowd"] == 0
        # instance json: one RLE per thing segment, decoding to the same pixels
        inst = coco.loadAnns(coco.getAnnIds(imgIds=[ann["image_id"]]))
        assert len(inst) == sum(1 for s in segs.values() if s["category_id"] in thing_ids)
        for a in inst:
            m = mask_util.decode(a["segmentation"]).astype(bool)
            match = [sid for sid, s in segs.items() if np.array_equal(ids == sid, m)]
            assert len(match) == 1 and segs[match[0]]["category_id"] == a["category_id"]


def test_semantic_pngs_equal_conversion_from_panoptic(env, tmp_path):
    n = panoptic_to_semantic(
        str(env / "panoptic_train.json"), str(env / "panoptic_train"), str(tmp_path / "sem"),
        categories=synthetic.synthetic_categories(),
    )
    assert n == TINY["num_train"]
    for p in sorted((env / "panoptic_semseg_train").iterdir()):
        assert (tmp_path / "sem" / p.name).read_bytes() == p.read_bytes()


def test_catalog_dicts(env):
    meta = MetadataCatalog.get("synthetic_panoptic_train")
    assert meta.evaluator_type == "coco_panoptic_seg"
    assert meta.panoptic_json == str(env / "panoptic_train.json")
    assert meta.json_file == str(env / "instances_train.json")
    num_classes = len(meta.stuff_classes)
    assert num_classes == 8 and len(meta.thing_classes) == 4
    thing_contiguous = set(meta.thing_dataset_id_to_contiguous_id.values())
    dicts = DatasetCatalog.get("synthetic_panoptic_train")
    assert len(dicts) == TINY["num_train"]
    for d in dicts:
        assert {"file_name", "image_id", "height", "width", "pan_seg_file_name", "segments_info", "sem_seg_file_name"} <= set(d)
        assert os.path.isfile(d["file_name"])
        ids = read_png_ids(d["pan_seg_file_name"])
        sem = read_png_ids(d["sem_seg_file_name"])
        assert ids.shape == sem.shape == (d["height"], d["width"])
        assert set(np.unique(ids)) - {0} == {s["id"] for s in d["segments_info"]}
        assert np.all(sem[ids == 0] == 255)
        for s in d["segments_info"]:
            assert 0 <= s["category_id"] < num_classes
            assert s["isthing"] == (s["category_id"] in thing_contiguous)
            assert np.all(sem[ids == s["id"]] == s["category_id"])
    assert len(DatasetCatalog.get("synthetic_panoptic_val_with_sem_seg")) == TINY["num_val"]


# ------------------------------------------------------------------------------ Cityscapes layout
def test_cityscapes_catalog_uses_train_ids(env):
    from cityscapesscripts.helpers.labels import id2label

    dicts = DatasetCatalog.get("synthetic_cityscapes_fine_panoptic_val")
    meta = MetadataCatalog.get("synthetic_cityscapes_fine_panoptic_val")
    assert meta.evaluator_type == "cityscapes_panoptic_seg" and len(meta.stuff_classes) == 19
    assert meta.gt_dir == str(env / "cityscapes" / "gtFine" / "val")
    for d in dicts:
        ids = read_png_ids(d["pan_seg_file_name"])
        train = read_png_ids(d["sem_seg_file_name"])
        for s in d["segments_info"]:
            label_id = s["id"] // 1000 if s["id"] >= 1000 else s["id"]
            assert s["category_id"] == id2label[label_id].trainId
            assert np.all(train[ids == s["id"]] == s["category_id"])
    sem = DatasetCatalog.get("synthetic_cityscapes_fine_sem_seg_train")
    assert len(sem) == TINY["num_train"] and MetadataCatalog.get("synthetic_cityscapes_fine_sem_seg_train").evaluator_type == "cityscapes_sem_seg"
    inst = DatasetCatalog.get("synthetic_cityscapes_fine_instance_seg_val")
    assert MetadataCatalog.get("synthetic_cityscapes_fine_instance_seg_val").evaluator_type == "cityscapes_instance"
    n_things = sum(1 for d in dicts for s in d["segments_info"] if s["isthing"])
    assert sum(len(d["annotations"]) for d in inst) == n_things
    assert all(0 <= a["category_id"] < 8 and a["iscrowd"] == 0 for d in inst for a in d["annotations"])


def test_cityscapes_panoptic_gt_equals_createPanopticImgs_output(env, tmp_path):
    """The written panoptic GT is what cityscapesscripts' createPanopticImgs makes from instanceIds."""
    copy = tmp_path / "cityscapes"
    shutil.copytree(env / "cityscapes", copy)
    for split in ("train", "val"):
        (copy / "gtFine" / f"cityscapes_panoptic_{split}.json").unlink()
        shutil.rmtree(copy / "gtFine" / f"cityscapes_panoptic_{split}")
    script = _load_script("prepare_cityscapes")
    assert call_cityscapesscripts(script.main, ["--root", str(copy), "--skip-train-ids"]) == 0
    for split in ("train", "val"):
        ours = env / "cityscapes" / "gtFine" / f"cityscapes_panoptic_{split}.json"
        theirs = copy / "gtFine" / f"cityscapes_panoptic_{split}.json"
        assert ours.read_bytes() == theirs.read_bytes()  # byte-identical, not only equal content
        pngs = sorted((env / "cityscapes" / "gtFine" / f"cityscapes_panoptic_{split}").iterdir())
        assert len(pngs) == TINY[f"num_{split}"]
        for p in pngs:
            assert (copy / "gtFine" / f"cityscapes_panoptic_{split}" / p.name).read_bytes() == p.read_bytes()


def test_cityscapesscripts_panoptic_pq_is_100_for_gt(env, tmp_path):
    pan_eval = import_cityscapes_evaluation("evalPanopticSemanticLabeling")
    gt_json = env / "cityscapes" / "gtFine" / "cityscapes_panoptic_val.json"
    gt_dir = env / "cityscapes" / "gtFine" / "cityscapes_panoptic_val"
    pred_dir = tmp_path / "pred"
    shutil.copytree(gt_dir, pred_dir)
    pred_json = tmp_path / "pred.json"
    pred = json.loads(gt_json.read_text())
    pred_json.write_text(json.dumps({"annotations": pred["annotations"]}))
    results = call_cityscapesscripts(
        pan_eval.evaluatePanoptic, str(gt_json), str(gt_dir), str(pred_json), str(pred_dir), str(tmp_path / "pq.json")
    )
    assert results["All"]["pq"] == pytest.approx(1.0)
    assert results["Things"]["n"] >= 1 and results["Stuff"]["n"] >= 3
    assert results["Things"]["pq"] == pytest.approx(1.0) and results["Stuff"]["pq"] == pytest.approx(1.0)


def test_cityscapesscripts_semantic_miou_is_100_for_gt(env, tmp_path, monkeypatch):
    """evalPixelLevelSemanticLabeling, configured in-process, finds GT-as-prediction perfect."""
    px = import_cityscapes_evaluation("evalPixelLevelSemanticLabeling")
    results_dir = tmp_path / "results"
    gts = sorted((env / "cityscapes" / "gtFine" / "val").glob("*/*_gtFine_labelIds.png"))
    assert len(gts) == TINY["num_val"]
    for gt in gts:  # predictions are label-id PNGs named <city>_<seq>_<frame>*.png
        (results_dir / gt.parent.name).mkdir(parents=True, exist_ok=True)
        shutil.copy(gt, results_dir / gt.parent.name / gt.name.replace("_gtFine_labelIds", "_pred"))
    monkeypatch.setenv("CITYSCAPES_DATASET", str(env / "cityscapes"))
    monkeypatch.setenv("CITYSCAPES_RESULTS", str(results_dir))
    args = px.args
    for key, value in {"predictionPath": None, "predictionWalk": None, "quiet": True, "JSONOutput": True,
                       "evalInstLevelScore": True, "exportFile": str(tmp_path / "miou.json")}.items():
        monkeypatch.setattr(args, key, value, raising=False)
    preds = [call_cityscapesscripts(px.getPrediction, args, str(gt)) for gt in gts]
    assert all(Path(p).parent.parent == results_dir for p in preds)
    res = call_cityscapesscripts(px.evaluateImgLists, preds, [str(g) for g in gts], args)
    assert res["averageScoreClasses"] == pytest.approx(1.0)
    assert res["averageScoreInstClasses"] == pytest.approx(1.0)
    present = [k for k, v in res["classScores"].items() if not np.isnan(v)]
    assert {"road", "person"} <= set(present) or len(present) >= 4
    assert json.loads((tmp_path / "miou.json").read_text())["averageScoreClasses"] == pytest.approx(1.0)


# ------------------------------------------------------------------------------ on-demand generation
def test_missing_synthetic_dataset_is_generated_on_use(tmp_path, monkeypatch):
    monkeypatch.setenv("DETECTRON2_DATASETS", str(tmp_path))
    monkeypatch.setattr(synthetic, "DEFAULTS", {"num_train": 2, "num_val": 1, "image_size": 48, "seed": 0})
    assert not (tmp_path / "synthetic").exists()
    dicts = DatasetCatalog.get("synthetic_panoptic_val")
    assert len(dicts) == 1 and (tmp_path / "synthetic" / synthetic.INFO_FILE).is_file()
    # reading a metadata path of a missing dataset generates it too
    shutil.rmtree(tmp_path / "synthetic")
    path = MetadataCatalog.get("synthetic_cityscapes_fine_sem_seg_val").gt_dir
    assert os.path.isdir(path)


def _ensure_in_child(root: str) -> str:
    return synthetic.ensure_synthetic_dataset(root)


def test_concurrent_generation_is_safe(tmp_path, monkeypatch):
    monkeypatch.setattr(synthetic, "DEFAULTS", {"num_train": 3, "num_val": 1, "image_size": 48, "seed": 0})
    root = str(tmp_path / "synthetic")
    with multiprocessing.get_context("fork").Pool(2) as pool:
        out = pool.map(_ensure_in_child, [root, root])
    assert out == [root, root]
    assert len(list((tmp_path / "synthetic" / "images" / "train").iterdir())) == 3
    assert [p.name for p in tmp_path.iterdir()] == ["synthetic"] or all(
        p.name == "synthetic" or p.name.endswith(".lock") for p in tmp_path.iterdir()
    )


def test_incomplete_folder_is_reported_not_overwritten(tmp_path, monkeypatch):
    monkeypatch.setenv("DETECTRON2_DATASETS", str(tmp_path))
    (tmp_path / "synthetic").mkdir()
    (tmp_path / "synthetic" / "stray.txt").write_text("x")
    with pytest.raises(FileExistsError, match="prepare_synthetic.py"):
        DatasetCatalog.get("synthetic_panoptic_train")


def test_prepare_synthetic_cli(tmp_path, capsys):
    script = _load_script("prepare_synthetic")
    assert script.main(["--root", str(tmp_path / "s"), "--num-train", "2", "--num-val", "1", "--image-size", "40", "--seed", "5"]) == 0
    out = capsys.readouterr().out
    assert str(tmp_path / "s") in out and "train: 2 images" in out and "val: 1 images" in out
    info = json.loads((tmp_path / "s" / synthetic.INFO_FILE).read_text())
    assert info["seed"] == 5 and info["image_size"] == 40


# ------------------------------------------------------------------------------ complexity and presets
def test_every_image_has_a_complexity_record_that_matches_its_labels(env):
    info = json.loads((env / "synthetic_info.json").read_text())
    assert info["preset"] == "standard" and info["style"]["max_objects"] == synthetic.MAX_OBJECTS
    for split, n in (("train", TINY["num_train"]), ("val", TINY["num_val"])):
        data = json.loads((env / f"complexity_{split}.json").read_text())
        assert data["fields"] == list(synthetic.COMPLEXITY_FIELDS)
        assert [r["file_name"] for r in data["images"]] == [f"{i:06d}.png" for i in range(n)]
        pan = json.loads((env / f"panoptic_{split}.json").read_text())
        for rec, ann in zip(data["images"], pan["annotations"]):
            things = [s for s in ann["segments_info"] if s["id"] >= 1000]
            assert rec["objects"] == len(things) <= rec["drawn"]
            assert rec["small_objects"] == sum(s["area"] < 0.01 * 64 * 64 for s in things)
            assert 0.0 <= rec["occluded_fraction"] < 1.0 and 0.0 < rec["boundary_fraction"] < 1.0
        assert info["num_objects"][split] == [r["objects"] for r in data["images"]]


def test_the_boundary_share_and_occlusion_by_hand():
    pan = np.array([[1, 1, 2], [1, 1, 2], [3, 3, 3]], dtype=np.int32)
    # right neighbour differs at (0,1), (1,1); lower neighbour at (1,0), (1,1), (1,2): 4 pixels of 9
    record = synthetic._complexity(pan, visible=np.array([6, 2]), drawn=np.array([8, 2]), num_drawn=3)
    assert record["boundary_fraction"] == round(4 / 9, 6)
    assert record["occluded_fraction"] == round(1 - 8 / 10, 6)
    assert record["objects"] == 2 and record["drawn"] == 3
    assert record["small_objects"] == 0  # 1% of 9 pixels is 0.09: neither is small
    tiny = synthetic._complexity(np.zeros((20, 20), dtype=np.int32), visible=np.array([3, 50]), drawn=np.array([3, 50]), num_drawn=2)
    assert tiny["small_objects"] == 1 and tiny["occluded_fraction"] == 0.0 and tiny["boundary_fraction"] == 0.0


def test_the_hard_preset_draws_busier_scenes_and_unknown_presets_are_named(tmp_path):
    std = synthetic.generate_synthetic_dataset(tmp_path / "std", num_train=24, num_val=0, image_size=64)
    hard = synthetic.generate_synthetic_dataset(tmp_path / "hard", num_train=24, num_val=0, image_size=64, preset="hard")
    assert json.loads((tmp_path / "hard" / "synthetic_info.json").read_text())["preset"] == "hard"
    def mean(root, key):
        return np.mean([r[key] for r in json.loads((root / "complexity_train.json").read_text())["images"]])
    assert mean(tmp_path / "hard", "drawn") > mean(tmp_path / "std", "drawn")
    assert mean(tmp_path / "hard", "boundary_fraction") > mean(tmp_path / "std", "boundary_fraction")
    assert hard["splits"]["train"]["max_objects"] > std["splits"]["train"]["max_objects"]
    with pytest.raises(ValueError, match="unknown synthetic preset 'busy'"):
        synthetic.generate_synthetic_dataset(tmp_path / "x", num_train=1, num_val=0, image_size=64, preset="busy")
