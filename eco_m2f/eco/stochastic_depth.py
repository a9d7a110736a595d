"""Step A of ECO-M2F (papers/004 Eq. 3): weighted stochastic depth over the encoder exits.

Each training image i draws a depth K_i from the exit set E; the decoder runs on the encoder
output at every exit k <= K_i and the loss is (1/N) sum_i sum_{k in E, k <= K_i} alpha_k L_k,
with alpha strictly increasing in k so that later exits are held to a stricter standard.
"""
from __future__ import annotations

from typing import Dict, Sequence, Union

import torch

AlphaSpec = Union[str, Sequence[float]]


def alpha_weights(exits: Sequence[int], spec: AlphaSpec = "linear") -> Dict[int, float]:
    """alpha_k per exit, normalised to sum to 1.

    ``"linear"``: alpha_k proportional to k (weighted stochastic depth, WSD, the paper's default);
    ``"uniform"``: all equal (unweighted stochastic depth, USD, the ablation of papers/004 Table 5);
    a list: one weight per exit, which must be strictly increasing (Eq. 3's condition).
    """
    exits = list(exits)
    if isinstance(spec, str):
        name = spec.lower()
        if name == "linear":
            raw = [float(k) for k in exits]
        elif name == "uniform":
            raw = [1.0 for _ in exits]
        else:
            raise ValueError(f"MODEL.ECO.ALPHA '{spec}' is unknown; use 'linear', 'uniform' or a list of weights")
    else:
        raw = [float(a) for a in spec]
        if len(raw) != len(exits):
            raise ValueError(f"MODEL.ECO.ALPHA has {len(raw)} weights but MODEL.ECO.EXITS has {len(exits)} exits")
        if any(a <= 0 for a in raw):
            raise ValueError(f"MODEL.ECO.ALPHA weights must be positive, got {raw}")
        if any(b <= a for a, b in zip(raw, raw[1:])):
            raise ValueError(f"MODEL.ECO.ALPHA weights must be strictly increasing in k, got {raw}")
    total = sum(raw)
    return {k: a / total for k, a in zip(exits, raw)}


def sample_depths(num_images: int, exits: Sequence[int], generator: torch.Generator | None = None) -> torch.Tensor:
    """K_i for each image, uniform over the exit set."""
    exits_t = torch.as_tensor(list(exits), dtype=torch.long)
    idx = torch.randint(len(exits_t), (num_images,), generator=generator)
    return exits_t[idx]


def combine_exit_losses(
    exit_losses: Dict[int, Dict[str, torch.Tensor]],
    images_per_exit: Dict[int, int],
    num_images: int,
    alpha: Dict[int, float],
) -> Dict[str, torch.Tensor]:
    """Eq. 3 from per-exit batch losses.

    ``exit_losses[k]`` holds the (already weighted) M2F loss terms of the n_k images with
    K_i >= k, each averaged over those images as the criterion does; their share of the
    (1/N) sum over images is n_k / N. Terms are summed per exit into ``loss_exit{k}`` so the
    log shows every exit's loss, and the total is what the optimiser sees.
    """
    out: Dict[str, torch.Tensor] = {}
    for k, terms in sorted(exit_losses.items()):
        n_k = images_per_exit[k]
        if n_k == 0 or not terms:
            continue
        scale = alpha[k] * n_k / num_images
        out[f"loss_exit{k}"] = scale * sum(terms.values())
    return out
