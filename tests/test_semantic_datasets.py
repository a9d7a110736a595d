"""Semantic datasets: COCO-Stuff-10k and PASCAL-Context 59 (fake raw layouts -> prepare scripts -> catalog),
and ADE20K / Cityscapes semantic through the ``sem_seg`` mapper."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from scipy.io import savemat

from eco_m2f.data import DatasetCatalog, MetadataCatalog
from eco_m2f.data.datasets.coco_stuff import COCO_STUFF_171_CATEGORIES
from eco_m2f.data.datasets.common import DatasetNotFoundError
from eco_m2f.data.datasets.pascal_context import PASCAL_CONTEXT_59_NAMES
from eco_m2f.data.io import read_png_ids, write_png
from eco_m2f.data.mappers import build_mapper
from test_catalog import _load_script
from test_sem_seg_mapper import sem_cfg

def _jpeg(path: Path, h: int, w: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((h, w, 3), 90, np.uint8)).save(path)


def _map_one(name: str, d: dict) -> dict:
    """The sem_seg mapper without augmentation (identity resize, no crop/flip/colour)."""
    cfg = sem_cfg(name, **{"INPUT.MIN_SIZE_TRAIN": (0,), "INPUT.MIN_SIZE_TRAIN_SAMPLING": "choice",
                           "INPUT.CROP.ENABLED": False, "INPUT.RANDOM_FLIP": "none", "INPUT.COLOR_AUG_SSD": False})
    return build_mapper(cfg)(dict(d))


# ------------------------------------------------------------------------------------------- metadata
@pytest.mark.parametrize("name, num_classes", [
    ("coco_2017_train_stuff_10k_sem_seg", 171), ("coco_2017_test_stuff_10k_sem_seg", 171),
    ("pascal_context_59_sem_seg_train", 59), ("pascal_context_59_sem_seg_val", 59),
    ("ade20k_sem_seg_val", 150), ("synthetic_sem_seg_train", 16), ("synthetic_sem_seg_512x1024_val", 16),
])
def test_semantic_metadata(name, num_classes):
    meta = MetadataCatalog.get(name)
    assert meta.evaluator_type == "sem_seg" and meta.ignore_label == 255
    assert len(meta.stuff_classes) == num_classes and len(meta.stuff_colors) == num_classes
    assert len(set(meta.stuff_classes)) == num_classes


def test_class_names():
    coco = [c["name"] for c in COCO_STUFF_171_CATEGORIES]
    assert coco[0] == "person" and coco[79] == "toothbrush" and coco[80] == "banner" and coco[170] == "wood"
    assert [c["id"] for c in COCO_STUFF_171_CATEGORIES][79:82] == [90, 92, 93]
    assert PASCAL_CONTEXT_59_NAMES[:3] == ("aeroplane", "bag", "bed") and PASCAL_CONTEXT_59_NAMES[-1] == "wood"
    assert list(PASCAL_CONTEXT_59_NAMES) == sorted(PASCAL_CONTEXT_59_NAMES)  # mmseg's order


# ------------------------------------------------------------------------------------------- COCO-Stuff-10k
def test_coco_stuff_10k_prepare_and_load(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("DETECTRON2_DATASETS", str(tmp_path))
    root = tmp_path / "coco" / "coco_stuff_10k"
    (root / "imageLists").mkdir(parents=True)
    (root / "annotations").mkdir()
    for split, stem in (("train", "COCO_train2014_000000000077"), ("test", "COCO_train2014_000000000078")):
        (root / "imageLists" / f"{split}.txt").write_text(stem + "\n")
        _jpeg(root / "images" / f"{stem}.jpg", 6, 8)
        labels = np.full((6, 8), 1, np.uint16)  # person
        labels[0] = 0  # unlabeled
        labels[1, :4] = 92  # banner: first stuff class
        labels[2, :4] = 182  # wood: last class
        labels[3, :4] = 13  # stop sign: id 12 is unused, so 13 is the 12th thing
        savemat(root / "annotations" / f"{stem}.mat", {"S": labels})
    # before preparation: the Detectron2 folders are missing
    with pytest.raises(DatasetNotFoundError, match="images_detectron2"):
        DatasetCatalog.get("coco_2017_test_stuff_10k_sem_seg")
    assert _load_script("prepare_coco_stuff_10k_sem_seg").main(["--workers", "1"]) == 0
    assert "train: 1 images" in capsys.readouterr().out
    (d,) = DatasetCatalog.get("coco_2017_test_stuff_10k_sem_seg")
    assert d["file_name"].endswith("images_detectron2/test/COCO_train2014_000000000078.jpg")
    sem = read_png_ids(d["sem_seg_file_name"])
    assert sem[0, 0] == 255 and sem[4, 4] == 0 and sem[1, 0] == 80 and sem[2, 0] == 170 and sem[3, 0] == 11
    out = _map_one("coco_2017_test_stuff_10k_sem_seg", d)
    assert torch.equal(out["sem_seg"], torch.from_numpy(sem).long()) and out["image"].shape == (3, 6, 8)
    assert len(DatasetCatalog.get("coco_2017_train_stuff_10k_sem_seg")) == 1
    # an id that is no COCO-Stuff class fails naming the file
    bad = np.full((6, 8), 12, np.uint16)
    savemat(root / "annotations" / "COCO_train2014_000000000078.mat", {"S": bad})
    from eco_m2f.data.datasets.coco_stuff import prepare_coco_stuff_10k

    with pytest.raises(ValueError, match=r"000000000078\.mat: labels \[12\]"):
        prepare_coco_stuff_10k(str(root))


# ------------------------------------------------------------------------------------------- PASCAL-Context
def _voc_images(voc: Path, splits: dict[str, str]) -> None:
    for split, stem in splits.items():
        (voc / "ImageSets" / "Main").mkdir(parents=True, exist_ok=True)
        (voc / "ImageSets" / "Main" / f"{split}.txt").write_text(stem + "\n")
        _jpeg(voc / "JPEGImages" / f"{stem}.jpg", 5, 7)


def test_pascal_context_59_from_trainval_mat(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("DETECTRON2_DATASETS", str(tmp_path))
    voc = tmp_path / "VOCdevkit" / "VOC2010"
    splits = {"train": "2008_000002", "val": "2008_000003"}
    _voc_images(voc, splits)
    _jpeg(voc / "JPEGImages" / "2008_000009.jpg", 5, 7)  # in no split: not part of the datasets
    (voc / "trainval").mkdir()
    for stem in splits.values():
        labels = np.full((5, 7), 440, np.uint16)  # wall
        labels[0, 0] = 0  # unlabeled
        labels[1, 0] = 1  # accordion: one of the 400 classes outside the 59
        labels[2, 0] = 2  # aeroplane: first class
        labels[3, 0] = 458  # wood: last class
        savemat(voc / "trainval" / f"{stem}.mat", {"LabelMap": labels})
    assert _load_script("prepare_pascal_context_59").main(["--workers", "1"]) == 0
    assert "val: 1 label PNGs from trainval" in capsys.readouterr().out
    (d,) = DatasetCatalog.get("pascal_context_59_sem_seg_val")
    assert d["file_name"].endswith("JPEGImages/2008_000003.jpg")
    sem = read_png_ids(d["sem_seg_file_name"])
    wall = PASCAL_CONTEXT_59_NAMES.index("wall")
    assert sem[0, 0] == 255 and sem[1, 0] == 255 and sem[2, 0] == 0 and sem[3, 0] == 58 and sem[4, 4] == wall
    assert torch.equal(_map_one("pascal_context_59_sem_seg_val", d)["sem_seg"], torch.from_numpy(sem).long())
    assert [x["image_id"] for x in DatasetCatalog.get("pascal_context_59_sem_seg_train")] == ["2008_000002"]


def test_pascal_context_59_from_mmseg_pngs(tmp_path, monkeypatch):
    voc = tmp_path / "VOC2010"
    _voc_images(voc, {"train": "2008_000002", "val": "2008_000003"})
    (voc / "ImageSets" / "SegmentationContext").mkdir(parents=True)
    for split, stem in (("train", "2008_000002"), ("val", "2008_000003")):
        (voc / "ImageSets" / "SegmentationContext" / f"{split}.txt").write_text(stem + "\n")
        labels = np.full((5, 7), 1, np.uint8)  # aeroplane
        labels[0, 0], labels[1, 1] = 0, 59  # background, wood
        write_png(voc / "SegmentationClassContext" / f"{stem}.png", labels)
    assert _load_script("prepare_pascal_context_59").main(["--root", str(voc), "--workers", "1"]) == 0
    sem = read_png_ids(voc / "annotations_detectron2" / "pc59_train" / "2008_000002.png")
    assert sem[0, 0] == 255 and sem[1, 1] == 58 and sem[2, 2] == 0
    assert _load_script("prepare_pascal_context_59").main(["--root", str(tmp_path / "nowhere")]) == 1


# ------------------------------------------------------------------------------------------- existing sets
def test_ade20k_sem_seg_layout_through_the_mapper(tmp_path, monkeypatch):
    monkeypatch.setenv("DETECTRON2_DATASETS", str(tmp_path))
    ade = tmp_path / "ADEChallengeData2016"
    _jpeg(ade / "images" / "validation" / "ADE_val_00000001.jpg", 6, 8)
    labels = np.full((6, 8), 3, np.uint8)
    labels[0] = 0  # other: 255 after preparation
    labels[1] = 150  # flag: the last class (149)
    write_png(ade / "annotations" / "validation" / "ADE_val_00000001.png", labels)
    (ade / "annotations" / "training").mkdir()
    assert _load_script("prepare_ade20k_sem_seg").main([]) == 0
    (d,) = DatasetCatalog.get("ade20k_sem_seg_val")
    sem = _map_one("ade20k_sem_seg_val", d)["sem_seg"]
    assert sem[0, 0] == 255 and sem[1, 0] == 149 and sem[2, 0] == 2
    # a label PNG that was not converted (0..150 with 150 = flag) fails: 150 is no class of the 150
    write_png(Path(d["sem_seg_file_name"]), labels)
    with pytest.raises(ValueError, match=r"ADE_val_00000001\.png.*: 150 "):
        _map_one("ade20k_sem_seg_val", d)


def test_cityscapes_sem_seg_through_the_mapper(tiny_datasets):
    """Cityscapes' labelTrainIds (0..18, 255) in the synthetic Cityscapes layout, as the real one."""
    name = "synthetic_cityscapes_fine_sem_seg_train"
    for d in DatasetCatalog.get(name)[:3]:
        out = _map_one(name, d)
        assert torch.equal(out["sem_seg"], torch.from_numpy(read_png_ids(d["sem_seg_file_name"])).long())
        assert set(out) == {"file_name", "image_id", "height", "width", "image", "sem_seg"}
