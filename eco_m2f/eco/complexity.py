"""Which exit each image needs, against how complex the image is (papers/004 Fig. 2's claim).

ECO-M2F rests on the claim that simple images are parsed as well by a shallow encoder as by the
full one, and complex images are not. Step B records every training image's quality at every
exit; this module joins those records with a per-image complexity measure (e.g. the synthetic
dataset's ``complexity_{split}.json``: objects, occlusion, boundary share) and reports, per
complexity bucket, the mean best exit, the best-exit histogram and the mean quality at each
exit, with the rank correlation between complexity and best exit over all images.
"""
from __future__ import annotations

import json
import math
import os
from typing import Any, Dict, List, Mapping, Optional, Sequence

import numpy as np

from .exits import check_exits
from .records import quality_matrix
from .targets import best_exits, exit_histogram

__all__ = ["load_complexity", "bucket_edges", "best_exit_by_complexity", "format_complexity_table"]


def load_complexity(path: str | os.PathLike) -> Dict[str, Dict[str, float]]:
    """``{"fields": [...], "images": [{"file_name", ...}, ...]}`` -> per file name, its fields."""
    try:
        with open(path) as f:
            data = json.load(f)
    except FileNotFoundError:
        raise FileNotFoundError(f"complexity file {path} does not exist (the synthetic generator writes complexity_{{split}}.json)") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise ValueError(f"{path}: expected an object with an 'images' list")
    out: Dict[str, Dict[str, float]] = {}
    for i, rec in enumerate(data["images"]):
        name = rec.get("file_name") if isinstance(rec, dict) else None
        if not name:
            raise ValueError(f"{path}: images[{i}] has no file_name")
        if name in out:
            raise ValueError(f"{path}: file_name {name!r} appears twice")
        out[name] = {k: v for k, v in rec.items() if k not in ("file_name", "image_id")}
    return out


def bucket_edges(values: np.ndarray, buckets: int) -> np.ndarray:
    """Edges of up to ``buckets`` groups of about equal size (quantiles; repeated edges merged, so
    integer measures may give fewer). Bucket b holds edges[b] <= v < edges[b + 1], the last one
    including its upper edge."""
    if buckets < 1:
        raise ValueError(f"buckets must be >= 1, got {buckets}")
    values = np.asarray(values, dtype=np.float64)
    if values.size == 0:
        raise ValueError("no values to bucket")
    return np.unique(np.quantile(values, np.linspace(0.0, 1.0, buckets + 1)))


def best_exit_by_complexity(
    records: Sequence[Mapping[str, Any]],
    complexity: Mapping[str, Mapping[str, float]],
    field: str = "objects",
    buckets: int = 4,
    quality: str = "pq",
) -> Dict[str, Any]:
    """Per complexity bucket of ``field``: images, value range, mean best exit (argmax of
    ``quality``, ties to the smaller exit), best-exit histogram and mean quality at each exit."""
    if not records:
        raise ValueError("no derived records")
    exits = check_exits(records[0]["exits"], name="derived records: exits")
    values = []
    for rec in records:
        entry = complexity.get(rec["file_name"])
        if entry is None:
            raise KeyError(f"image {rec['file_name']!r} (id {rec.get('image_id')!r}) has no complexity record")
        if field not in entry:
            raise KeyError(f"complexity of {rec['file_name']!r} has no field {field!r}; it has {sorted(entry)}")
        values.append(float(entry[field]))
    v = np.asarray(values)
    q = quality_matrix(records, exits, quality)  # [N, E]
    best = best_exits(q, exits)  # exit values
    edges = bucket_edges(v, buckets)
    which = np.clip(np.searchsorted(edges, v, side="right") - 1, 0, max(0, len(edges) - 2))
    rows: List[Dict[str, Any]] = []
    for b in range(max(1, len(edges) - 1)):
        sel = which == b
        if not sel.any():
            continue
        rows.append({
            "range": [float(v[sel].min()), float(v[sel].max())],
            "images": int(sel.sum()),
            "mean_best_exit": float(best[sel].mean()),
            "best_exit_histogram": exit_histogram(best[sel], exits),
            "mean_quality": [float(np.nanmean(q[sel, j])) for j in range(len(exits))],
        })
    return {
        "field": field,
        "quality": quality,
        "exits": exits,
        "images": len(records),
        "spearman": _spearman(v, best),
        "buckets": rows,
    }


def _spearman(x: np.ndarray, y: np.ndarray) -> Optional[float]:
    """Rank correlation, None where either side is constant."""
    from scipy.stats import spearmanr

    if np.unique(x).size < 2 or np.unique(y).size < 2:
        return None
    rho = float(spearmanr(x, y).statistic)
    return None if math.isnan(rho) else rho


def format_complexity_table(result: Mapping[str, Any]) -> str:
    """One line per bucket: range, images, mean best exit, the histogram, quality per exit (%)."""
    exits = result["exits"]
    q = result["quality"].upper()
    head = (f"{result['field']:>14} {'images':>6} {'best exit':>9}  " + " ".join(f"{'n@' + str(k):>5}" for k in exits)
            + "  " + " ".join(f"{q + '@' + str(k):>7}" for k in exits))
    lines = [f"best exit by {result['field']} ({result['images']} images; {q} per exit in %)", head]
    for row in result["buckets"]:
        lo, hi = row["range"]
        span = f"{lo:g}" if lo == hi else f"{lo:g}-{hi:g}"
        hist = " ".join(f"{row['best_exit_histogram'][k]:>5}" for k in exits)
        quality = " ".join(f"{100 * x:7.2f}" for x in row["mean_quality"])
        lines.append(f"{span:>14} {row['images']:>6} {row['mean_best_exit']:>9.2f}  {hist}  {quality}")
    rho = result["spearman"]
    lines.append(f"Spearman rank correlation of {result['field']} and best exit: " + ("-" if rho is None else f"{rho:+.3f}"))
    return "\n".join(lines)
