"""Dataset catalog: builtin names, lazy registration, class facts, clear errors, readers, prepare scripts."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from eco_m2f.data import DatasetCatalog, Metadata, MetadataCatalog
from eco_m2f.data.datasets.ade20k import ADE20K_150_CATEGORIES
from eco_m2f.data.datasets.cityscapes import cityscapes_categories
from eco_m2f.data.datasets.coco_panoptic import COCO_PANOPTIC_CATEGORIES
from eco_m2f.data.datasets.common import DatasetNotFoundError
from eco_m2f.data.io import id2rgb, image_size, read_image, read_png_ids, rgb2id, write_png

REPO = Path(__file__).resolve().parents[1]


def _load_script(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "datasets" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


# ------------------------------------------------------------------------------ names and metadata
BUILTIN = [
    f"{base}_{split}" for split in ("train", "val")
    for base in ("cityscapes_fine_panoptic", "cityscapes_fine_sem_seg", "cityscapes_fine_instance_seg",
                 "ade20k_panoptic", "ade20k_sem_seg", "synthetic_panoptic", "synthetic_cityscapes_fine_panoptic",
                 "synthetic_cityscapes_fine_sem_seg", "synthetic_cityscapes_fine_instance_seg")
] + [f"coco_2017_{s}_panoptic{w}" for s in ("train", "val") for w in ("", "_with_sem_seg")]

EVALUATOR_TYPES = {
    "coco_2017_val_panoptic_with_sem_seg": "coco_panoptic_seg",
    "cityscapes_fine_panoptic_val": "cityscapes_panoptic_seg",
    "cityscapes_fine_sem_seg_val": "cityscapes_sem_seg",
    "cityscapes_fine_instance_seg_val": "cityscapes_instance",
    "ade20k_panoptic_val": "ade20k_panoptic_seg",
    "ade20k_sem_seg_val": "sem_seg",
    "synthetic_panoptic_val": "coco_panoptic_seg",
    "synthetic_cityscapes_fine_panoptic_val": "cityscapes_panoptic_seg",
}


def test_builtin_names_registered_with_evaluator_types():
    assert set(BUILTIN) <= set(DatasetCatalog.list())
    for name, etype in EVALUATOR_TYPES.items():
        assert MetadataCatalog.get(name).evaluator_type == etype


def test_paths_follow_the_environment_at_call_time(tmp_path, monkeypatch):
    meta = MetadataCatalog.get("coco_2017_val_panoptic_with_sem_seg")
    monkeypatch.setenv("DETECTRON2_DATASETS", str(tmp_path / "a"))
    assert meta.panoptic_json == str(tmp_path / "a" / "coco" / "annotations" / "panoptic_val2017.json")
    monkeypatch.setenv("DETECTRON2_DATASETS", str(tmp_path / "b"))
    assert meta.sem_seg_root == str(tmp_path / "b" / "coco" / "panoptic_semseg_val2017")
    monkeypatch.delenv("DETECTRON2_DATASETS")
    assert meta.image_root == "datasets/coco/val2017"
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()  # nothing touched the disk


def test_metadata_semantics():
    m = Metadata(name="x", ignore_label=255)
    m.set(thing_classes=["a"])
    m.set(thing_classes=["a"])  # same value again is fine
    with pytest.raises(ValueError, match="thing_classes"):
        m.set(thing_classes=["b"])
    with pytest.raises(AttributeError, match="ignore_label"):
        _ = m.ignore_labl
    assert m.get("missing", 7) == 7 and "thing_classes" in m
    assert m.as_dict() == {"ignore_label": 255, "thing_classes": ["a"]}


def test_catalog_errors():
    with pytest.raises(KeyError, match="coco_2017_val_panoptic"):
        DatasetCatalog.get("coco_2017_val_panoptc")
    with pytest.raises(ValueError, match="already registered"):
        DatasetCatalog.register("synthetic_panoptic_val", lambda: [])
    DatasetCatalog.register("__test_tmp", lambda: ["x"])
    try:
        assert DatasetCatalog.get("__test_tmp") == ["x"]
    finally:
        DatasetCatalog.remove("__test_tmp")


# ------------------------------------------------------------------------------ class facts
def test_class_lists():
    assert len(COCO_PANOPTIC_CATEGORIES) == 133 and sum(c["isthing"] for c in COCO_PANOPTIC_CATEGORIES) == 80
    assert len({c["id"] for c in COCO_PANOPTIC_CATEGORIES}) == 133
    cs = cityscapes_categories()
    assert len(cs) == 19 and sum(c["isthing"] for c in cs) == 8
    assert [c["trainId"] for c in cs] == list(range(19)) and cs[0]["name"] == "road" and cs[11]["name"] == "person"
    assert len(ADE20K_150_CATEGORIES) == 150 and sum(c["isthing"] for c in ADE20K_150_CATEGORIES) == 100
    coco = MetadataCatalog.get("coco_2017_val_panoptic_with_sem_seg")
    assert len(coco.stuff_classes) == 133 and len(coco.thing_classes) == 80
    assert coco.thing_dataset_id_to_contiguous_id[1] == 0 and coco.stuff_dataset_id_to_contiguous_id[200] == 132
    city = MetadataCatalog.get("cityscapes_fine_panoptic_val")
    assert city.thing_dataset_id_to_contiguous_id == {24: 11, 25: 12, 26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18}
    assert city.stuff_dataset_id_to_contiguous_id[7] == 0 and city.label_divisor == 1000 and city.ignore_label == 255
    inst = MetadataCatalog.get("cityscapes_fine_instance_seg_val")
    assert inst.thing_classes == ["person", "rider", "car", "truck", "bus", "train", "motorcycle", "bicycle"]


# ------------------------------------------------------------------------------ missing data
@pytest.mark.parametrize(
    "name, path_part, command",
    [
        ("coco_2017_val_panoptic", "panoptic_val2017.json", "prepare_coco_semantic_from_panoptic.py"),
        ("cityscapes_fine_panoptic_val", "leftImg8bit", "prepare_cityscapes.py"),
        ("cityscapes_fine_sem_seg_train", "leftImg8bit", "prepare_cityscapes.py"),
        ("cityscapes_fine_instance_seg_val", "leftImg8bit", "prepare_cityscapes.py"),
        ("ade20k_sem_seg_val", "images/validation", "prepare_ade20k_sem_seg.py"),
        ("ade20k_panoptic_train", "ade20k_panoptic_train.json", "prepare_ade20k_panoptic.py"),
        ("coco_2017_train_stuff_10k_sem_seg", "coco/coco_stuff_10k/images_detectron2/train",
         "prepare_coco_stuff_10k_sem_seg.py"),
        ("pascal_context_59_sem_seg_val", "VOCdevkit/VOC2010/JPEGImages", "prepare_pascal_context_59.py"),
    ],
)
def test_missing_dataset_names_path_and_command(name, path_part, command, tmp_path, monkeypatch):
    monkeypatch.setenv("DETECTRON2_DATASETS", str(tmp_path))
    with pytest.raises(DatasetNotFoundError) as info:
        DatasetCatalog.get(name)
    msg = str(info.value)
    assert str(tmp_path) in msg and path_part in msg and command in msg and name in msg


def _make_tiny_coco(root: Path) -> None:
    """One 6x8 COCO panoptic image: a person (id 1) on a road (id 149), one void pixel."""
    (root / "val2017").mkdir(parents=True)
    Image.fromarray(np.zeros((6, 8, 3), np.uint8)).save(root / "val2017" / "000000000001.jpg")
    ids = np.full((6, 8), 5, np.int32)
    ids[1:4, 2:5] = 9
    ids[0, 0] = 0
    write_png(root / "panoptic_val2017" / "000000000001.png", id2rgb(ids))
    pan = {
        "images": [{"id": 1, "file_name": "000000000001.jpg", "height": 6, "width": 8}],
        "annotations": [{"image_id": 1, "file_name": "000000000001.png", "segments_info": [
            {"id": 5, "category_id": 149, "iscrowd": 0, "area": 38, "bbox": [0, 0, 8, 6]},
            {"id": 9, "category_id": 1, "iscrowd": 0, "area": 9, "bbox": [2, 1, 3, 3]}]}],
        "categories": [{"id": c["id"], "name": c["name"], "isthing": c["isthing"]} for c in COCO_PANOPTIC_CATEGORIES],
    }
    (root / "annotations").mkdir()
    (root / "annotations" / "panoptic_val2017.json").write_text(json.dumps(pan))


def test_coco_semantic_preparation_and_loading(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("DETECTRON2_DATASETS", str(tmp_path))
    _make_tiny_coco(tmp_path / "coco")
    with pytest.raises(DatasetNotFoundError, match="panoptic_semseg_val2017.*prepare_coco_semantic_from_panoptic"):
        DatasetCatalog.get("coco_2017_val_panoptic_with_sem_seg")
    assert len(DatasetCatalog.get("coco_2017_val_panoptic")) == 1  # the variant without semantic PNGs loads
    script = _load_script("prepare_coco_semantic_from_panoptic")
    assert script.main(["--splits", "val2017", "--workers", "1"]) == 0
    assert "wrote 1 semantic PNGs" in capsys.readouterr().out
    (d,) = DatasetCatalog.get("coco_2017_val_panoptic_with_sem_seg")
    road = [c["id"] for c in COCO_PANOPTIC_CATEGORIES].index(149)
    assert {s["id"]: (s["category_id"], s["isthing"]) for s in d["segments_info"]} == {5: (road, False), 9: (0, True)}
    sem = read_png_ids(d["sem_seg_file_name"])
    assert sem[0, 0] == 255 and sem[2, 3] == 0 and sem[5, 7] == road
    assert d["height"] == 6 and d["width"] == 8 and d["file_name"].endswith("val2017/000000000001.jpg")


def test_ade20k_preparation_and_loading(tmp_path, monkeypatch):
    """SceneParsing + instance annotations -> semantic PNGs, panoptic GT and instance JSON."""
    monkeypatch.setenv("DETECTRON2_DATASETS", str(tmp_path))
    ade = tmp_path / "ADEChallengeData2016"
    for split in ("training", "validation"):
        (ade / "images" / split).mkdir(parents=True)
        Image.fromarray(np.zeros((6, 8, 3), np.uint8)).save(ade / "images" / split / f"ADE_{split}_1.jpg")
        sem = np.ones((6, 8), np.uint8)  # wall (1 -> 0)
        sem[2:5, 2:6] = 13  # person (13 -> 12, a thing)
        sem[0, 0] = 0  # other -> ignore
        write_png(ade / "annotations" / split / f"ADE_{split}_1.png", sem)
        inst = np.zeros((6, 8, 3), np.uint8)
        inst[2:5, 2:4] = (4, 1, 0)  # instance-challenge category 4 = person, instance 1
        inst[2:5, 4:6] = (4, 2, 0)  # a second person
        write_png(ade / "annotations_instance" / split / f"ADE_{split}_1.png", inst)
    assert _load_script("prepare_ade20k_sem_seg").main([]) == 0
    assert _load_script("prepare_ade20k_panoptic").main([]) == 0
    sem = read_png_ids(ade / "annotations_detectron2" / "validation" / "ADE_validation_1.png")
    assert sem[0, 0] == 255 and sem[1, 1] == 0 and sem[3, 3] == 12
    (d,) = DatasetCatalog.get("ade20k_panoptic_val")
    by_cat = sorted((s["category_id"], s["isthing"], s["area"]) for s in d["segments_info"])
    assert by_cat == [(0, False, 47 - 12), (12, True, 6), (12, True, 6)]
    ids = read_png_ids(d["pan_seg_file_name"])
    assert ids[0, 0] == 0  # "other" is void
    inst = json.loads((ade / "ade20k_instance_val.json").read_text())
    assert [a["category_id"] for a in inst["annotations"]] == [12, 12]
    assert len(DatasetCatalog.get("ade20k_sem_seg_train")) == 1


# ------------------------------------------------------------------------------ readers
def test_png_readers_roundtrip(tmp_path):
    ids = np.array([[0, 1, 256], [65536 + 7, 33001, 24000]], np.int32)
    write_png(tmp_path / "pan.png", id2rgb(ids))
    assert np.array_equal(read_png_ids(tmp_path / "pan.png"), ids)
    assert np.array_equal(rgb2id(id2rgb(ids)), ids)
    inst = np.array([[0, 7], [26001, 33999]], np.uint16)  # Cityscapes instanceIds are 16-bit
    write_png(tmp_path / "inst.png", inst)
    assert np.array_equal(read_png_ids(tmp_path / "inst.png"), inst.astype(np.int32))
    rgb = np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3)
    write_png(tmp_path / "img.png", rgb)
    assert np.array_equal(read_image(tmp_path / "img.png", "RGB"), rgb)
    assert np.array_equal(read_image(tmp_path / "img.png", "BGR"), rgb[:, :, ::-1])
    assert image_size(tmp_path / "img.png") == (2, 3)


def test_corrupt_or_missing_files_name_the_file(tmp_path):
    garbage = tmp_path / "garbage.png"
    garbage.write_bytes(b"this is not a png at all")
    good = tmp_path / "good.png"
    write_png(good, np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8))
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(good.read_bytes()[:200])
    for reader in (read_png_ids, lambda p: read_image(p, "RGB")):
        for bad in (garbage, truncated):
            with pytest.raises(ValueError, match=str(bad)):
                reader(bad)
        with pytest.raises(FileNotFoundError, match="nothere.png"):
            reader(tmp_path / "nothere.png")
    with pytest.raises(ValueError, match="format"):
        read_image(good, "RGBX")


def test_corrupt_image_in_dataset_fails_naming_it(tmp_path, monkeypatch):
    from eco_m2f.data.datasets.synthetic import generate_synthetic_dataset

    monkeypatch.setenv("DETECTRON2_DATASETS", str(tmp_path))
    generate_synthetic_dataset(tmp_path / "synthetic", 2, 1, 40, seed=0)
    bad = next((tmp_path / "synthetic" / "cityscapes" / "leftImg8bit" / "train").rglob("*.png"))
    bad.write_bytes(b"\x00garbage")
    with pytest.raises(ValueError, match=bad.name):
        DatasetCatalog.get("synthetic_cityscapes_fine_sem_seg_train")
    (d,) = DatasetCatalog.get("synthetic_panoptic_val")
    Path(d["pan_seg_file_name"]).write_bytes(b"\x89PNG\r\n\x1a\nbroken")
    with pytest.raises(ValueError, match=Path(d["pan_seg_file_name"]).name):
        read_png_ids(d["pan_seg_file_name"])


def test_malformed_json_names_the_file(tmp_path, monkeypatch):
    monkeypatch.setenv("DETECTRON2_DATASETS", str(tmp_path))
    _make_tiny_coco(tmp_path / "coco")
    (tmp_path / "coco" / "annotations" / "panoptic_val2017.json").write_text("{not json")
    with pytest.raises(ValueError, match="panoptic_val2017.json"):
        DatasetCatalog.get("coco_2017_val_panoptic")
