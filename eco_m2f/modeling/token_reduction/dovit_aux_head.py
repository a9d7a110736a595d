"""DoViT's auxiliary head: a 1x1 fully-convolutional classifier run token by token.

The paper (papers/001 section 4.1.2) inserts "single-layer auxiliary heads with 1 x 1 kernel"
after the decision layers; the official code builds mmseg's ``FCNHead`` with one 1x1 conv of
256 channels (conv, BatchNorm, ReLU, then the 1x1 classifier), which is also what the paper's
parameter counts add (ViT-S +0.32M, ViT-B +0.61M, ViT-L +0.80M for three heads). A 1x1
convolution treats each token alone, so the head runs on the packed live rows ``(T, C)`` as
linears: in inference it costs exactly its live tokens. ``hidden = 0`` makes it one
``Linear(C, K)``.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["PointwiseAuxHead"]


class PointwiseAuxHead(nn.Module):
    """``(T, C)`` token features -> ``(T, K)`` class logits: Linear(C, hidden) + BN + ReLU + Linear(hidden, K)."""

    def __init__(self, in_channels: int, num_classes: int, hidden: int = 256) -> None:
        super().__init__()
        if in_channels < 1 or num_classes < 1 or hidden < 0:
            raise ValueError(
                f"auxiliary head needs in_channels >= 1, num_classes >= 1, hidden >= 0; got {in_channels}, "
                f"{num_classes}, {hidden}"
            )
        if hidden:
            self.proj = nn.Sequential(nn.Linear(in_channels, hidden, bias=False), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True))
            self.cls = nn.Linear(hidden, num_classes)
        else:
            self.proj = nn.Identity()
            self.cls = nn.Linear(in_channels, num_classes)
        nn.init.normal_(self.cls.weight, std=0.01)  # mmseg's classifier init
        nn.init.zeros_(self.cls.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 2:
            raise ValueError(f"the auxiliary head takes packed token rows (T, C), got {tuple(x.shape)}")
        if self.training and x.shape[0] < 2 and isinstance(self.proj, nn.Sequential):
            # BatchNorm has no batch statistics of fewer than two rows: use the running ones
            linear, norm, act = self.proj
            y = F.batch_norm(linear(x), norm.running_mean, norm.running_var, norm.weight, norm.bias, False, 0.0, norm.eps)
            return self.cls(act(y))
        return self.cls(self.proj(x))

    def flops_per_token(self) -> int:
        """FLOPs of one token with the project's fvcore conventions: a Linear in x out, BatchNorm
        (foldable into the linear in inference) and ReLU none."""
        total = self.cls.in_features * self.cls.out_features
        if isinstance(self.proj, nn.Sequential):
            total += self.proj[0].in_features * self.proj[0].out_features
        return total
