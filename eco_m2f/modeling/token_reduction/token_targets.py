"""Training targets of token-level classifiers (auxiliary heads inside the encoder) from dense labels.

An auxiliary classifier predicts one class distribution per live token. Its loss here is the
pixel cross-entropy of that prediction copied to every pixel of the cells the token stands for
(nearest upsampling), averaged over the labelled pixels of the live tokens: per token, the
class histogram of its pixels weighs the log-probabilities. Nothing is computed for tokens
that already left, and no host sync is needed.
"""
from __future__ import annotations

from typing import Tuple

import torch

from .token_set import TokenSet

__all__ = ["cell_class_counts", "live_token_cross_entropy"]


def cell_class_counts(targets: torch.Tensor, grid: Tuple[int, int], patch: int, num_classes: int, ignore_value: int) -> torch.Tensor:
    """B x H x W labels -> (B, h*w, K) float: the pixels of each class in each patch cell
    (ignored pixels and labels outside 0..K-1 count nowhere)."""
    b, height, width = targets.shape
    h, w = int(grid[0]), int(grid[1])
    if height > h * patch or width > w * patch:
        raise ValueError(f"labels of {height} x {width} exceed the {h} x {w} grid of {patch}-pixel patches")
    device = targets.device
    cell = (torch.arange(height, device=device) // patch).view(-1, 1) * w + (torch.arange(width, device=device) // patch).view(1, -1)
    valid = (targets != ignore_value) & (targets >= 0) & (targets < num_classes)  # B x H x W
    image = torch.arange(b, device=device).view(-1, 1, 1)
    index = (image * (h * w) + cell) * num_classes + targets.clamp(0, num_classes - 1)
    counts = torch.zeros(b * h * w * num_classes, device=device)
    counts.index_add_(0, index.reshape(-1), valid.reshape(-1).float())
    return counts.view(b, h * w, num_classes)


def live_token_cross_entropy(logits: torch.Tensor, tokens: TokenSet, counts: torch.Tensor) -> torch.Tensor:
    """Pixel-averaged cross-entropy of ``logits`` (Tp, K), one row per live token of ``tokens``,
    against ``counts`` (B, h*w, K) from :func:`cell_class_counts`; 0 when no pixel is labelled."""
    b, cells, k = counts.shape
    owned = (tokens.owner >= 0).view(-1, 1).to(counts.dtype)  # (B*G, 1)
    rows = tokens.owner.clamp(min=0).view(-1)
    per_token = counts.new_zeros(tokens.layout.num_patches, k).index_add(0, rows, counts.view(b * cells, k) * owned)
    log_p = logits.float().log_softmax(dim=-1)
    return -(per_token * log_p).sum() / per_token.sum().clamp(min=1)
