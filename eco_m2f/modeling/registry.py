"""Registries: configs name components, these turn the names into ``nn.Module`` s.

The names are Detectron2/Mask2Former's, so that official YAML files resolve unchanged.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from fvcore.common.registry import Registry

META_ARCH_REGISTRY = Registry("META_ARCH")
META_ARCH_REGISTRY.__doc__ = "Meta-architectures: fn(cfg) -> nn.Module taking batched_inputs."

BACKBONE_REGISTRY = Registry("BACKBONE")
BACKBONE_REGISTRY.__doc__ = "Backbones: fn(cfg, input_shape: ShapeSpec) -> Backbone."

SEM_SEG_HEADS_REGISTRY = Registry("SEM_SEG_HEADS")
SEM_SEG_HEADS_REGISTRY.__doc__ = "Segmentation heads: cls(cfg, input_shape: dict[str, ShapeSpec])."

PIXEL_DECODER_REGISTRY = Registry("PIXEL_DECODER")
PIXEL_DECODER_REGISTRY.__doc__ = "Pixel decoders: cls(cfg, input_shape: dict[str, ShapeSpec])."

TRANSFORMER_DECODER_REGISTRY = Registry("TRANSFORMER_MODULE")
TRANSFORMER_DECODER_REGISTRY.__doc__ = "Transformer decoders: cls(cfg, in_channels, mask_classification=True)."


def lookup(registry: Registry, name: str, key: str) -> Any:
    """``registry.get(name)``, or a KeyError naming the config ``key`` and the registered names."""
    try:
        return registry.get(name)
    except KeyError as exc:
        known = sorted(n for n, _ in registry)
        raise KeyError(f"{key} '{name}' is not registered; known: {known}") from exc


@dataclass(frozen=True)
class ShapeSpec:
    """Channels and stride of a feature map (Detectron2's ShapeSpec)."""

    channels: Optional[int] = None
    height: Optional[int] = None
    width: Optional[int] = None
    stride: Optional[int] = None
