"""dCTS: dynamic token sharing over windows of several sizes (papers/003, STEP's first half;
``MODEL.TOKEN_REDUCTION.NAME: "DCTS"``, keys ``...DCTS.*``).

The frozen policy scores aligned windows of 2x2, 4x4, 8x8 and 16x16 patches (one head per size,
``MODEL.POLICY.WINDOW_SIZES``); a window is shared when its score reaches its size's threshold.
The paper does not say how overlapping choices are resolved: here largest first on the aligned
quadtree, a window being taken only when no cell of it lies in a larger window already taken,
so that windows never overlap and every cell ends in exactly one token
(:func:`..window_sharing.resolve_windows`). An n x n window is area-averaged to one patch and
embedded by the ViT's own patch embedding, its position embedding the mean of its cells'; the
decoder's prediction for it is copied back to every cell it covers. Windows that would reach past
the grid are not scored (their cells fall to smaller windows or keep their own tokens).

Named threshold settings (2 / 4 / 8 / 16): ``tau-6899`` = 0.6 / 0.8 / 0.9 / 0.9 and ``tau-4999``
= 0.4 / 0.9 / 0.9 / 0.9. Thresholds above 1 share nothing: the policy does not run and the model
is the dense Segmenter exactly.
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

from ...meta_arch.token_sharing_policy import check_window_sizes
from ..plugin import TOKEN_REDUCTION_REGISTRY
from .sharing import WindowSharingReducer

__all__ = ["DCTS", "DCTS_SETTINGS"]

_KEY = "MODEL.TOKEN_REDUCTION.DCTS"
#: papers/003's named threshold settings, for windows of 2, 4, 8 and 16 patches.
DCTS_SETTINGS: Dict[str, Tuple[float, ...]] = {"tau-6899": (0.6, 0.8, 0.9, 0.9), "tau-4999": (0.4, 0.9, 0.9, 0.9)}


def dcts_thresholds(setting: str, thresholds: Sequence[float], sizes: Sequence[int]) -> Tuple[float, ...]:
    """One threshold per window size: a named ``setting`` (for sizes 2, 4, 8, 16) or the numbers."""
    if setting:
        if setting not in DCTS_SETTINGS:
            raise ValueError(f"{_KEY}.SETTING {setting!r} is not one of {sorted(DCTS_SETTINGS)} ('' = THRESHOLDS)")
        if tuple(sizes) != (2, 4, 8, 16):
            raise ValueError(
                f"{_KEY}.SETTING {setting!r} gives thresholds for windows [2, 4, 8, 16], but WINDOW_SIZES is "
                f"{list(sizes)}; give THRESHOLDS instead (with SETTING '')"
            )
        return DCTS_SETTINGS[setting]
    values = [float(v) for v in thresholds]
    if len(values) != len(sizes) or any(not v >= 0.0 for v in values):
        raise ValueError(f"{_KEY}.THRESHOLDS {list(thresholds)}: one score >= 0 per window size {list(sizes)}")
    return tuple(values)


@TOKEN_REDUCTION_REGISTRY.register()
class DCTS(WindowSharingReducer):
    """Token sharing over windows of several sizes, thresholded per size; see the module docstring."""

    def __init__(self, cfg: Any, backbone, head) -> None:
        super().__init__(cfg, backbone, head)
        d = cfg.MODEL.TOKEN_REDUCTION.DCTS
        sizes = tuple(check_window_sizes(d.WINDOW_SIZES, f"{_KEY}.WINDOW_SIZES"))
        missing = [n for n in sizes if n not in self.policy.window_sizes]
        if missing:
            raise ValueError(
                f"{_KEY}.WINDOW_SIZES {list(sizes)}: the policy scores no windows of {missing} patches; add them to "
                f"MODEL.POLICY.WINDOW_SIZES {list(self.policy.window_sizes)} (and train the policy with them)"
            )
        self.window_sizes = sizes
        self.thresholds = dcts_thresholds(str(d.SETTING), d.THRESHOLDS, sizes)

    def active(self) -> bool:
        return any(t <= 1.0 for t in self.thresholds)

    def wanted(self, scores: Dict[int, torch.Tensor], grid: Tuple[int, int]) -> Tuple[Dict[int, torch.Tensor], Optional[List[List[int]]]]:
        return {n: scores[n] >= t for n, t in zip(self.window_sizes, self.thresholds)}, None

    def cost_fields(self, state, taken) -> None:
        state.add_cost("shared", [[int(t) for t in row] for row in taken])  # windows per size, WINDOW_SIZES order
        cells = [sum(n * n * int(t) for n, t in zip(self.window_sizes, row)) for row in taken]
        state.add_cost("shared_cells", cells)
