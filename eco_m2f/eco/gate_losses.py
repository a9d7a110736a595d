"""Gate training losses of papers/004 (main text and supplementary Table T2).

g: gate logits [B, E]; u: utility u(k) = q_k - beta * k over the allowed exits [B, E];
t: target index argmax_k u(k) [B]. Every loss is averaged over the batch.

- hard-CE  (default): cross entropy with the one-hot target, -log softmax(g)_t
- u-CE:     -sum_k u(k) log softmax(g)_k
- soft-CE:  -sum_k softmax(u)_k log softmax(g)_k
- soft-MSE:  sum_k (softmax(u)_k - softmax(g)_k)^2

The paper writes q_k for the gate outputs in the Table T2 formulas (and drops the minus sign of the
cross entropies); here they are the gate logits g, and the cross entropies are minimised.
"""
from __future__ import annotations

from typing import Callable, Dict

import torch
import torch.nn.functional as F

__all__ = ["hard_ce", "u_ce", "soft_ce", "soft_mse", "GATE_LOSSES", "get_gate_loss"]

GateLoss = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def hard_ce(logits: torch.Tensor, utility: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Cross entropy with the one-hot target exit (``utility`` unused)."""
    return F.cross_entropy(logits, target.long())


def u_ce(logits: torch.Tensor, utility: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Utility-weighted cross entropy: -sum_k u(k) log softmax(g)_k."""
    return -(utility * F.log_softmax(logits, dim=1)).sum(dim=1).mean()


def soft_ce(logits: torch.Tensor, utility: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Cross entropy against softmax(u): -sum_k softmax(u)_k log softmax(g)_k."""
    return -(F.softmax(utility, dim=1) * F.log_softmax(logits, dim=1)).sum(dim=1).mean()


def soft_mse(logits: torch.Tensor, utility: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Squared error between softmax(u) and softmax(g), summed over exits."""
    return ((F.softmax(utility, dim=1) - F.softmax(logits, dim=1)) ** 2).sum(dim=1).mean()


# Names as in MODEL.ECO.GATE.LOSS.
GATE_LOSSES: Dict[str, GateLoss] = {
    "hard-CE": hard_ce,
    "u-CE": u_ce,
    "soft-CE": soft_ce,
    "soft-MSE": soft_mse,
}


def get_gate_loss(name: str) -> GateLoss:
    """The loss named by MODEL.ECO.GATE.LOSS."""
    try:
        return GATE_LOSSES[name]
    except KeyError:
        raise ValueError(
            f"MODEL.ECO.GATE.LOSS '{name}' is unknown; choose one of {sorted(GATE_LOSSES)}"
        ) from None
