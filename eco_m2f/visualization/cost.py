"""What an image cost the model, read from its eval output and written beside the result.

A model's eval output may hold a per-image cost record (``"cost"``: a flat dict of numbers,
e.g. ``{"exit": 3}`` for ECO-M2F or ``{"tokens": 812, "gflops": 12.3}``; see
``modeling/meta_arch/base.py``). A record without ``"gflops"`` gets them, total and per
reported scope (``gflops_encoder``...), from the project's FLOP counter along the path the
record describes, exactly as the evaluation's cost task counts them.
"""
from __future__ import annotations

from typing import Any, Dict, Mapping, Optional

import torch
import torch.nn as nn

__all__ = ["ImageGflops", "cost_notes", "cost_record"]

GFLOPS = "gflops"


def cost_record(output: Mapping[str, Any]) -> Optional[dict[str, Any]]:
    """The output's cost record as JSON-ready numbers, or None when it has none."""
    cost = output.get("cost")
    if cost is None:
        return None
    if not isinstance(cost, Mapping):
        raise TypeError(f"the output's 'cost' must be a dict of numbers, got {type(cost).__name__}")
    return {str(k): _plain(v) for k, v in cost.items()}


def _plain(value: Any) -> Any:
    """Tensors and numpy scalars as Python numbers or lists (JSON-ready)."""
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 1 else f"{value:.2f}"
    if isinstance(value, list):
        return ", ".join(_fmt(v) for v in value)
    return str(value)


def cost_notes(record: Mapping[str, Any]) -> list[str]:
    """Text lines of a cost record: the exit and the GFLOPs first, then every other field."""
    lines = []
    if "exit" in record:
        lines.append(f"encoder exit: layer {record['exit']}")
    flops = sorted((k for k in record if k == GFLOPS or k.startswith(GFLOPS + "_")), key=lambda k: (k != GFLOPS, k))
    for key in flops:
        scope = key[len(GFLOPS) + 1:]
        lines.append(f"{scope + ' ' if scope else ''}GFLOPs: {_fmt(float(record[key]))}")
    for key, value in record.items():
        if key != "exit" and key not in flops:
            lines.append(f"{key}: {_fmt(value)}")
    return lines


class ImageGflops:
    """GFLOPs of one image along the path of its cost record (the counter caches what it can)."""

    def __init__(self, model: nn.Module) -> None:
        from ..evaluation.flops import FlopCounter

        self.model = model
        self._counter = FlopCounter(model)

    def __call__(self, model_input: Mapping[str, Any], record: Mapping[str, Any]) -> Dict[str, float]:
        """``{"gflops": ..., "gflops_<scope>": ...}`` of ``model_input`` (as the mapper made it)."""
        with torch.no_grad():
            images = self.model.preprocess_image([dict(model_input)]).tensor  # 1 x 3 x H x W, padded
            counted = self._counter.for_image(images, record)
        return {GFLOPS if k == "total" else f"{GFLOPS}_{k}": float(v) for k, v in counted.items()}
