"""Backbone base class (Detectron2's interface): named multi-scale features + their shapes."""
from __future__ import annotations

from abc import ABCMeta, abstractmethod
from typing import Mapping

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..registry import ShapeSpec

__all__ = ["Backbone", "pad_to_multiple"]


def pad_to_multiple(x: torch.Tensor, divisor: int) -> torch.Tensor:
    """Zero-pad a B x C x H x W tensor at the bottom/right so H and W are multiples of ``divisor``."""
    if divisor <= 1:
        return x
    h, w = x.shape[-2:]
    pad_h = (divisor - h % divisor) % divisor
    pad_w = (divisor - w % divisor) % divisor
    if pad_h == 0 and pad_w == 0:
        return x
    return F.pad(x, (0, pad_w, 0, pad_h))


class Backbone(nn.Module, metaclass=ABCMeta):
    """A feature extractor returning ``{name: B x C x H/stride x W/stride}``.

    ``forward`` zero-pads the input at the bottom/right to a multiple of ``size_divisibility``
    (32) before running the network, so every output has exactly ``H_pad / stride`` rows. The
    meta-architecture normally pads already (``MODEL.MASK_FORMER.SIZE_DIVISIBILITY``); then
    this is a no-op. Zero padding is what Detectron2's ``ImageList`` does after normalisation.

    Subclasses implement :meth:`forward_features` (input already padded) and fill
    ``_out_features``, ``_out_feature_channels`` and ``_out_feature_strides``. They may override
    :meth:`checkpoint_key_map` (checkpoint names -> ours, used by
    :func:`eco_m2f.checkpoint.load_weights`) and :meth:`keys_not_in_pretrained_weights`.
    """

    size_divisibility: int = 32

    def __init__(self) -> None:
        super().__init__()
        self._out_features: list[str] = []
        self._out_feature_channels: dict[str, int] = {}
        self._out_feature_strides: dict[str, int] = {}
        self._in_channels: int = 3

    @abstractmethod
    def forward_features(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Features of an input whose H, W are multiples of ``size_divisibility``."""

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        if x.dim() != 4 or x.shape[1] != self._in_channels:
            raise ValueError(
                f"{type(self).__name__} expects a B x {self._in_channels} x H x W tensor, got shape {tuple(x.shape)}"
            )
        return self.forward_features(pad_to_multiple(x, self.size_divisibility))

    @property
    def out_features(self) -> list[str]:
        return list(self._out_features)

    def output_shape(self) -> dict[str, ShapeSpec]:
        """Channels and stride of every output feature."""
        return {
            name: ShapeSpec(channels=self._out_feature_channels[name], stride=self._out_feature_strides[name])
            for name in self._out_features
        }

    @property
    def padding_constraints(self) -> dict[str, int]:
        return {"size_divisibility": self.size_divisibility}

    def checkpoint_key_map(self, state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Rename a backbone-relative checkpoint state dict to this module's names (identity here)."""
        return dict(state_dict)

    def keys_not_in_pretrained_weights(self) -> set[str]:
        """Keys of ours that ImageNet classification weights never hold (left as initialised)."""
        return set()


def load_timm_pretrained(backbone: Backbone, timm_name: str) -> None:
    """Load timm's ImageNet weights ``timm_name`` into ``backbone`` (via its key map).

    Needs network access (or timm's/Hugging Face's local cache); fails with a message that
    says what to do otherwise. Only called when ``MODEL.BACKBONE.PRETRAINED`` is True.
    """
    import timm

    from ...checkpoint import load_weights

    try:
        source = timm.create_model(timm_name, pretrained=True)
    except Exception as exc:
        raise RuntimeError(
            f"MODEL.BACKBONE.PRETRAINED is True but timm could not provide the weights '{timm_name}' "
            f"({type(exc).__name__}: {exc}). Without network access, put an ImageNet checkpoint on disk "
            "(Detectron2 .pkl, torchvision/timm .pth or .safetensors) and set MODEL.WEIGHTS to it, "
            "or set MODEL.BACKBONE.PRETRAINED False."
        ) from exc
    report = load_weights(backbone, source.state_dict(), allow_missing=True)
    exempt = backbone.keys_not_in_pretrained_weights()
    missing = [k for k in report.missing_keys if k not in exempt]
    if missing:
        raise RuntimeError(f"timm weights '{timm_name}' lack keys of the backbone: {missing[:20]}")
