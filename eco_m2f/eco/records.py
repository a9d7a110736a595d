"""The derived-record store written by step B and read by step C (papers/004 section 3.2).

Layout of a step-B output directory::

    meta.json                                  config file, weights, dataset, exits, feature dim, ...
    records/shard_{rank:03d}-of-{world:03d}.jsonl   one JSON object per line, one line per image

A record: {"image_id", "file_name", "exits": [2, ..., 6], "pq": [...], "sq": [...], "rq": [...],
"pq_th": [...], "pq_st": [...], "miou": [...], "feature": [C floats]} where every list is
aligned with "exits", quality values are per-image ratios in [0, 1] and "feature" (optional) is
the pooled gate input z(s1).

Why JSON lines with one write per record: a step-B run over COCO takes hours on several GPUs and
must survive being killed. Each record is one ``write`` on an ``O_APPEND`` descriptor followed by
``fsync``, so a shard only ever ends in a complete record or in one torn line (a crash mid-write),
which the writer cuts off when it reopens the shard. Resuming reads the ids done in *every* shard,
so a rerun with a different number of GPUs still skips finished images.
"""
from __future__ import annotations

import json
import logging
import math
import os
import re
from pathlib import Path
from typing import Any, Dict, Iterator, List, Mapping, Optional, Sequence, Set, Tuple

import numpy as np

from ..utils.file_io import atomic_write_text
from .exits import check_exits
from .targets import best_exits, exit_histogram, format_histogram

__all__ = [
    "META_FILE",
    "RECORDS_DIR",
    "QUALITY_KEYS",
    "shard_path",
    "shard_paths",
    "write_meta",
    "read_meta",
    "RecordWriter",
    "iter_records",
    "load_records",
    "quality_matrix",
    "feature_matrix",
    "summarize",
    "format_summary",
]

logger = logging.getLogger(__name__)

META_FILE = "meta.json"
RECORDS_DIR = "records"
# Per-exit quality lists a record may carry, in the order the summary prints them.
QUALITY_KEYS = ("pq", "sq", "rq", "pq_th", "pq_st", "miou")
_SHARD_RE = re.compile(r"^shard_(\d{3,})-of-(\d{3,})\.jsonl$")


# ---------------------------------------------------------------------------------------------- files
def shard_path(out_dir: str | os.PathLike, rank: int, world_size: int) -> Path:
    """records/shard_{rank:03d}-of-{world:03d}.jsonl under ``out_dir``."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
    return Path(out_dir) / RECORDS_DIR / f"shard_{rank:03d}-of-{world_size:03d}.jsonl"


def shard_paths(out_dir: str | os.PathLike) -> List[Path]:
    """Every shard file of ``out_dir`` (any world size), sorted by name."""
    rec_dir = Path(out_dir) / RECORDS_DIR
    if not rec_dir.is_dir():
        return []
    return sorted(p for p in rec_dir.iterdir() if p.is_file() and _SHARD_RE.match(p.name))


def write_meta(out_dir: str | os.PathLike, meta: Mapping[str, Any]) -> Path:
    """Write meta.json atomically (rank 0 of step B). Expected keys: config_file, weights, dataset,
    exits, feature_dim, pq_scale (a note such as "per-image PQ in [0, 1]")."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if "exits" in meta:
        check_exits(meta["exits"], name=f"{out / META_FILE}: exits")
    path = out / META_FILE
    atomic_write_text(path, json.dumps(dict(meta), indent=2, sort_keys=True) + "\n")
    return path


def read_meta(out_dir: str | os.PathLike) -> Dict[str, Any]:
    """meta.json of a step-B output directory."""
    path = Path(out_dir) / META_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: is {out_dir} a step-B (derived dataset) directory?")
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path} is not valid JSON: {exc}") from exc
    if not isinstance(meta, dict):
        raise ValueError(f"{path} must hold a JSON object, got {type(meta).__name__}")
    return meta


def _read_complete_lines(path: Path) -> Tuple[List[bytes], int]:
    """Complete (newline-terminated) lines of a shard and the byte length they span.

    Bytes after the last newline are a torn record from a crash and are not returned.
    """
    data = path.read_bytes()
    end = data.rfind(b"\n") + 1  # 0 when there is no newline at all
    lines = [ln for ln in data[:end].split(b"\n")[:-1]]
    return lines, end


def _parse_lines(path: Path, lines: Sequence[bytes]) -> Iterator[Dict[str, Any]]:
    for lineno, raw in enumerate(lines, 1):
        if not raw.strip():
            continue
        try:
            rec = json.loads(raw)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}: line {lineno} is not a valid JSON record ({exc})") from exc
        if not isinstance(rec, dict) or "image_id" not in rec:
            raise ValueError(f"{path}: line {lineno} is not a record with an 'image_id'")
        yield rec


