"""The step-B record store: atomic appends, crash repair, resume across world sizes, summary."""
from __future__ import annotations

import json
import re

import pytest

from eco_m2f.eco.records import (
    RecordWriter,
    format_summary,
    load_records,
    quality_matrix,
    read_meta,
    shard_path,
    shard_paths,
    summarize,
    write_meta,
)

EXITS = [2, 3, 4]


def rec(image_id, pq, feature=None):
    r = {"image_id": image_id, "file_name": f"{image_id}.png", "exits": EXITS, "pq": list(pq),
         "sq": [min(1.0, p + 0.1) for p in pq], "rq": [0.5, 0.5, 0.5], "pq_th": list(pq), "pq_st": list(pq),
         "miou": [0.2, 0.3, 0.4]}
    if feature is not None:
        r["feature"] = list(feature)
    return r


def test_append_and_load_roundtrip(tmp_path):
    with RecordWriter(tmp_path, 0, 1) as w:
        assert w.done_ids() == set()
        w.append(rec(3, [0.1, 0.2, 0.3], feature=[1.0, 2.0]))
        w.append(rec(1, [0.4, 0.5, 0.6]))
        assert w.done_ids() == {1, 3}
    assert shard_path(tmp_path, 0, 1).name == "shard_000-of-001.jsonl"
    lines = shard_path(tmp_path, 0, 1).read_text().splitlines()
    assert len(lines) == 2 and json.loads(lines[0])["image_id"] == 3
    records = load_records(tmp_path)
    assert [r["image_id"] for r in records] == [1, 3]  # sorted by image id
    assert records[1]["feature"] == [1.0, 2.0]
    assert records[0]["pq"] == [0.4, 0.5, 0.6]


def test_resume_skips_done_ids(tmp_path):
    with RecordWriter(tmp_path, 0, 1) as w:
        w.append(rec(1, [0.1, 0.2, 0.3]))
        w.append(rec(2, [0.1, 0.2, 0.3]))
    with RecordWriter(tmp_path, 0, 1) as w:  # a rerun after a kill
        assert w.done_ids() == {1, 2}
        for image_id in [1, 2, 3]:
            if image_id not in w.done_ids():
                w.append(rec(image_id, [0.3, 0.2, 0.1]))
    assert [r["image_id"] for r in load_records(tmp_path)] == [1, 2, 3]
    assert len(shard_path(tmp_path, 0, 1).read_text().splitlines()) == 3


def test_torn_last_line_is_repaired(tmp_path):
    with RecordWriter(tmp_path, 0, 2) as w:
        w.append(rec("a", [0.1, 0.2, 0.3]))
    path = shard_path(tmp_path, 0, 2)
    good = path.read_bytes()
    with open(path, "ab") as f:  # a crash in the middle of the next record
        f.write(b'{"image_id": "b", "exits": [2, 3')
    # Readers skip the torn tail even before any writer repairs it.
    assert [r["image_id"] for r in load_records(tmp_path)] == ["a"]
    with RecordWriter(tmp_path, 0, 2) as w:
        assert path.read_bytes() == good  # cut back to the last complete line
        assert w.done_ids() == {"a"}
        w.append(rec("b", [0.3, 0.2, 0.1]))
    assert [r["image_id"] for r in load_records(tmp_path)] == ["a", "b"]
    assert all(json.loads(line) for line in path.read_text().splitlines())


def test_torn_only_line_is_dropped(tmp_path):
    path = shard_path(tmp_path, 0, 1)
    path.parent.mkdir(parents=True)
    path.write_bytes(b'{"image_id": 5, "exi')
    with RecordWriter(tmp_path, 0, 1) as w:
        assert w.done_ids() == set()
    assert path.read_bytes() == b""


def test_resume_with_another_world_size_skips_done_ids(tmp_path):
    ids = list(range(10))
    # First run: 2 ranks, killed after a few images each.
    for rank in range(2):
        with RecordWriter(tmp_path, rank, 2) as w:
            for image_id in ids[rank::2][:2]:
                w.append(rec(image_id, [0.1, 0.2, 0.3]))
    done_before = {0, 2, 1, 3}
    # Second run: 3 ranks; every rank sees what both old shards finished.
    written = []
    for rank in range(3):
        with RecordWriter(tmp_path, rank, 3) as w:
            assert done_before <= w.done_ids()
            for image_id in ids[rank::3]:
                if image_id not in w.done_ids():
                    w.append(rec(image_id, [0.2, 0.3, 0.4]))
                    written.append(image_id)
    assert sorted(written) == [4, 5, 6, 7, 8, 9]
    assert len(shard_paths(tmp_path)) == 5
    assert [r["image_id"] for r in load_records(tmp_path)] == ids


