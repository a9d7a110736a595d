"""Every meta-architecture the project ships, registered in one place, and ``build_model``.

``eco_m2f.modeling`` holds the registries and the architectures that need nothing else
(``MaskFormer``); ``eco_m2f.eco`` holds ``ECOMaskFormer``, built on MaskFormer. ``modeling`` must
not import ``eco``, so both are registered here: this module imports both, and ``modeling`` never
imports it (``eco``'s step-B and step-C tools build their models through it).
Architectures of other packages register themselves in ``META_ARCH_REGISTRY`` when imported and
are built the same way.
"""
from __future__ import annotations

from typing import Any

from .eco import meta_arch as _eco_meta_arch  # noqa: F401  (registers ECOMaskFormer)
from .modeling import meta_arch as _meta_arch  # noqa: F401  (registers MaskFormer, ...)
from .modeling.meta_arch.base import SegmentationModel
from .modeling.registry import META_ARCH_REGISTRY, lookup
from .utils.device import resolve_device

__all__ = ["build_model"]


def build_model(cfg: Any) -> SegmentationModel:
    """Build ``MODEL.META_ARCHITECTURE`` and place it on ``MODEL.DEVICE``, as Detectron2 does.

    Construction reads no file; parts stored in files of their own (an ECO-M2F gate) are loaded
    by the model's ``load_extra_weights`` right after. ``MODEL.DEVICE`` "cuda" without CUDA
    falls back to the CPU with a warning.
    """
    name = cfg.MODEL.META_ARCHITECTURE
    model = lookup(META_ARCH_REGISTRY, name, "MODEL.META_ARCHITECTURE")(cfg)
    if not isinstance(model, SegmentationModel):
        raise TypeError(
            f"MODEL.META_ARCHITECTURE '{name}' built a {type(model).__name__}, which does not derive from "
            "eco_m2f.modeling.meta_arch.base.SegmentationModel (the contract every meta-architecture follows)"
        )
    model.load_extra_weights()
    return model.to(resolve_device(cfg.MODEL.DEVICE))