# --------------------------------------------------------------------------------------------- writer
class RecordWriter:
    """Appends records to this rank's shard; knows which images are already done in any shard."""

    def __init__(self, out_dir: str | os.PathLike, rank: int = 0, world_size: int = 1) -> None:
        self.out_dir = Path(out_dir)
        self.path = shard_path(out_dir, rank, world_size)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._repair()
        self._fd: Optional[int] = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        self._done: Set[Any] = self._scan_done()

    def _repair(self) -> None:
        """Cut a torn last line (crash mid-write) off this rank's shard."""
        if not self.path.exists():
            return
        size = self.path.stat().st_size
        _, end = _read_complete_lines(self.path)
        if end < size:
            logger.warning("%s: dropping a torn last record (%d bytes) left by an interrupted run",
                           self.path, size - end)
            with open(self.path, "r+b") as f:
                f.truncate(end)
                f.flush()
                os.fsync(f.fileno())

    def _scan_done(self) -> Set[Any]:
        done: Set[Any] = set()
        for path in shard_paths(self.out_dir):
            lines, _ = _read_complete_lines(path)
            done.update(rec["image_id"] for rec in _parse_lines(path, lines))
        return done

    def done_ids(self) -> Set[Any]:
        """Image ids recorded in any shard of the directory (read at open, plus this writer's)."""
        return set(self._done)

    def append(self, record: Mapping[str, Any]) -> None:
        """Write one record durably: a single O_APPEND write of the full line, then fsync."""
        if self._fd is None:
            raise RuntimeError(f"{self.path} is closed")
        if "image_id" not in record:
            raise KeyError(f"record for {self.path} has no 'image_id': keys {sorted(record)}")
        line = (json.dumps(dict(record), separators=(",", ":")) + "\n").encode("utf-8")
        written = os.write(self._fd, line)
        if written != len(line):  # regular files write fully; make a short write loud, not torn
            raise OSError(f"short write to {self.path}: {written} of {len(line)} bytes")
        os.fsync(self._fd)
        self._done.add(record["image_id"])

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> "RecordWriter":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __del__(self) -> None:  # pragma: no cover - best effort
        try:
            self.close()
        except Exception:
            pass


# --------------------------------------------------------------------------------------------- reader
def _id_key(image_id: Any) -> Tuple[int, Any]:
    """Sort key putting numeric ids in numeric order and string ids after them."""
    if isinstance(image_id, (int, float)) and not isinstance(image_id, bool):
        return (0, image_id)
    return (1, str(image_id))


def iter_records(out_dir: str | os.PathLike) -> Iterator[Dict[str, Any]]:
    """Records of every shard in shard order; a torn last line (crash mid-write) is skipped."""
    for path in shard_paths(out_dir):
        lines, end = _read_complete_lines(path)
        if end < path.stat().st_size:
            logger.warning("%s: ignoring a torn last record left by an interrupted run", path)
        yield from _parse_lines(path, lines)


def _validate(rec: Dict[str, Any], where: str) -> None:
    exits = rec.get("exits")
    if not isinstance(exits, list) or not exits:
        raise ValueError(f"{where}: record {rec['image_id']!r} has no 'exits' list")
    for key in QUALITY_KEYS:
        vals = rec.get(key)
        if vals is None:
            continue
        if not isinstance(vals, list) or len(vals) != len(exits):
            raise ValueError(
                f"{where}: record {rec['image_id']!r} has '{key}' of length "
                f"{len(vals) if isinstance(vals, list) else type(vals).__name__}, expected {len(exits)} (one per exit)"
            )
        for v in vals:
            if v is None or (isinstance(v, float) and math.isnan(v)):
                continue
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not -1e-6 <= v <= 1 + 1e-6:
                raise ValueError(
                    f"{where}: record {rec['image_id']!r} has {key}={vals}; values must be in [0, 1] "
                    "(per-image ratios, not percent)"
                )
    if "pq" not in rec:
        raise ValueError(f"{where}: record {rec['image_id']!r} has no 'pq'")


def load_records(out_dir: str | os.PathLike) -> List[Dict[str, Any]]:
    """All records of a step-B directory, one per image_id (first seen wins), sorted by image_id."""
    if not (Path(out_dir) / RECORDS_DIR).is_dir():
        raise FileNotFoundError(f"{Path(out_dir) / RECORDS_DIR} not found: no step-B records in {out_dir}")
    by_id: Dict[Any, Dict[str, Any]] = {}
    for rec in iter_records(out_dir):
        if rec["image_id"] in by_id:
            continue
        _validate(rec, str(Path(out_dir) / RECORDS_DIR))
        by_id[rec["image_id"]] = rec
    return [by_id[i] for i in sorted(by_id, key=_id_key)]


