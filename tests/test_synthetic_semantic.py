"""Synthetic semantic dataset: determinism, easy-token statistics, textures, resuming, catalog, CLI."""
from __future__ import annotations

import hashlib
import itertools
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from eco_m2f.data import DatasetCatalog, MetadataCatalog
from eco_m2f.data.build import build_detection_train_loader
from eco_m2f.data.datasets import synthetic_semantic as ss
from eco_m2f.data.io import read_image, read_png_ids
from test_catalog import _load_script
from test_sem_seg_mapper import sem_cfg

TINY = {"num_train": 8, "num_val": 3, "height": 96, "width": 160, "seed": 0}


def _hashes(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory) -> Path:
    """$DETECTRON2_DATASETS with synthetic_sem_seg generated at 96x160 (8 train / 3 val)."""
    d = tmp_path_factory.mktemp("datasets")
    ss.generate_synthetic_semantic_dataset(d / "synthetic_sem_seg", **TINY)
    return d


# ------------------------------------------------------------------------------------------ determinism
def test_same_arguments_give_identical_files_whatever_the_workers(tiny_root, tmp_path):
    ss.generate_synthetic_semantic_dataset(tmp_path / "again", **TINY, workers=2)
    a, b = _hashes(tiny_root / "synthetic_sem_seg"), _hashes(tmp_path / "again")
    assert len(a) == 2 * (8 + 3) + 1 and a == b
    ss.generate_synthetic_semantic_dataset(tmp_path / "other", **{**TINY, "seed": 1})
    assert _hashes(tmp_path / "other") != a
    assert not any(p.name.endswith(".partial") for p in tmp_path.iterdir())


def test_resumes_after_being_killed(tmp_path, monkeypatch):
    """A run killed after 5 images leaves them in the partial folder; the next run renders only the rest and
    the result equals an uninterrupted run."""
    rendered = []
    real_render = ss.render_image

    def counting_render(rng, h, w, n):
        if len(rendered) == 5 and not resumed:
            raise KeyboardInterrupt  # killed
        rendered.append(n)
        return real_render(rng, h, w, n)

    resumed = False
    monkeypatch.setattr(ss, "render_image", counting_render)
    with pytest.raises(KeyboardInterrupt):
        ss.generate_synthetic_semantic_dataset(tmp_path / "ds", **TINY)
    partial = tmp_path / ".ds.partial"
    assert len(list((partial / "annotations" / "train").iterdir())) == 5 and not (tmp_path / "ds").exists()
    (partial / "images" / "train" / "000005.png.tmp-123").write_bytes(b"half a file")  # killed mid-write
    resumed = True
    ss.generate_synthetic_semantic_dataset(tmp_path / "ds", **TINY)
    assert len(rendered) == 5 + (8 + 3 - 5)
    monkeypatch.setattr(ss, "render_image", real_render)
    ss.generate_synthetic_semantic_dataset(tmp_path / "fresh", **TINY)
    assert _hashes(tmp_path / "ds") == _hashes(tmp_path / "fresh")


def test_bad_arguments():
    with pytest.raises(ValueError, match="height"):
        ss.generate_synthetic_semantic_dataset("/nonexistent/x", 1, 1, height=8)
    with pytest.raises(ValueError, match="workers"):
        ss.generate_synthetic_semantic_dataset("/nonexistent/x", 1, 1, workers=0)


# ------------------------------------------------------------------------------------------ content
def test_easy_token_fraction_of_a_constructed_map():
    lab = np.zeros((40, 40), np.uint8)  # grid of 3 x 3 patches of 16, the last row/column half padding
    lab[:, 20:] = 1  # splits the middle column of patches
    lab[35, 5] = 2  # one odd pixel in a bottom (padded) patch
    assert ss.easy_token_fraction(lab, 16) == pytest.approx(5 / 9)
    assert ss.easy_token_fraction(np.zeros((17, 33), np.uint8), 16) == 1.0
    assert ss.easy_token_fraction(lab, 32) == 0.5  # the two right cells (one class) of the 2 x 2 grid


def test_easy_token_fraction_varies_widely_and_is_recorded(tiny_root):
    """Over a few images the fraction spans most of [0, 1], follows the complexity level, and equals the
    fraction recomputed from the label PNGs."""
    root = tiny_root / "synthetic_sem_seg"
    info = json.loads((root / ss.INFO_FILE).read_text())
    assert (info["height"], info["width"], info["classes"]) == (96, 160, list(ss.CLASSES))
    records = info["images"]["train"] + info["images"]["val"]
    for rec, split in zip(records, ["train"] * 8 + ["val"] * 3):
        lab = read_png_ids(root / "annotations" / split / rec["file_name"])
        assert lab.shape == (96, 160) and lab.max() < len(ss.CLASSES)
        for p in ss.PATCH_SIZES:
            assert rec["easy_token_fraction"][str(p)] == pytest.approx(ss.easy_token_fraction(lab, p), abs=1e-6)
    # 12 images at 256x256 (region counts scale with the area, so 512x512 gives the same spread)
    fractions, levels = [], []
    for i in range(12):
        params = ss.image_params(0, 0, i, 256, 256)
        _, lab = ss.render_image(np.random.default_rng([0, 0, i, 1]), 256, 256, params["num_regions"])
        fractions.append(ss.easy_token_fraction(lab, 16))
        levels.append(params["complexity_level"])
    assert min(fractions) < 0.15 and max(fractions) > 0.8
    by_level = {k: np.mean([f for f, l in zip(fractions, levels) if l == k]) for k in set(levels)}
    assert by_level[min(by_level)] > by_level[max(by_level)] + 0.5


