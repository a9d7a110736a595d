"""Best exits against image complexity: buckets, means and histograms on constructed records."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

from eco_m2f.eco.complexity import best_exit_by_complexity, bucket_edges, format_complexity_table, load_complexity
from eco_m2f.eco.records import RecordWriter

REPO = Path(__file__).resolve().parents[1]
EXITS = [2, 4, 6]


def _rec(i: int, pq) -> dict:
    return {"image_id": i, "file_name": f"{i:06d}.png", "exits": EXITS, "pq": list(pq), "sq": list(pq), "rq": list(pq)}


# simple images are best at exit 2, busy ones need 6; the middle ones 4 (ties go to the smaller exit)
RECORDS = [
    _rec(0, [0.8, 0.8, 0.8]), _rec(1, [0.7, 0.6, 0.7]),  # 1 object each: best exit 2, 2
    _rec(2, [0.3, 0.5, 0.5]), _rec(3, [0.2, 0.6, 0.4]),  # 5 objects: 4, 4
    _rec(4, [0.1, 0.2, 0.4]), _rec(5, [0.0, 0.3, 0.5]),  # 30 objects: 6, 6
]
OBJECTS = [1, 1, 5, 5, 30, 30]


def _complexity(tmp_path: Path) -> Path:
    path = tmp_path / "complexity_train.json"
    images = [{"image_id": i, "file_name": f"{i:06d}.png", "objects": n, "boundary_fraction": 0.01 * n} for i, n in enumerate(OBJECTS)]
    path.write_text(json.dumps({"fields": ["objects", "boundary_fraction"], "images": images}))
    return path


def test_buckets_by_hand(tmp_path):
    result = best_exit_by_complexity(RECORDS, load_complexity(_complexity(tmp_path)), "objects", buckets=3)
    rows = result["buckets"]
    assert [r["range"] for r in rows] == [[1, 1], [5, 5], [30, 30]]
    assert [r["images"] for r in rows] == [2, 2, 2]
    assert [r["mean_best_exit"] for r in rows] == [2.0, 4.0, 6.0]
    assert rows[1]["best_exit_histogram"] == {2: 0, 4: 2, 6: 0}
    assert rows[2]["mean_quality"] == pytest.approx([0.05, 0.25, 0.45])
    assert result["spearman"] == pytest.approx(1.0)
    table = format_complexity_table(result)
    assert "30" in table.splitlines()[-2] and "6.00" in table and "+1.000" in table


def test_edges_merge_repeated_quantiles_and_the_last_bucket_keeps_its_top():
    # quantiles 1, 1, 1, 1.25, 2: the repeated edges merge into two buckets
    assert bucket_edges(np.array([1, 1, 1, 2]), 4).tolist() == [1.0, 1.25, 2.0]
    with pytest.raises(ValueError, match="buckets must be >= 1"):
        bucket_edges(np.array([1.0]), 0)
    result = best_exit_by_complexity(RECORDS, {r["file_name"]: {"objects": n} for r, n in zip(RECORDS, OBJECTS)}, buckets=1)
    assert len(result["buckets"]) == 1 and result["buckets"][0]["images"] == 6
    assert result["buckets"][0]["mean_best_exit"] == pytest.approx(4.0)
    constant = best_exit_by_complexity(RECORDS, {r["file_name"]: {"objects": 3} for r in RECORDS}, buckets=4)
    assert constant["spearman"] is None and len(constant["buckets"]) == 1


def test_missing_images_fields_and_files_are_named(tmp_path):
    with pytest.raises(KeyError, match="000005.png"):
        best_exit_by_complexity(RECORDS, {r["file_name"]: {"objects": 1} for r in RECORDS[:5]})
    with pytest.raises(KeyError, match="no field 'occlusion'"):
        best_exit_by_complexity(RECORDS, load_complexity(_complexity(tmp_path)), "occlusion")
    with pytest.raises(FileNotFoundError, match="nowhere.json"):
        load_complexity(tmp_path / "nowhere.json")
    dup = tmp_path / "dup.json"
    dup.write_text(json.dumps({"images": [{"file_name": "a.png"}, {"file_name": "a.png"}]}))
    with pytest.raises(ValueError, match="appears twice"):
        load_complexity(dup)


def test_the_script_reads_a_derived_directory(tmp_path, capsys):
    with RecordWriter(tmp_path / "derived", 0, 1) as w:
        for r in RECORDS:
            w.append(r)
    spec = importlib.util.spec_from_file_location("exit_complexity", REPO / "scripts" / "exit_complexity.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out = tmp_path / "table.json"
    assert mod.main(["--derived", str(tmp_path / "derived"), "--complexity", str(_complexity(tmp_path)), "--buckets", "3",
                     "--field", "objects", "--field", "boundary_fraction", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "best exit by objects" in printed and "best exit by boundary_fraction" in printed
    saved = json.loads(out.read_text())
    assert [r["mean_best_exit"] for r in saved[0]["buckets"]] == [2.0, 4.0, 6.0]
