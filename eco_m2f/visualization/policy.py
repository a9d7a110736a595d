"""The CTS policy network's output drawn and listed: which superpatches it would share.

A policy model outputs no segments but ``"policy"``: rows x cols probabilities that each
32 x 32 superpatch of the (resized) network input holds one class, the last row and column
partly outside the image. The demo draws it as a label grid over the image (at least 0.5:
"one class: shared"), the cells placed at the scale between the image and the network input,
and writes the probabilities to the JSON.
"""
from __future__ import annotations

from fractions import Fraction
from typing import Any, Dict, Sequence

import numpy as np

from .label_grid import GridLabel, label_grid_panel
from .panels import Panel

__all__ = ["POLICY_THRESHOLD", "policy_panel", "policy_record"]

#: P(one class) at or above which a superpatch counts as shared (the policy evaluator's cut).
POLICY_THRESHOLD = 0.5

_LABELS = (GridLabel(0, "mixed", (215, 48, 39)), GridLabel(1, "one class: shared", (69, 117, 180)))


def _scores(policy: Any) -> np.ndarray:
    scores = policy.detach().float().cpu().numpy() if hasattr(policy, "detach") else np.asarray(policy, dtype=np.float32)
    if scores.ndim != 2 or scores.size == 0:
        raise ValueError(f"'policy' must be a rows x cols grid of probabilities, got shape {scores.shape}")
    return scores


def policy_panel(policy: Any, image: np.ndarray, network_size: Sequence[int], *, title: str = "policy (superpatches)",
                 alpha: float = 0.6) -> Panel:
    """``image`` (H x W x 3, any size) with every superpatch coloured shared or mixed."""
    from ..modeling.policy import SUPERPATCH_SIZE

    scores = _scores(policy)
    h, w = int(network_size[0]), int(network_size[1])
    cell = (Fraction(SUPERPATCH_SIZE * image.shape[0], h), Fraction(SUPERPATCH_SIZE * image.shape[1], w))
    grid = (scores >= POLICY_THRESHOLD).astype(np.int64)
    panel = label_grid_panel(grid, list(_LABELS), image=image, title=title, alpha=alpha, cell_size=cell)
    panel.notes.append(f"P(one class) >= {POLICY_THRESHOLD}: shared")
    return panel


def policy_record(policy: Any) -> Dict[str, Any]:
    """JSON-ready: the grid's shape, how many superpatches are shared, every probability (4 decimals)."""
    scores = _scores(policy)
    return {"rows": int(scores.shape[0]), "cols": int(scores.shape[1]),
            "shared": int((scores >= POLICY_THRESHOLD).sum()), "threshold": POLICY_THRESHOLD,
            "scores": np.round(scores.astype(np.float64), 4).tolist()}