def test_classes_are_textures_not_colours(tiny_root):
    """A class's regions take many colours (colour says nothing about the class), and every class but "flat"
    shows a pattern inside a region (pixels vary where the colour is fixed)."""
    rng = np.random.default_rng(3)
    image, lab = ss.render_image(rng, 256, 256, 40)
    region, _ = ss._region_map(np.random.default_rng(3), 256, 256, 40)  # same draws: the same cells
    means = {}
    for r in np.unique(region):
        sel = region == r
        cls = int(lab[sel][0])
        pix = image[sel].astype(np.float32)
        means.setdefault(cls, []).append(pix.mean(axis=0))
        if sel.sum() > 400:
            spread = pix.std(axis=0).max()
            assert (spread == 0) == (ss.CLASSES[cls] == "flat"), f"class {ss.CLASSES[cls]}: std {spread}"
    multi = [np.ptp(np.stack(m), axis=0).max() for m in means.values() if len(m) >= 3]
    assert multi and min(multi) > 40
    assert read_image(tiny_root / "synthetic_sem_seg" / "images" / "val" / "000000.png").shape == (96, 160, 3)


# ------------------------------------------------------------------------------------------ catalog
def test_catalog_loads_and_maps(tiny_root, monkeypatch):
    monkeypatch.setenv("DETECTRON2_DATASETS", str(tiny_root))
    dicts = DatasetCatalog.get("synthetic_sem_seg_train")
    assert len(dicts) == 8 and dicts[0]["image_id"] == "train_000000"
    assert all(0 <= d["easy_token_fraction"] <= 1 and 0 <= d["complexity_level"] < ss.NUM_LEVELS for d in dicts)
    assert MetadataCatalog.get("synthetic_sem_seg_val").sem_seg_root == str(tiny_root / "synthetic_sem_seg" /
                                                                            "annotations" / "val")
    cfg = sem_cfg("synthetic_sem_seg_train", **{"INPUT.MIN_SIZE_TRAIN": (96,), "INPUT.MAX_SIZE_TRAIN": 160,
                                                "INPUT.CROP.SIZE": [64, 64], "SOLVER.IMS_PER_BATCH": 4,
                                                "DATALOADER.NUM_WORKERS": 0})
    batches = list(itertools.islice(iter(build_detection_train_loader(cfg, rank=0, world_size=1)), 2))
    for d in itertools.chain(*batches):
        assert d["image"].shape == (3, 64, 64) and d["sem_seg"].dtype == torch.int64
        assert set(d["sem_seg"].unique().tolist()) <= set(range(16)) | {255}


def test_missing_variant_is_generated_on_first_use(tmp_path, monkeypatch):
    monkeypatch.setenv("DETECTRON2_DATASETS", str(tmp_path))
    monkeypatch.setitem(ss.VARIANTS, "synthetic_sem_seg_512x1024", (32, 64, 2, 1))
    assert not (tmp_path / "synthetic_sem_seg_512x1024").exists()
    (d,) = DatasetCatalog.get("synthetic_sem_seg_512x1024_val")
    assert (d["height"], d["width"]) == (32, 64) and read_png_ids(d["sem_seg_file_name"]).shape == (32, 64)
    (tmp_path / "synthetic_sem_seg").mkdir()
    (tmp_path / "synthetic_sem_seg" / "stray.txt").write_text("x")
    with pytest.raises(FileExistsError, match="prepare_synthetic_semantic.py"):
        DatasetCatalog.get("synthetic_sem_seg_train")


def test_prepare_cli(tmp_path, capsys):
    script = _load_script("prepare_synthetic_semantic")
    args = ["--root", str(tmp_path / "s"), "--num-train", "3", "--num-val", "1", "--height", "40", "--width", "56",
            "--seed", "2", "--workers", "1"]
    assert script.main(args) == 0
    out = capsys.readouterr().out
    assert "40x56" in out and "train: 3 images" in out and "val: 1 images" in out and "easy 16x16 tokens" in out
    assert len(list((tmp_path / "s" / "images" / "train").iterdir())) == 3
