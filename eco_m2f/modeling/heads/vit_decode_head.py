"""The decode-head contract of the plain-ViT segmenters (``Segmenter`` meta-architecture).

A head is registered in ``SEM_SEG_HEADS_REGISTRY`` and built as ``cls(cfg, input_shape,
auxiliary=False)`` with ``input_shape = {"tokens": ShapeSpec(channels=C, stride=patch),
"layer{i}": ...}`` (the final tokens and every block of ``MODEL.VIT.OUT_INDICES``);
``auxiliary=True`` builds it as an auxiliary head on one intermediate layer (its loss weighted
by ``MODEL.SEM_SEG_HEAD.AUX_LOSS_WEIGHT`` instead of ``LOSS_WEIGHT``). Three input kinds
(:attr:`ViTDecodeHead.input_kind`):

* ``"tokens"``: ``forward(tokens B x N x C, padding_mask B x N bool | None, lengths=None)``;
  per-token outputs. ``padding_mask`` is True where a slot holds no token, so a batch may hold a
  different number of live tokens per image; attention inside the head ignores those slots.
  ``lengths`` (host ints, the real tokens per image, or None) lets a head skip the empty slots;
  outputs at empty slots are unspecified.
* ``"levels"``: as ``"tokens"`` but a list of B x N x C sequences, one per
  ``MODEL.VIT.OUT_INDICES`` entry (shallow to deep), sharing one ``padding_mask``.
* ``"grid"``: ``forward(maps B x C x h x w)``; dense maps only.

Outputs are a dict. Every per-token tensor has its token axis at dim 1 (e.g.
``"pred_tokens"`` B x N x K), so one gather/scatter serves every head; grid heads return
``"pred_maps"`` B x K x h' x w'. :meth:`ViTDecodeHead.semantic_logits` turns dense outputs into
B x K x H x W class scores at any size, :meth:`ViTDecodeHead.losses` computes the head's own
weighted losses from the dense targets (B x H x W int64, ``MODEL.SEM_SEG_HEAD.IGNORE_VALUE``
where unknown). :attr:`ViTDecodeHead.token_outputs` names the per-token outputs (what a
token-reduction encoder copies back to the grid cells), :meth:`ViTDecodeHead.flops` counts one
image's FLOPs without tracing (the cost records of token reduction).
"""
from __future__ import annotations

from typing import Any, ClassVar, Dict, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..bilinear_resize import bilinear_resize

__all__ = ["ViTDecodeHead", "pixel_cross_entropy", "tokens_to_map", "resize_logits", "resize_logits_flops"]

INPUT_KINDS = ("tokens", "levels", "grid")


def tokens_to_map(tokens: torch.Tensor, grid: Tuple[int, int]) -> torch.Tensor:
    """B x N x C per-token values of a dense row-major h x w grid -> B x C x h x w."""
    b, n, c = tokens.shape
    h, w = grid
    if n != h * w:
        raise ValueError(
            f"{n} tokens do not fill the {h} x {w} grid: scatter the live tokens back to the grid first"
        )
    return tokens.transpose(1, 2).reshape(b, c, h, w)


def resize_logits(maps: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Bilinear resize of B x K x h x w maps to ``size`` (H, W) (no-op at that size): the
    ``align_corners=False`` interpolation of ``F.interpolate``, as two matrix products
    (:mod:`..bilinear_resize`: an order of magnitude faster on the GPU at 16x). Traced for a
    FLOP count, it is ``F.interpolate`` itself, so that fvcore counts it as the interpolation it
    is (4 per output element, :func:`resize_logits_flops`), not as the products' zeros."""
    if tuple(maps.shape[-2:]) == tuple(size):
        return maps
    if torch.jit.is_tracing():
        return F.interpolate(maps, size=tuple(size), mode="bilinear", align_corners=False)
    return bilinear_resize(maps, size)


def resize_logits_flops(channels: int, source: Sequence[int], size: Sequence[int]) -> int:
    """fvcore's count of :func:`resize_logits` of one C x h x w map to ``size``: 4 per output element."""
    if tuple(source) == tuple(size):
        return 0
    return 4 * int(channels) * int(size[0]) * int(size[1])


def pixel_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, ignore_value: int) -> torch.Tensor:
    """Cross-entropy of B x K x H x W logits against B x H x W labels, averaged over the pixels
    that are not ``ignore_value`` (0 for a batch without any), in float32."""
    total = F.cross_entropy(logits.float(), targets, ignore_index=ignore_value, reduction="sum")
    return total / (targets != ignore_value).sum().clamp(min=1)


class ViTDecodeHead(nn.Module):
    """Base of the Segmenter decode heads: cross-entropy on upsampled logits by default.

    Subclasses set :attr:`input_kind`, implement ``forward`` and, unless their output is a
    per-token ``"pred_tokens"`` or a ``"pred_maps"`` of class logits, :meth:`semantic_logits`
    and :meth:`losses`.
    """

    #: "tokens", "levels" or "grid" (see the module docstring).
    input_kind: ClassVar[str] = "tokens"
    #: True when :meth:`semantic_logits` returns logits (softmax gives probabilities); False when
    #: it returns class scores already (SegViT: class probability x mask probability).
    scores_are_logits: ClassVar[bool] = True
    #: Outputs whose dim 1 is the input's token axis (B x N x ...), e.g. the class logits
    #: ``"pred_tokens"``: with live tokens as input, these are copied back to the grid.
    token_outputs: ClassVar[Tuple[str, ...]] = ("pred_tokens",)

    def __init__(self, cfg: Any, *, auxiliary: bool = False) -> None:
        super().__init__()
        if self.input_kind not in INPUT_KINDS:
            raise ValueError(f"{type(self).__name__}.input_kind {self.input_kind!r} is not one of {INPUT_KINDS}")
        head = cfg.MODEL.SEM_SEG_HEAD
        self.num_classes = int(head.NUM_CLASSES)
        self.ignore_value = int(head.IGNORE_VALUE)
        self.auxiliary = auxiliary
        self.loss_weight = float(head.AUX_LOSS_WEIGHT if auxiliary else head.LOSS_WEIGHT)

    def semantic_logits(self, outputs: Dict[str, Any], grid: Tuple[int, int], size: Sequence[int]) -> torch.Tensor:
        """B x K x H x W class scores at ``size`` from dense outputs (bilinear upsampling)."""
        if "pred_maps" in outputs:
            return resize_logits(outputs["pred_maps"], size)
        return resize_logits(tokens_to_map(outputs["pred_tokens"], grid), size)

    def flops(self, num_tokens: int, grid: Tuple[int, int], size: Sequence[int]) -> int:
        """FLOPs of ``forward`` on one image's ``num_tokens`` tokens (the whole ``grid`` for grid
        heads) plus :meth:`semantic_logits` at ``size``, by fvcore's conventions (one multiply-add
        is one flop, BatchNorm and elementwise operations none)."""
        raise NotImplementedError(f"{type(self).__name__} has no FLOP count of its own (ViTDecodeHead.flops)")

    def losses(self, outputs: Dict[str, Any], targets: torch.Tensor, grid: Tuple[int, int]) -> Dict[str, torch.Tensor]:
        """{"loss_ce"}: cross-entropy of the logits upsampled to the targets' size, averaged over
        the pixels that are not ignored (0 for a batch without any)."""
        logits = self.semantic_logits(outputs, grid, targets.shape[-2:])
        return {"loss_ce": pixel_cross_entropy(logits, targets, self.ignore_value) * self.loss_weight}
