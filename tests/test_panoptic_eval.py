"""PQ/SQ/RQ on hand-built id maps, files, the CLI, and the COCO-panoptic evaluator."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from eco_m2f.evaluation.pq import PanopticFormatError, PQStat, id2rgb, pq_single_image, read_panoptic_png, rgb2id
from eco_m2f.evaluation.pq_compute import pq_compute, pq_compute_per_image

REPO_ROOT = Path(__file__).resolve().parents[1]

# Categories 1, 2 are things, 3, 4 stuff.
CATS = {
    1: {"id": 1, "name": "a", "isthing": 1},
    2: {"id": 2, "name": "b", "isthing": 1},
    3: {"id": 3, "name": "s", "isthing": 0},
    4: {"id": 4, "name": "t", "isthing": 0},
}


def seg(i: int, c: int, ids: np.ndarray | None = None, crowd: int = 0) -> dict:
    """Segment dict; area counted from ``ids`` as the COCO JSON stores it."""
    d = {"id": i, "category_id": c, "iscrowd": crowd}
    if ids is not None:
        d["area"] = int((ids == i).sum())
    return d


def summary(stat: PQStat) -> dict:
    return stat.summary(CATS)


# ----------------------------------------------------------------------------- hand-computed cases


def test_perfect_prediction_is_pq_one():
    gt = np.zeros((10, 10), np.int64)
    gt[:, :5] = 1  # stuff s, 50 px
    gt[:5, 5:] = 2  # thing a, 25 px
    gt[5:, 5:] = 3  # thing a, 25 px
    pred = np.zeros_like(gt)
    pred[gt == 1], pred[gt == 2], pred[gt == 3] = 10, 20, 30  # same regions, other ids
    stat = pq_single_image(
        gt, [seg(1, 3, gt), seg(2, 1, gt), seg(3, 1, gt)], pred, [seg(10, 3), seg(20, 1), seg(30, 1)], CATS
    )
    assert (stat[1].tp, stat[1].fp, stat[1].fn) == (2, 0, 0) and stat[1].iou == pytest.approx(2.0)
    assert (stat[3].tp, stat[3].fp, stat[3].fn) == (1, 0, 0)
    s = summary(stat)
    # Categories 2 and 4 are absent from both sides: All averages over n = 2 categories.
    assert s["All"] == {"pq": 1.0, "sq": 1.0, "rq": 1.0, "n": 2}
    assert s["Things"]["n"] == 1 and s["Stuff"]["n"] == 1


def test_half_matched_thing_class():
    # GT: two things of category 1, A = rows 0-1 (20 px) and B = rows 5-6 (20 px), rest VOID.
    gt = np.zeros((10, 10), np.int64)
    gt[0:2, :] = 1
    gt[5:7, :] = 2
    # Prediction P covers rows 0-1, cols 0-7 (16 px) of A.
    pred = np.zeros_like(gt)
    pred[0:2, 0:8] = 7
    stat = pq_single_image(gt, [seg(1, 1, gt), seg(2, 1, gt)], pred, [seg(7, 1)], CATS)
    # IoU(P, A) = 16 / (16 + 20 - 16 - 0) = 0.8 > 0.5 -> TP; B unmatched -> FN.
    assert (stat[1].tp, stat[1].fp, stat[1].fn) == (1, 0, 1)
    assert stat[1].iou == pytest.approx(0.8)
    th = summary(stat)["Things"]
    # PQ = 0.8 / (1 + 0.5*0 + 0.5*1) = 0.5333; SQ = 0.8 / 1; RQ = 1 / 1.5 = 0.6667.
    assert th["pq"] == pytest.approx(0.8 / 1.5)
    assert th["sq"] == pytest.approx(0.8)
    assert th["rq"] == pytest.approx(1 / 1.5)
    assert th["n"] == 1
    # No stuff on either side: the per-image convention gives 1 with n = 0.
    assert summary(stat)["Stuff"] == {"pq": 1.0, "sq": 1.0, "rq": 1.0, "n": 0}


def test_iou_exactly_half_is_not_a_match():
    gt = np.zeros((10, 10), np.int64)
    gt[0:2, :] = 1  # A: 20 px
    gt[2:, :] = 5  # stuff s elsewhere, so the prediction never lies on VOID
    pred = np.zeros_like(gt)
    pred[0, :] = 7  # P: row 0, 10 px, all inside A
    pred[2:, :] = 8
    stat = pq_single_image(gt, [seg(1, 1, gt), seg(5, 3, gt)], pred, [seg(7, 1), seg(8, 3)], CATS)
    # IoU = 10 / (10 + 20 - 10) = 0.5, not > 0.5: A is a FN, P a FP (0 of its 10 px on VOID).
    assert (stat[1].tp, stat[1].fp, stat[1].fn) == (0, 1, 1)
    assert stat[1].iou == 0.0
    assert summary(stat)["Things"] == {"pq": 0.0, "sq": 0.0, "rq": 0.0, "n": 1}

    # One pixel more: IoU = 11 / (11 + 20 - 11) = 0.55 -> a match.
    pred[1, 0] = 7
    stat = pq_single_image(gt, [seg(1, 1, gt), seg(5, 3, gt)], pred, [seg(7, 1), seg(8, 3)], CATS)
    assert (stat[1].tp, stat[1].fp, stat[1].fn) == (1, 0, 0)
    assert stat[1].iou == pytest.approx(0.55)


def test_void_pixels_are_removed_from_the_union():
    gt = np.zeros((10, 10), np.int64)
    gt[0:4, :] = 1  # A: rows 0-3, 40 px; rows 4-9 VOID
    pred = np.zeros_like(gt)
    pred[0:6, :] = 7  # P: rows 0-5, 60 px; 20 px on VOID
    stat = pq_single_image(gt, [seg(1, 1, gt)], pred, [seg(7, 1)], CATS)
    # union = 60 + 40 - 40 - 20 (P on VOID) = 40 -> IoU = 40 / 40 = 1.
    assert stat[1].tp == 1 and stat[1].iou == pytest.approx(1.0)
    assert summary(stat)["All"]["pq"] == pytest.approx(1.0)


def test_unmatched_prediction_mostly_on_void_is_not_a_false_positive():
    gt = np.zeros((10, 10), np.int64)
    gt[:, 0:5] = 1  # S (stuff s): cols 0-4, 50 px; cols 5-9 VOID
    pred = np.zeros_like(gt)
    pred[:, 0:4] = 11  # S': stuff s, cols 0-3, 40 px
    pred[:, 4:6] = 12  # Q: thing b, cols 4-5: 10 px on S, 10 px on VOID (exactly half)
    pred[:, 6:9] = 13  # R: thing b, cols 6-8: 30 px, all on VOID
    stat = pq_single_image(gt, [seg(1, 3, gt)], pred, [seg(11, 3), seg(12, 2), seg(13, 2)], CATS)
    # S' vs S: IoU = 40 / (40 + 50 - 40 - 0) = 0.8 -> TP.
    assert (stat[3].tp, stat[3].fp, stat[3].fn) == (1, 0, 0) and stat[3].iou == pytest.approx(0.8)
    # Q: 10/20 = 0.5 on VOID is not > 0.5 -> FP.  R: 30/30 on VOID -> ignored.
    assert (stat[2].tp, stat[2].fp, stat[2].fn) == (0, 1, 0)
    s = summary(stat)
    # All: mean of s (PQ .8, SQ .8, RQ 1) and b (0, 0, 0) -> PQ .4, SQ .4, RQ .5, n = 2.
    assert s["All"]["pq"] == pytest.approx(0.4)
    assert s["All"]["sq"] == pytest.approx(0.4)
    assert s["All"]["rq"] == pytest.approx(0.5)
    assert s["All"]["n"] == 2
    assert s["Things"] == {"pq": 0.0, "sq": 0.0, "rq": 0.0, "n": 1}
    assert s["Stuff"]["pq"] == pytest.approx(0.8) and s["Stuff"]["n"] == 1


def test_crowd_regions_absorb_same_class_predictions_and_are_not_false_negatives():
    gt = np.zeros((10, 10), np.int64)
    gt[:, 0:5] = 1  # C: crowd of thing a, cols 0-4 (50 px)
    gt[:, 5:7] = 2  # A: thing a, cols 5-6 (20 px); cols 7-9 VOID
    pred = np.zeros_like(gt)
    pred[:, 0:4] = 21  # P: thing a on the crowd (40 px) -> unmatched, 40/40 on crowd -> ignored
    pred[:, 4:5] = 22  # R: thing b, 10 px on the crowd of a -> other class, not absorbed -> FP
    pred[:, 5:7] = 23  # Q: thing a == A -> IoU 1
    gt_segs = [seg(1, 1, gt, crowd=1), seg(2, 1, gt)]
    stat = pq_single_image(gt, gt_segs, pred, [seg(21, 1), seg(22, 2), seg(23, 1)], CATS)
    # Category a: one TP (IoU 1), the crowd is not a FN, P is not a FP.
    assert (stat[1].tp, stat[1].fp, stat[1].fn) == (1, 0, 0) and stat[1].iou == pytest.approx(1.0)
    # Category b: R is a FP.
    assert (stat[2].tp, stat[2].fp, stat[2].fn) == (0, 1, 0)
    th = summary(stat)["Things"]
    # Things = mean(a: PQ 1, b: PQ 0) = 0.5; SQ = mean(1, 0) = 0.5; RQ = mean(1, 0) = 0.5.
    assert th == {"pq": 0.5, "sq": 0.5, "rq": 0.5, "n": 2}

    # A prediction exactly on a crowd, overlapping it by IoU 1, is still never a TP.
    pred2 = np.zeros_like(gt)
    pred2[:, 0:5] = 5
    stat2 = pq_single_image(gt, gt_segs, pred2, [seg(5, 1)], CATS)
    # A (not crowd) is missed -> FN; the crowd-covering prediction is ignored.
    assert (stat2[1].tp, stat2[1].fp, stat2[1].fn) == (0, 0, 1)


def test_class_absent_from_both_sides_is_excluded_and_empty_image_convention():
    gt = np.full((4, 4), 1, np.int64)  # only stuff s
    pred = np.full((4, 4), 9, np.int64)
    stat = pq_single_image(gt, [seg(1, 3, gt)], pred, [seg(9, 3)], CATS)
    s = summary(stat)
    # Only category 3 occurs: n = 1 for All and Stuff (categories 1, 2, 4 excluded).
    assert s["All"] == {"pq": 1.0, "sq": 1.0, "rq": 1.0, "n": 1}
    # No things in GT and none predicted: PQ = 1 by convention, n = 0.
    assert s["Things"] == {"pq": 1.0, "sq": 1.0, "rq": 1.0, "n": 0}
    # A stat over nothing at all: every set is empty.
    empty = pq_single_image(np.zeros((3, 3)), [], np.zeros((3, 3)), [], CATS)
    assert empty.summary(CATS)["All"] == {"pq": 1.0, "sq": 1.0, "rq": 1.0, "n": 0}
    assert empty.pq_average(CATS, empty_value=0.0)["pq"] == 0.0
    # Adding an image with no segments leaves dataset statistics unchanged.
    total = PQStat()
    total += stat
    total += empty
    assert total.summary(CATS) == s


def test_gt_area_comes_from_segments_info_like_panopticapi():
    gt = np.zeros((10, 10), np.int64)
    gt[0:2, :] = 1  # 20 px in the map
    pred = np.zeros_like(gt)
    pred[0:2, 0:8] = 7  # 16 px
    # With the JSON area 20: IoU 0.8. With a (deliberately) different JSON area 30: 16/30.
    stat = pq_single_image(gt, [{"id": 1, "category_id": 1, "iscrowd": 0, "area": 30}], pred, [seg(7, 1)], CATS)
    assert stat[1].tp == 1 and stat[1].iou == pytest.approx(16 / 30)
    # Without "area", the pixel count of the map is used.
    stat = pq_single_image(gt, [{"id": 1, "category_id": 1, "iscrowd": 0}], pred, [seg(7, 1)], CATS)
    assert stat[1].iou == pytest.approx(0.8)


@pytest.mark.parametrize(
    "pred_segments, match",
    [
        ([{"id": 7, "category_id": 1}], "segment with ID 8 is presented in PNG and not presented in JSON"),
        (
            [{"id": 7, "category_id": 1}, {"id": 8, "category_id": 1}, {"id": 9, "category_id": 1}],
            r"segment IDs \[9\] are presented in JSON and not presented in PNG",
        ),
        ([{"id": 7, "category_id": 1}, {"id": 8, "category_id": 99}], "unknown category_id 99"),
    ],
)
def test_inconsistent_prediction_raises_key_error_naming_image_and_value(pred_segments, match):
    gt = np.ones((4, 4), np.int64)
    pred = np.zeros((4, 4), np.int64)
    pred[0] = 7
    pred[1] = 8
    with pytest.raises(KeyError, match=match) as info:
        pq_single_image(gt, [seg(1, 3, gt)], pred, pred_segments, CATS, image_id=42)
    assert "image with ID 42" in str(info.value)
    assert isinstance(info.value, PanopticFormatError)  # a KeyError, as panopticapi raises


def test_size_mismatch_raises_value_error():
    with pytest.raises(ValueError, match=r"image with ID x.*\(4, 5\).*\(4, 4\)"):
        pq_single_image(np.ones((4, 4)), [seg(1, 3)], np.zeros((4, 5)), [], CATS, image_id="x")


def test_rgb_id_round_trip():
    ids = np.array([[0, 1, 255], [256, 65536 + 7, 2**24 - 1]])
    assert np.array_equal(rgb2id(id2rgb(ids)), ids)
    with pytest.raises(ValueError):
        id2rgb(np.array([[2**24]]))


# ----------------------------------------------------------------------------- files and dataset PQ


def _random_image(rng: np.random.Generator, h: int = 24, w: int = 32):
    """GT and a perturbed prediction with things, stuff, VOID and crowd."""
    gt = np.zeros((h, w), np.int64)
    gt_segs = []
    next_id = 1
    # stuff bands
    for c, (r0, r1) in zip((3, 4), ((0, h // 2), (h // 2, h))):
        if rng.random() < 0.85:
            gt[r0:r1, :] = next_id
            gt_segs.append({"id": next_id, "category_id": c, "iscrowd": 0})
            next_id += 1
    for _ in range(rng.integers(0, 5)):
        y, x = rng.integers(0, h - 4), rng.integers(0, w - 4)
        hh, ww = rng.integers(3, 10), rng.integers(3, 12)
        gt[y : y + hh, x : x + ww] = next_id
        gt_segs.append({"id": next_id, "category_id": int(rng.integers(1, 3)), "iscrowd": int(rng.random() < 0.2)})
        next_id += 1
    gt[rng.random((h, w)) < 0.05] = 0  # VOID specks
    present = set(np.unique(gt).tolist())
    gt_segs = [s for s in gt_segs if s["id"] in present]
    for s in gt_segs:
        s["area"] = int((gt == s["id"]).sum())
    # prediction: shift the GT, relabel, add some noise segments
    pred_src = np.roll(gt, shift=(int(rng.integers(-2, 3)), int(rng.integers(-2, 3))), axis=(0, 1))
    pred = np.zeros_like(gt)
    pred_segs = []
    for s in gt_segs:
        m = pred_src == s["id"]
        if m.any() and rng.random() < 0.9:
            pid = 100 + s["id"]
            cat = s["category_id"] if rng.random() < 0.85 else int(rng.integers(1, 5))
            pred[m] = pid
            pred_segs.append({"id": pid, "category_id": cat})
    y, x = rng.integers(0, h - 3), rng.integers(0, w - 3)
    pred[y : y + 3, x : x + 3] = 500
    pred_segs.append({"id": 500, "category_id": int(rng.integers(1, 5))})
    present = set(np.unique(pred).tolist())
    pred_segs = [s for s in pred_segs if s["id"] in present]
    return gt, gt_segs, pred, pred_segs


def write_panoptic_files(tmp: Path, images: list) -> tuple[Path, Path, Path, Path]:
    """COCO-panoptic GT and prediction JSON + PNG folders for ``images`` = [(gt, gt_segs, pred, pred_segs)]."""
    gt_dir, pred_dir = tmp / "gt", tmp / "pred"
    gt_dir.mkdir(parents=True)
    pred_dir.mkdir(parents=True)
    gt_anns, pred_anns = [], []
    for i, (gt, gt_segs, pred, pred_segs) in enumerate(images):
        name = f"img_{i:03d}.png"
        Image.fromarray(id2rgb(gt)).save(gt_dir / name)
        Image.fromarray(id2rgb(pred)).save(pred_dir / name)
        gt_anns.append({"image_id": i, "file_name": name, "segments_info": gt_segs})
        pred_anns.append({"image_id": i, "file_name": name, "segments_info": pred_segs})
    gt_json, pred_json = tmp / "gt.json", tmp / "pred.json"
    gt_json.write_text(json.dumps({"annotations": gt_anns, "categories": list(CATS.values()), "images": []}))
    pred_json.write_text(json.dumps({"annotations": pred_anns}))
    return gt_json, gt_dir, pred_json, pred_dir


@pytest.fixture
def random_files(tmp_path):
    rng = np.random.default_rng(0)
    images = [_random_image(rng) for _ in range(12)]
    return images, write_panoptic_files(tmp_path, images)


def test_per_image_stats_sum_to_dataset_stats(random_files):
    images, (gt_json, gt_dir, pred_json, pred_dir) = random_files
    per_image, cats = pq_compute_per_image(gt_json, gt_dir, pred_json, pred_dir)
    assert list(per_image) == list(range(len(images)))
    total = PQStat()
    for stat in per_image.values():
        total += stat
    # Reference: one running dataset accumulation, category by category, image by image.
    ref = {c: [0, 0, 0, 0.0] for c in CATS}
    for gt, gt_segs, pred, pred_segs in images:
        s = pq_single_image(gt, gt_segs, pred, pred_segs, CATS)  # in memory == from PNG files
        for c, v in s.pq_per_cat.items():
            ref[c][0] += v.tp
            ref[c][1] += v.fp
            ref[c][2] += v.fn
            ref[c][3] += v.iou
    for c in CATS:
        t = total.pq_per_cat.get(c)
        got = (t.tp, t.fp, t.fn) if t else (0, 0, 0)
        assert got == tuple(ref[c][:3])
        assert (t.iou if t else 0.0) == pytest.approx(ref[c][3], abs=1e-12)
    # The case exercises TPs, FPs and FNs of things and stuff.
    assert sum(ref[c][0] for c in CATS) > 5 and sum(ref[c][1] for c in CATS) > 3 and sum(ref[c][2] for c in CATS) > 3
    results = pq_compute(gt_json, gt_dir, pred_json, pred_dir)
    assert results["All"] == pytest.approx(total.pq_average(cats))
    assert 0.0 < results["All"]["pq"] < 1.0
    # JSON round trip of the per-image statistics (step-B records).
    assert PQStat.from_dict(json.loads(json.dumps(total.to_dict()))).summary(CATS) == total.summary(CATS)


def test_pq_compute_equals_official_panopticapi_algorithm(random_files):
    """cityscapesscripts ships panopticapi's pq_compute_single_core/pq_average verbatim: compare."""
    import cityscapesscripts.evaluation.evalPanopticSemanticLabeling as cs_pan
    images, (gt_json, gt_dir, pred_json, pred_dir) = random_files
    gt = json.loads(gt_json.read_text())
    pred = {a["image_id"]: a for a in json.loads(pred_json.read_text())["annotations"]}
    pairs = [(a, pred[a["image_id"]]) for a in gt["annotations"]]
    import contextlib
    import io

    with contextlib.redirect_stdout(io.StringIO()):
        official = cs_pan.pq_compute_single_core(0, pairs, str(gt_dir), str(pred_dir), CATS)
    ours = pq_compute(gt_json, gt_dir, pred_json, pred_dir)
    for name, isthing in (("All", None), ("Things", True), ("Stuff", False)):
        ref, _ = official.pq_average(CATS, isthing=isthing)
        assert ours[name]["n"] == ref["n"]
        for k in ("pq", "sq", "rq"):
            assert ours[name][k] == pytest.approx(ref[k], abs=1e-12)