def test_duplicates_are_dropped_and_bad_records_named(tmp_path):
    with RecordWriter(tmp_path, 0, 2) as w:
        w.append(rec(1, [0.1, 0.2, 0.3]))
    with RecordWriter(tmp_path, 1, 2) as w:
        w.append(rec(1, [0.9, 0.9, 0.9]))
    records = load_records(tmp_path)
    assert len(records) == 1 and records[0]["pq"] == [0.1, 0.2, 0.3]  # first shard wins

    bad = tmp_path / "bad"
    with RecordWriter(bad, 0, 1) as w:
        w.append(rec(7, [10.0, 20.0, 30.0]))  # percent instead of [0, 1]
    with pytest.raises(ValueError, match=r"record 7 has pq=.*\[0, 1\]"):
        load_records(bad)
    short = tmp_path / "short"
    with RecordWriter(short, 0, 1) as w:
        w.append({**rec(8, [0.1, 0.2, 0.3]), "pq": [0.1, 0.2]})
    with pytest.raises(ValueError, match="record 8 has 'pq' of length 2, expected 3"):
        load_records(short)
    garbled = tmp_path / "garbled"
    p = shard_path(garbled, 0, 1)
    p.parent.mkdir(parents=True)
    p.write_text('{"image_id": 1, "exits": [2], "pq": [0.1]}\nnot json\n{"image_id": 2}\n')
    with pytest.raises(ValueError, match=r"shard_000-of-001.jsonl: line 2"):
        load_records(garbled)
    with pytest.raises(FileNotFoundError, match="no step-B records"):
        load_records(tmp_path / "missing")


def test_meta_roundtrip(tmp_path):
    meta = {"config_file": "c.yaml", "weights": "w.pth", "dataset": "synthetic_panoptic_train",
            "exits": [2, 3, 4, 5, 6], "feature_dim": 256, "pq_scale": "per-image PQ in [0, 1]"}
    write_meta(tmp_path, meta)
    assert read_meta(tmp_path) == meta
    with pytest.raises(ValueError, match="strictly increasing"):
        write_meta(tmp_path, {**meta, "exits": [3, 2]})
    with pytest.raises(FileNotFoundError, match="meta.json"):
        read_meta(tmp_path / "nope")


def test_summary_by_hand():
    records = [
        rec(1, [0.2, 0.4, 0.6]),  # best 4
        rec(2, [0.5, 0.5, 0.3]),  # tie 2/3 -> 2
        rec(3, [0.1, 0.7, 0.7]),  # tie 3/4 -> 3
        rec(4, [0.6, 0.2, 0.2]),  # best 2
    ]
    s = summarize(records)
    assert s["num_images"] == 4 and s["exits"] == EXITS
    assert s["best_exit_histogram"] == {2: 2, 3: 1, 4: 1}
    assert s["mean"]["pq"] == pytest.approx([(0.2 + 0.5 + 0.1 + 0.6) / 4, (0.4 + 0.5 + 0.7 + 0.2) / 4,
                                             (0.6 + 0.3 + 0.7 + 0.2) / 4])
    assert s["mean"]["miou"] == pytest.approx([0.2, 0.3, 0.4])
    assert s["mean_best_pq"] == pytest.approx((0.6 + 0.5 + 0.7 + 0.6) / 4)
    text = format_summary(s)
    assert "35.00" in text  # mean PQ at exit 2 in percent
    assert "Best exit" in text
    bars = [ln for ln in text.splitlines() if re.match(r"exit +\d \|", ln)]
    assert [ln.count("#") for ln in bars] == [40, 20, 20]
    assert "   2   35.00   45.00   50.00" in text and "oracle (best exit per image) PQ: 60.00" in text
    np_q = quality_matrix(records, [3, 4])
    assert np_q.tolist() == [[0.4, 0.6], [0.5, 0.3], [0.7, 0.7], [0.2, 0.2]]
    with pytest.raises(ValueError, match="without exit 5"):
        quality_matrix(records, [4, 5])