def _column(records: Sequence[Mapping[str, Any]], key: str, exits: Sequence[int]) -> np.ndarray:
    """[N, |exits|] of ``key`` taken at the given exits (NaN where a value is missing)."""
    out = np.full((len(records), len(exits)), np.nan, dtype=np.float64)
    for i, rec in enumerate(records):
        vals = rec.get(key)
        if vals is None:
            continue
        pos = {int(k): j for j, k in enumerate(rec["exits"])}
        for col, k in enumerate(exits):
            if k not in pos:
                raise ValueError(
                    f"record {rec['image_id']!r} has exits {rec['exits']} without exit {k} "
                    f"(requested exits {list(exits)})"
                )
            v = vals[pos[k]]
            out[i, col] = np.nan if v is None else float(v)
    return out


def quality_matrix(records: Sequence[Mapping[str, Any]], exits: Sequence[int], key: str = "pq") -> np.ndarray:
    """q [N, |exits|]: the records' ``key`` (default PQ) at each requested exit; all must be finite."""
    exits = check_exits(exits)
    q = _column(records, key, exits)
    bad = np.nonzero(~np.all(np.isfinite(q), axis=1))[0]
    if bad.size:
        ids = [records[i]["image_id"] for i in bad[:10]]
        raise ValueError(f"records {ids} have a missing or non-finite '{key}' at one of the exits {exits}")
    return q


def feature_matrix(records: Sequence[Mapping[str, Any]]) -> Optional[np.ndarray]:
    """z(s1) [N, C] float32 if every record has a "feature", None if none has; error if mixed."""
    has = [rec.get("feature") is not None for rec in records]
    if not any(has):
        return None
    if not all(has):
        missing = [rec["image_id"] for rec, h in zip(records, has) if not h][:10]
        raise ValueError(f"some records have no 'feature' (e.g. image ids {missing}); rerun step B for them")
    feats = [np.asarray(rec["feature"], dtype=np.float32) for rec in records]
    dims = {f.shape for f in feats}
    if len(dims) != 1 or len(next(iter(dims))) != 1:
        raise ValueError(f"record features have inconsistent shapes {sorted(dims)}")
    return np.stack(feats)  # [N, C]


# -------------------------------------------------------------------------------------------- summary
def summarize(records: Sequence[Mapping[str, Any]]) -> Dict[str, Any]:
    """Per-exit mean of each quality and the histogram of best exits (argmax_k PQ, ties -> smaller k).

    Means ignore missing/NaN values; the result keeps the [0, 1] scale of the records.
    """
    if not records:
        raise ValueError("no records to summarize")
    exits = check_exits(records[0]["exits"], name=f"record {records[0]['image_id']!r}: exits")
    means: Dict[str, List[Optional[float]]] = {}
    for key in QUALITY_KEYS:
        if not any(rec.get(key) is not None for rec in records):
            continue
        col = _column(records, key, exits)
        means[key] = [
            float(np.nanmean(col[:, j])) if np.any(np.isfinite(col[:, j])) else None for j in range(len(exits))
        ]
    q = quality_matrix(records, exits, "pq")
    best = best_exits(q, exits)
    hist = exit_histogram(best, exits)
    return {
        "num_images": len(records),
        "exits": exits,
        "mean": means,
        "best_exit_histogram": hist,
        "mean_best_pq": float(q.max(axis=1).mean()),
    }


def format_summary(summary: Mapping[str, Any]) -> str:
    """A per-exit table (values in percent) and a text histogram of the best exits."""
    exits = summary["exits"]
    means = summary["mean"]
    keys = [k for k in QUALITY_KEYS if k in means]
    hist = summary["best_exit_histogram"]
    total = max(1, summary["num_images"])
    header = f"{'exit':>4} " + " ".join(f"{k.upper():>7}" for k in keys) + f" {'best':>7} {'best%':>6}"
    lines = [f"Derived dataset: {summary['num_images']} images; per-exit means (%)", header]
    for j, k in enumerate(exits):
        vals = " ".join(f"{'-':>7}" if means[key][j] is None else f"{100 * means[key][j]:7.2f}" for key in keys)
        lines.append(f"{k:>4} {vals} {hist[k]:>7} {100.0 * hist[k] / total:6.1f}")
    lines.append(f"oracle (best exit per image) PQ: {100 * summary['mean_best_pq']:.2f}")
    lines.append("Best exit per image (argmax_k PQ_k, ties -> smaller k):")
    lines.append(format_histogram(hist))
    return "\n".join(lines)
