"""What an image cost the model, read from its eval output and written beside the result.

A dynamic model's eval output holds a per-image cost record (``"cost"``: a flat dict of
numbers, e.g. ``{"exit": 3}`` for ECO-M2F or ``{"tokens": 812, "gflops": 12.3}``; see
``modeling/meta_arch/base.py``). Outputs of the older format carry the exit as ``"eco_exit"``
instead. For a record with an encoder exit, the encoder GFLOPs of that image are counted
with the project's FLOP counter; :func:`count_encoder_gflops` is the one place that calls it.
"""
from __future__ import annotations

from typing import Any, Dict, Hashable, Mapping, Optional

import torch
import torch.nn as nn

__all__ = ["EncoderGflops", "cost_notes", "cost_record", "count_encoder_gflops", "padded_size"]


def cost_record(output: Mapping[str, Any]) -> Optional[dict[str, Any]]:
    """The output's cost record (``"cost"``; else ``{"exit": eco_exit}``), or None."""
    cost = output.get("cost")
    if cost is not None:
        if not isinstance(cost, Mapping):
            raise TypeError(f"the output's 'cost' must be a dict of numbers, got {type(cost).__name__}")
        return {str(k): _plain(v) for k, v in cost.items()}
    if "eco_exit" in output:
        return {"exit": int(output["eco_exit"])}
    return None


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
    """Text lines of a cost record: the exit and the encoder GFLOPs first, then every other field."""
    lines = []
    if "exit" in record:
        lines.append(f"encoder exit: layer {record['exit']}")
    if "encoder_gflops" in record:
        lines.append(f"encoder GFLOPs: {_fmt(float(record['encoder_gflops']))}")
    for key, value in record.items():
        if key not in ("exit", "encoder_gflops"):
            lines.append(f"{key}: {_fmt(value)}")
    return lines


def padded_size(height: int, width: int, divisibility: int) -> tuple[int, int]:
    """The network's input size: (height, width) rounded up to a multiple of ``divisibility``."""
    d = int(divisibility)
    if d <= 1:
        return int(height), int(width)
    return -(-int(height) // d) * d, -(-int(width) // d) * d


def count_encoder_gflops(model: nn.Module, padded_hw: tuple[int, int], exit_layer: Optional[int]) -> float:
    """GFLOPs of the pixel-decoder encoder for one input of ``padded_hw`` leaving at ``exit_layer``."""
    from ..evaluation.flops import count_network_flops

    device = next(model.parameters()).device
    images = torch.zeros((1, 3, int(padded_hw[0]), int(padded_hw[1])), device=device)
    return float(count_network_flops(model, images, exit_layer)["encoder"])


class EncoderGflops:
    """Encoder GFLOPs per (padded input size, exit), each counted once (a FLOP count traces the model)."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self._cache: Dict[Hashable, float] = {}

    def __call__(self, image_hw: tuple[int, int], exit_layer: int) -> float:
        """GFLOPs for an input of ``image_hw`` (as the mapper resized it) leaving at ``exit_layer``."""
        divisibility = int(getattr(self.model, "size_divisibility", 0) or 0)
        key = (*padded_size(image_hw[0], image_hw[1], divisibility), int(exit_layer))
        if key not in self._cache:
            self._cache[key] = count_encoder_gflops(self.model, key[:2], key[2])
        return self._cache[key]