def test_pq_compute_on_files_equals_in_memory(tmp_path):
    gt = np.zeros((10, 10), np.int64)
    gt[0:2, :] = 1
    gt[5:7, :] = 2
    pred = np.zeros_like(gt)
    pred[0:2, 0:8] = 7
    images = [(gt, [seg(1, 1, gt), seg(2, 1, gt)], pred, [seg(7, 1)])]
    files = write_panoptic_files(tmp_path, images)
    results = pq_compute(*files)
    mem = pq_single_image(*images[0], CATS).summary(CATS)
    for name in ("All", "Things"):
        assert results[name] == pytest.approx(mem[name])
    # Hand-computed as in test_half_matched_thing_class: PQ = 0.8 / 1.5.
    assert results["All"]["pq"] == pytest.approx(0.8 / 1.5)
    # Dataset level with no stuff anywhere: the empty-set convention (n = 0).
    assert results["Stuff"]["n"] == 0
    assert np.array_equal(read_panoptic_png(files[1] / "img_000.png"), gt)


def test_missing_prediction_for_an_image_is_an_error(tmp_path):
    gt = np.ones((4, 4), np.int64)
    gt_json, gt_dir, pred_json, pred_dir = write_panoptic_files(tmp_path, [(gt, [seg(1, 3, gt)], gt, [seg(1, 3)])])
    data = json.loads(gt_json.read_text())
    data["annotations"].append({"image_id": 77, "file_name": "img_000.png", "segments_info": []})
    gt_json.write_text(json.dumps(data))
    with pytest.raises(KeyError, match="no prediction for the image with id: 77"):
        pq_compute(gt_json, gt_dir, pred_json, pred_dir)
    per_image, _ = pq_compute_per_image(gt_json, gt_dir, pred_json, pred_dir, allow_missing_predictions=True)
    assert list(per_image) == [0]


