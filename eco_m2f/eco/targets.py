"""Gate targets of ECO-M2F step C (papers/004 Eq. 4-5).

Every derived record holds the image's quality q_k at each exit k. The gate is trained to predict
t = argmax_k u(k), u(k) = q_k - beta * k, over the exits a user allows (k <= K_user). Ties go to the
smaller k: among equally good exits the cheaper one is the right answer, and ``np.argmax``'s
"first maximum" only gives that when the exits are in increasing order, so the order is checked
and the tie rule is written out rather than inherited.
"""
from __future__ import annotations

from typing import Dict, Iterable, List, Mapping, Sequence

import numpy as np

from .exits import allowed_exits, check_exits

__all__ = [
    "TIE_TOLERANCE",
    "utility",
    "targets",
    "target_exits",
    "best_exits",
    "exit_histogram",
    "format_histogram",
]

# Utilities closer than this to the row maximum count as ties. PQ is a ratio of small integer sums
# and beta * k is exact in decimal but not in binary, so q_a - beta*a and q_b - beta*b can differ
# by a rounding error when they are mathematically equal.
TIE_TOLERANCE = 1e-9


def utility(q: np.ndarray, exits: Sequence[int], beta: float) -> np.ndarray:
    """u(k) = q_k - beta * k for every column (exit) of ``q`` [N, |exits|] (or [|exits|])."""
    q = np.asarray(q, dtype=np.float64)
    ks = np.asarray(check_exits(exits), dtype=np.float64)
    if q.shape[-1] != ks.shape[0]:
        raise ValueError(f"q has {q.shape[-1]} columns but there are {ks.shape[0]} exits {list(exits)}")
    return q - float(beta) * ks


def _first_max(u: np.ndarray) -> np.ndarray:
    """Per row, the first column whose value is within TIE_TOLERANCE of the row maximum."""
    if u.ndim != 2:
        raise ValueError(f"expected a 2-D array [N, exits], got shape {u.shape}")
    if u.shape[0] and not np.all(np.isfinite(u)):
        bad = np.nonzero(~np.all(np.isfinite(u), axis=1))[0]
        raise ValueError(f"q has non-finite values in rows {bad[:10].tolist()}")
    if u.shape[0] == 0:
        return np.zeros((0,), dtype=np.int64)
    row_max = u.max(axis=1, keepdims=True)
    is_best = u >= row_max - TIE_TOLERANCE  # [N, E] bool
    # argmax of a bool row returns its first True: the smallest exit among the ties.
    return np.argmax(is_best, axis=1).astype(np.int64)


def _select_allowed(q: np.ndarray, exits: Sequence[int], k_user: int) -> tuple[np.ndarray, List[int]]:
    exits = check_exits(exits)
    q = np.asarray(q, dtype=np.float64)
    if q.ndim == 1:
        q = q[None, :]
    if q.ndim != 2 or q.shape[1] != len(exits):
        raise ValueError(f"q must be [N, {len(exits)}] for exits {exits}; got shape {q.shape}")
    allowed = allowed_exits(exits, k_user)
    return q[:, : len(allowed)], allowed  # exits increase, so the allowed ones are a prefix


def targets(q: np.ndarray, exits: Sequence[int], beta: float, k_user: int) -> np.ndarray:
    """Target of every image as an index into ``allowed_exits(exits, k_user)``.

    q: [N, |exits|] quality per exit (columns in the order of ``exits``). Returns int64 [N].
    """
    q_allowed, allowed = _select_allowed(q, exits, k_user)
    return _first_max(utility(q_allowed, allowed, beta))


def target_exits(q: np.ndarray, exits: Sequence[int], beta: float, k_user: int) -> np.ndarray:
    """Like :func:`targets` but returns the exit values k (int64 [N])."""
    allowed = allowed_exits(exits, k_user)
    return np.asarray(allowed, dtype=np.int64)[targets(q, exits, beta, k_user)]


def best_exits(q: np.ndarray, exits: Sequence[int]) -> np.ndarray:
    """The exit with the highest quality per image, ties to the smaller k (paper Fig. 2)."""
    exits = check_exits(exits)
    return target_exits(q, exits, beta=0.0, k_user=exits[-1])


def exit_histogram(chosen: Iterable[int], exits: Sequence[int], as_index: bool = False) -> Dict[int, int]:
    """Count of images per exit value (every exit present, zeros included).

    ``chosen`` holds exit values, or indices into ``exits`` when ``as_index``.
    """
    exits = check_exits(exits)
    hist = {k: 0 for k in exits}
    for c in chosen:
        k = exits[int(c)] if as_index else int(c)
        if k not in hist:
            raise ValueError(f"exit {k} is not one of {exits}")
        hist[k] += 1
    return hist


def format_histogram(hist: Mapping[int, int], width: int = 40, label: str = "exit") -> str:
    """A text bar chart, one line per exit: `exit 3 |#####      |  120 ( 24.0%)`."""
    total = sum(hist.values())
    peak = max(hist.values(), default=0)
    lines = []
    for k, n in hist.items():
        bar = "#" * (int(round(width * n / peak)) if peak else 0)
        pct = 100.0 * n / total if total else 0.0
        lines.append(f"{label} {k:>2} |{bar:<{width}}| {n:>6} ({pct:5.1f}%)")
    return "\n".join(lines)
