"""CTS: content-aware token sharing (papers/002; ``MODEL.TOKEN_REDUCTION.NAME: "CTS"``, keys ``...CTS.*``).

A frozen policy network scores every 2x2 superpatch (32x32 pixels for patches of 16) of the
input: the probability that it holds one class. The chosen superpatches each become one token:
the region 2x2-averaged to 16x16 and embedded by the ViT's own patch embedding, its position
embedding the mean of its four cells' (:mod:`..window_sharing`). The encoder and the decoder see
only these live tokens; the decoder's per-token prediction for a shared token is copied back to
its four patches (``output_kind`` "tokens").

Which superpatches: ``MODE`` "fixed" shares the S highest-scoring ones of every image (002's
defaults: ADE20K 103 of the 256 superpatches of a 512 crop, Cityscapes 336 of 576 at 768);
"threshold" (the dynamic variant, 002 Table 1) every superpatch scoring at least ``THRESHOLD``,
so that S differs from image to image within a batch. With ``NUM_SHARED_OF`` > 0, S scales
with the input: ``round(NUM_SHARED * superpatches / NUM_SHARED_OF)`` for inputs of another size
than the crop S refers to. On a grid with an odd number of rows (columns) the last row (column)
of patches forms no superpatch: it keeps one token per patch.

S = 0, or a threshold above 1, shares nothing: the policy does not run and the model is the
dense Segmenter exactly.
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Tuple

import torch

from ..plugin import TOKEN_REDUCTION_REGISTRY
from .sharing import WindowSharingReducer

__all__ = ["CTS", "CTS_MODES"]

_KEY = "MODEL.TOKEN_REDUCTION.CTS"
#: How the shared superpatches are chosen.
CTS_MODES = ("fixed", "threshold")


@TOKEN_REDUCTION_REGISTRY.register()
class CTS(WindowSharingReducer):
    """Content-aware token sharing of 2x2 superpatches; see the module docstring."""

    def __init__(self, cfg: Any, backbone, head) -> None:
        super().__init__(cfg, backbone, head)
        c = cfg.MODEL.TOKEN_REDUCTION.CTS
        self.mode = str(c.MODE)
        if self.mode not in CTS_MODES:
            raise ValueError(f"{_KEY}.MODE {self.mode!r} is not one of {list(CTS_MODES)}")
        self.num_shared = int(c.NUM_SHARED)
        if self.num_shared < 0:
            raise ValueError(f"{_KEY}.NUM_SHARED must be >= 0 (superpatches shared per image), got {c.NUM_SHARED}")
        self.num_shared_of = int(c.NUM_SHARED_OF)
        if self.num_shared_of < 0 or (self.num_shared_of and self.num_shared > self.num_shared_of):
            raise ValueError(
                f"{_KEY}.NUM_SHARED_OF {c.NUM_SHARED_OF}: 0 (NUM_SHARED as is), or the superpatches of the crop "
                f"that NUM_SHARED {self.num_shared} refers to (at least NUM_SHARED)"
            )
        self.threshold = float(c.THRESHOLD)
        if not self.threshold >= 0.0:
            raise ValueError(f"{_KEY}.THRESHOLD must be a score >= 0 (above 1 shares nothing), got {c.THRESHOLD}")
        self.window_sizes = (2,)
        self.content_dependent_cost = self.mode == "threshold"

    def active(self) -> bool:
        return self.num_shared > 0 if self.mode == "fixed" else self.threshold <= 1.0

    def budget(self, grid: Tuple[int, int]) -> int:
        """S for an input of ``grid`` patches: NUM_SHARED (scaled by NUM_SHARED_OF), at most all superpatches."""
        available = (grid[0] // 2) * (grid[1] // 2)
        s = self.num_shared if not self.num_shared_of else round(self.num_shared * available / self.num_shared_of)
        return min(int(s), available)

    def wanted(self, scores: Dict[int, torch.Tensor], grid: Tuple[int, int]) -> Tuple[Dict[int, torch.Tensor], Optional[List[List[int]]]]:
        score = scores[2]  # B x h//2 x w//2
        b = score.shape[0]
        if self.mode == "threshold":
            return {2: score >= self.threshold}, None
        s = self.budget(grid)
        flat = score.flatten(1)
        top = flat.topk(s, dim=1).indices  # B x S
        chosen = torch.zeros_like(flat, dtype=torch.bool).scatter(1, top, torch.ones_like(top, dtype=torch.bool))
        return {2: chosen.view_as(score)}, [[s]] * b

    def cost_fields(self, state, taken) -> None:
        state.add_cost("shared", [int(row[0]) for row in taken])  # superpatches shared per image
        state.add_cost("shared_cells", [4 * int(row[0]) for row in taken])
