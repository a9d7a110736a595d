"""Building the token-reduction method a config names (``MODEL.TOKEN_REDUCTION.NAME``).

Apart from :mod:`.plugin` so that the interface does not import the methods that implement it:
importing this module registers the built-in methods (:mod:`.methods`).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

from . import methods  # noqa: F401  (registers the built-in methods)
from .plugin import OUTPUT_KINDS, TOKEN_REDUCTION_REGISTRY, TokenReducer

if TYPE_CHECKING:
    from ..backbone.vit import ViTBackbone
    from ..heads.vit_decode_head import ViTDecodeHead

__all__ = ["build_token_reducer"]


def build_token_reducer(cfg: Any, backbone: "ViTBackbone", head: "ViTDecodeHead") -> TokenReducer:
    """The registered method ``MODEL.TOKEN_REDUCTION.NAME`` (a clear error for unknown names)."""
    name = str(cfg.MODEL.TOKEN_REDUCTION.NAME)
    try:
        cls = TOKEN_REDUCTION_REGISTRY.get(name)
    except KeyError as exc:
        known = sorted(n for n, _ in TOKEN_REDUCTION_REGISTRY)
        raise KeyError(f"MODEL.TOKEN_REDUCTION.NAME '{name}' is not a registered token-reduction method; known: {known}") from exc
    reducer = cls(cfg, backbone, head)
    if not isinstance(reducer, TokenReducer):
        raise TypeError(f"MODEL.TOKEN_REDUCTION.NAME '{name}' built a {type(reducer).__name__}, not a TokenReducer")
    if reducer.output_kind not in OUTPUT_KINDS:
        raise ValueError(f"{type(reducer).__name__}.output_kind {reducer.output_kind!r} is not one of {OUTPUT_KINDS}")
    layers = tuple(reducer.decision_layers)
    if list(layers) != sorted(set(layers)) or any(not 0 <= i < backbone.depth for i in layers):
        raise ValueError(
            f"{type(reducer).__name__}.decision_layers {list(layers)} must be distinct ascending block indices "
            f"within the {backbone.depth} blocks"
        )
    reducer.check_head(head)
    return reducer