# ----------------------------------------------------------------------------- CLI


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "eco_m2f.evaluation.pq_compute", *args],
        capture_output=True,
        text=True,
        cwd=REPO_ROOT,
        timeout=120,
    )


def test_cli_prints_table_and_writes_json(random_files, tmp_path):
    _, (gt_json, gt_dir, pred_json, pred_dir) = random_files
    out = tmp_path / "res" / "results.json"
    proc = _cli("--gt-json", str(gt_json), "--gt-folder", str(gt_dir), "--pred-json", str(pred_json),
                "--pred-folder", str(pred_dir), "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    expected = pq_compute(gt_json, gt_dir, pred_json, pred_dir)
    lines = proc.stdout.splitlines()
    assert lines[0].split() == ["|", "PQ", "SQ", "RQ", "N"]
    row = {line.split("|")[0].strip(): line.split("|")[1].split() for line in lines[2:5]}
    for name in ("All", "Things", "Stuff"):
        assert row[name] == [f"{100 * expected[name][k]:.1f}" for k in ("pq", "sq", "rq")] + [str(expected[name]["n"])]
    saved = json.loads(out.read_text())
    assert saved["All"]["pq"] == pytest.approx(expected["All"]["pq"])
    assert set(saved["per_class"]) == {str(c) for c in CATS}


def test_cli_bad_inputs_give_clear_errors(tmp_path):
    gt = np.ones((4, 4), np.int64)
    pred = np.zeros((4, 4), np.int64)
    pred[:2] = 5
    gt_json, gt_dir, pred_json, pred_dir = write_panoptic_files(tmp_path, [(gt, [seg(1, 3, gt)], pred, [])])
    base = ["--gt-json", str(gt_json), "--gt-folder", str(gt_dir), "--pred-folder", str(pred_dir)]
    # segment 5 in the PNG but not in the JSON
    proc = _cli(*base, "--pred-json", str(pred_json))
    assert proc.returncode == 2
    assert "image with ID 0 segment with ID 5 is presented in PNG and not presented in JSON" in proc.stderr
    # missing file
    proc = _cli(*base, "--pred-json", str(tmp_path / "nope.json"))
    assert proc.returncode == 2 and "nope.json" in proc.stderr
    # size mismatch
    Image.fromarray(id2rgb(np.zeros((4, 6), np.int64))).save(pred_dir / "img_000.png")
    proc = _cli(*base, "--pred-json", str(pred_json))
    assert proc.returncode == 2 and "image with ID 0" in proc.stderr and "(4, 6)" in proc.stderr
    # corrupt PNG
    (pred_dir / "img_000.png").write_bytes(b"not a png")
    proc = _cli(*base, "--pred-json", str(pred_json))
    assert proc.returncode == 2 and "img_000.png" in proc.stderr


# ----------------------------------------------------------------------------- evaluator


def _register_panoptic_dataset(tmp_path: Path, base: str, images: list, evaluator_type: str = "coco_panoptic_seg"):
    """Register a tiny COCO-panoptic dataset whose dataset ids differ from contiguous ids; returns its name."""
    import uuid

    from eco_m2f.data.catalog import DatasetCatalog, MetadataCatalog

    name = f"{base}_{uuid.uuid4().hex[:8]}"
    # dataset ids 1, 2 (things), 3, 4 (stuff) -> contiguous 0..3
    gt_json, gt_dir, _, _ = write_panoptic_files(tmp_path, images)
    dicts = [
        {"file_name": f"/images/img_{i:03d}.jpg", "image_id": i, "height": 10, "width": 10} for i in range(len(images))
    ]
    DatasetCatalog.register(name, lambda: dicts)
    MetadataCatalog.get(name).set(
        thing_dataset_id_to_contiguous_id={1: 0, 2: 1},
        stuff_dataset_id_to_contiguous_id={1: 0, 2: 1, 3: 2, 4: 3},
        stuff_classes=["a", "b", "s", "t"],
        thing_classes=["a", "b"],
        panoptic_json=str(gt_json),
        panoptic_root=str(gt_dir),
        evaluator_type=evaluator_type,
        label_divisor=1000,
        ignore_label=255,
    )
    return name, gt_json, gt_dir


def test_coco_panoptic_evaluator_maps_ids_and_keeps_per_image_results(tmp_path):
    import torch

    from eco_m2f.evaluation import COCOPanopticEvaluator

    rng = np.random.default_rng(1)
    images = [_random_image(rng) for _ in range(4)]
    name, _, _ = _register_panoptic_dataset(tmp_path / "data", "_test_panoptic_eval", images)
    ev = COCOPanopticEvaluator(name, output_dir=tmp_path / "out")
    ev.reset()
    for i, (_, _, pred, pred_segs) in enumerate(images):
        # the model speaks contiguous ids with isthing, dataset id d -> contiguous d - 1
        segs = [{"id": s["id"], "category_id": s["category_id"] - 1, "isthing": s["category_id"] <= 2} for s in pred_segs]
        ev.process([{"image_id": i, "file_name": f"/images/img_{i:03d}.jpg"}],
                   [{"panoptic_seg": (torch.from_numpy(pred).int(), segs)}])
    res = ev.evaluate()["panoptic_seg"]
    expected = PQStat()
    for gt, gt_segs, pred, pred_segs in images:
        expected += pq_single_image(gt, gt_segs, pred, pred_segs, CATS)
    exp = expected.summary(CATS)
    assert res["PQ"] == pytest.approx(100 * exp["All"]["pq"])
    assert res["SQ_th"] == pytest.approx(100 * exp["Things"]["sq"])
    assert res["RQ_st"] == pytest.approx(100 * exp["Stuff"]["rq"])
    assert set(res) == {"PQ", "SQ", "RQ", "PQ_th", "SQ_th", "RQ_th", "PQ_st", "SQ_st", "RQ_st"}
    assert sorted(ev.per_image_results) == [0, 1, 2, 3]
    one = pq_single_image(*images[2], CATS).summary(CATS)
    assert ev.per_image_results[2]["PQ"] == pytest.approx(100 * one["All"]["pq"])
    assert ev.per_image_results[2]["file_name"] == "/images/img_002.jpg"
    assert (tmp_path / "out" / "panoptic_predictions.json").is_file()
    assert (tmp_path / "out" / "panoptic_predictions" / "img_002.png").is_file()


def test_coco_panoptic_evaluator_label_divisor_format_and_subset(tmp_path):
    import torch

    from eco_m2f.evaluation import COCOPanopticEvaluator
    from eco_m2f.evaluation.pq import panoptic_categories, pq_for_model_output
    from eco_m2f.data.catalog import MetadataCatalog

    gt = np.zeros((10, 10), np.int64)
    gt[:, :5] = 1  # stuff s (dataset 3)
    gt[:, 5:] = 2  # thing a (dataset 1)
    images = [(gt, [seg(1, 3, gt), seg(2, 1, gt)], gt, [])] * 2
    name, gt_json, gt_dir = _register_panoptic_dataset(tmp_path / "data", "_test_panoptic_eval2", images)
    # label-divisor encoding: contiguous class * 1000 + instance, -1 = VOID
    pan = np.full((10, 10), -1, np.int64)
    pan[:, :5] = 2 * 1000  # stuff s = contiguous 2
    pan[:, 5:9] = 0 * 1000 + 1  # thing a = contiguous 0, instance 1 (40 px of 50)
    ev = COCOPanopticEvaluator(name)  # temp dir, only image 0 processed
    ev.process([{"image_id": 0, "file_name": "img_000.jpg"}], [{"panoptic_seg": (torch.from_numpy(pan), None)}])
    res = ev.evaluate()["panoptic_seg"]
    # s: IoU 1; a: IoU 40/50 = 0.8 -> PQ = (1 + 0.8)/2 = 90, things 80, stuff 100.
    assert res["PQ"] == pytest.approx(90.0)
    assert res["PQ_th"] == pytest.approx(80.0)
    assert res["PQ_st"] == pytest.approx(100.0)
    assert list(ev.per_image_results) == [0]

    # Step-B helper: contiguous ids on both sides, no files written.
    meta = MetadataCatalog.get(name)
    cats = panoptic_categories(meta)
    assert cats[0]["isthing"] == 1 and cats[2]["isthing"] == 0
    id_map = np.zeros((10, 10), np.int64)
    id_map[:, :5], id_map[:, 5:9] = 1, 2
    dd = {"image_id": 0, "pan_seg_file_name": str(gt_dir / "img_000.png"),
          "segments_info": [{"id": 1, "category_id": 2, "iscrowd": 0, "area": 50},
                            {"id": 2, "category_id": 0, "iscrowd": 0, "area": 50}]}
    segs = [{"id": 1, "category_id": 2, "isthing": False}, {"id": 2, "category_id": 0, "isthing": True},
            {"id": 3, "category_id": 1, "isthing": True}]  # id 3 has no pixels: ignored
    stat = pq_for_model_output((torch.from_numpy(id_map), segs), dd, cats)
    assert stat.pq_average(cats)["pq"] == pytest.approx(0.9)


def test_build_evaluators_follows_evaluator_type_and_test_flags(tmp_path):
    from eco_m2f.config import get_cfg
    from eco_m2f.data.catalog import MetadataCatalog
    from eco_m2f.evaluation import build_evaluators

    name, _, _ = _register_panoptic_dataset(tmp_path / "data", "_test_build", [])
    instances = tmp_path / "instances.json"
    instances.write_text(json.dumps({"images": [], "annotations": [], "categories": [{"id": 1, "name": "a"}]}))
    MetadataCatalog.get(name).set(json_file=str(instances), sem_seg_root=str(tmp_path))

    def kinds(panoptic: bool, semantic: bool, instance: bool, dataset: str = name) -> list[str]:
        cfg = get_cfg()
        cfg.MODEL.MASK_FORMER.TEST.PANOPTIC_ON = panoptic
        cfg.MODEL.MASK_FORMER.TEST.SEMANTIC_ON = semantic
        cfg.MODEL.MASK_FORMER.TEST.INSTANCE_ON = instance
        tasks = [t for t, on in (("panoptic_seg", panoptic), ("sem_seg", semantic), ("instances", instance)) if on]
        return [type(e).__name__ for e in build_evaluators(cfg, dataset, tmp_path / "out", tasks)]

    assert kinds(True, True, True) == ["COCOPanopticEvaluator", "COCOEvaluator", "SemSegEvaluator"]
    assert kinds(True, False, False) == ["COCOPanopticEvaluator"]
    assert kinds(False, True, False) == ["SemSegEvaluator"]
    with pytest.raises(NotImplementedError, match="coco_panoptic_seg"):
        kinds(False, False, False)

    # ADE20K panoptic: semantic always (as Mask2Former), PQ when enabled.
    ade, _, _ = _register_panoptic_dataset(tmp_path / "ade", "_test_build_ade", [], "ade20k_panoptic_seg")
    assert kinds(True, False, False, ade) == ["SemSegEvaluator", "COCOPanopticEvaluator"]


def _distributed_worker(rank: int, world: int, init_file: str, gt_json: str, gt_dir: str, preds: list, out: str):
    """One gloo rank: checks the comm helpers, then evaluates its shard of the images."""
    import torch
    import torch.distributed as dist

    from eco_m2f.data.catalog import DatasetCatalog, MetadataCatalog
    from eco_m2f.evaluation import COCOPanopticEvaluator
    from eco_m2f.utils import comm

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        assert comm.get_world_size() == world and comm.get_rank() == rank
        assert comm.all_gather({"r": rank}) == [{"r": r} for r in range(world)]
        assert comm.gather(rank * 10) == ([r * 10 for r in range(world)] if rank == 0 else [])
        comm.synchronize()
        name = "_test_panoptic_distributed"
        DatasetCatalog.register(name, lambda: [])
        MetadataCatalog.get(name).set(
            thing_dataset_id_to_contiguous_id={1: 0, 2: 1},
            stuff_dataset_id_to_contiguous_id={1: 0, 2: 1, 3: 2, 4: 3},
            panoptic_json=gt_json,
            panoptic_root=gt_dir,
        )
        ev = COCOPanopticEvaluator(name)
        for i, (pred, segs) in enumerate(preds):
            if i % world == rank:
                ev.process([{"image_id": i, "file_name": f"img_{i:03d}.jpg"}],
                           [{"panoptic_seg": (torch.from_numpy(pred), segs)}])
        res = ev.evaluate()
        if rank == 0:
            Path(out).write_text(json.dumps({"res": res, "per_image": sorted(ev.per_image_results)}))
        else:
            assert res is None
    finally:
        dist.destroy_process_group()


def test_evaluator_gathers_across_processes(tmp_path):
    import torch.multiprocessing as mp

    import eco_m2f.data.catalog  # noqa: F401  (imported once here, inherited by the forked ranks)
    from eco_m2f.evaluation import COCOPanopticEvaluator  # noqa: F401
    from eco_m2f.utils import comm

    # Not distributed: the helpers are no-ops.
    assert comm.get_world_size() == 1 and comm.get_rank() == 0 and comm.is_main_process()
    assert comm.all_gather(5) == [5] and comm.gather(5) == [5]
    comm.synchronize()

    rng = np.random.default_rng(3)
    images = [_random_image(rng) for _ in range(5)]
    gt_json, gt_dir, _, _ = write_panoptic_files(tmp_path, images)
    preds = [
        (pred, [{"id": s["id"], "category_id": s["category_id"] - 1, "isthing": s["category_id"] <= 2} for s in segs])
        for _, _, pred, segs in images
    ]
    out = tmp_path / "result.json"
    # fork: the children reuse the imported modules (spawning would re-import torch in each)
    mp.start_processes(_distributed_worker, args=(2, str(tmp_path / "init"), str(gt_json), str(gt_dir), preds,
                                                  str(out)), nprocs=2, join=True, start_method="fork")
    got = json.loads(out.read_text())
    expected = PQStat()
    for gt, gt_segs, pred, pred_segs in images:
        expected += pq_single_image(gt, gt_segs, pred, pred_segs, CATS)
    exp = expected.summary(CATS)
    assert got["per_image"] == [0, 1, 2, 3, 4]  # both shards reached rank 0
    assert got["res"]["panoptic_seg"]["PQ"] == pytest.approx(100 * exp["All"]["pq"])
    assert got["res"]["panoptic_seg"]["PQ_st"] == pytest.approx(100 * exp["Stuff"]["pq"])
