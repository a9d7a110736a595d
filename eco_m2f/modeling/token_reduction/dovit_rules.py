"""DoViT's token-pass rules on a token set (papers/001 section 3): who stops, and the class-token merge.

* Confidence (Eq. 3): the largest softmax probability of a token's auxiliary logits.
* Stop rule (Eq. 4-5): a live token stops when its confidence exceeds xi. Stopped tokens leave
  the set (their features are kept for the decoder), so a stopped token can never come back:
  the accumulated mask of Eq. 5 is the set itself. xi = 1.0 stops nothing (a probability never
  exceeds 1), which is the dense model.
* Token merging (Eq. 8): the class token becomes ``1/2 (cls + mean of all stopped tokens)``,
  where "all" means every token stopped so far (``|S^l| = |1 - M^l|`` counts the accumulated
  mask), each with the features it had when it stopped. The official code merges only while
  more than ``agg_rate`` (0.1) of the ``N + 1`` tokens are stopped; ``min_fraction`` is that
  option (0 = the paper: whenever a token has stopped).
* Threshold ramp (official code): xi falls linearly from 1.0 to its target over the first part
  of training; the paper trains with the target from the start.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from .token_set import TokenSet

__all__ = ["StoppedSum", "confidence", "merge_stopped_into_cls", "ramped_threshold", "stop_mask"]


def confidence(logits: torch.Tensor) -> torch.Tensor:
    """(T, K) class logits -> (T,) max softmax probability (Eq. 3), in float32."""
    return logits.float().softmax(dim=-1).amax(dim=-1)


def stop_mask(logits: torch.Tensor, threshold: float) -> torch.Tensor:
    """(T, K) logits of live tokens -> (T,) bool, True where the token stops (confidence > xi, Eq. 4)."""
    if not 0.0 <= threshold <= 1.0:
        raise ValueError(f"the DoViT threshold xi must lie in [0, 1], got {threshold}")
    return confidence(logits) > threshold


def ramped_threshold(iteration: int, max_iter: int, target: float, ramp_fraction: float) -> float:
    """xi at training ``iteration``: 1.0 falling linearly to ``target`` over the first
    ``ramp_fraction`` of ``max_iter`` iterations, ``target`` after (and always when the fraction is 0)."""
    if ramp_fraction < 0:
        raise ValueError(f"the threshold ramp fraction must be >= 0, got {ramp_fraction}")
    ramp_iters = ramp_fraction * max_iter
    if ramp_iters <= 0:
        return float(target)
    progress = min(1.0, iteration / ramp_iters)
    return 1.0 - progress * (1.0 - float(target))


@dataclass
class StoppedSum:
    """Per image, the sum of the features of every token stopped so far and their count.

    Kept beside the token set so that Eq. 8 can average over all stopped tokens without
    reassembling the dense map: each decision adds its newly stopped tokens. Everything stays on
    the device: adding needs no host sync.
    """

    total: torch.Tensor  # (B, C) float32 sum of stopped features
    count: torch.Tensor  # (B,) float32 stopped tokens

    @classmethod
    def empty(cls, tokens: TokenSet) -> "StoppedSum":
        b, c = tokens.batch_size, tokens.x.shape[1]
        zeros = tokens.x.new_zeros(b, c, dtype=torch.float32)
        return cls(zeros, tokens.x.new_zeros(b, dtype=torch.float32))

    def add(self, tokens: TokenSet, stop: torch.Tensor, patches: Optional[torch.Tensor] = None) -> "StoppedSum":
        """Add the live tokens of ``tokens`` selected by ``stop`` (Tp,) bool, with their current
        features (``patches``, when the caller has gathered them; summed in float32: thousands of
        half-precision features would lose digits)."""
        if tokens.layout.num_patches == 0:
            return self
        mean, count = tokens.segment_mean((tokens.patches() if patches is None else patches).float(), stop)
        return StoppedSum(self.total + mean * count.unsqueeze(1), self.count + count)

    def mean(self) -> torch.Tensor:
        """(B, C) mean stopped feature (0 where nothing stopped)."""
        return self.total / self.count.clamp(min=1).unsqueeze(1)


def merge_stopped_into_cls(
    tokens: TokenSet, stopped: StoppedSum, weight: float = 0.5, min_fraction: float = 0.0,
    num_tokens: Optional[int] = None,
) -> TokenSet:
    """Eq. 8: the class token (prefix 0) becomes ``(1 - weight) * cls + weight * mean(stopped)``
    in every image whose stopped tokens are more than ``min_fraction`` of its ``num_tokens``
    (default: the grid cells plus the prefix, as the official code counts); others unchanged."""
    n = tokens.num_cells + tokens.num_prefix if num_tokens is None else int(num_tokens)
    merge = (stopped.count > 0) & (stopped.count > min_fraction * n)  # (B,)
    prefix = tokens.prefix()  # (B, P, C)
    cls = prefix[:, 0]
    merged = (1 - weight) * cls + weight * stopped.mean().to(cls.dtype)
    new = torch.where(merge.unsqueeze(1), merged, cls)
    return tokens.with_prefix(torch.cat([new.unsqueeze(1), prefix[:, 1:]], dim=1))
