"""Compute actually spent per image: exit histogram and average GFLOPs (papers/004 Tables 1-3).

Each prediction of a MaskFormer-style model says at which encoder depth it left
(``"eco_exit"``); the cost of an image is the network's GFLOPs at that depth and its padded
input size, counted once per distinct (size, exit) by fvcore, plus the gate's linear layer.
"""
from __future__ import annotations

from collections import Counter
from typing import Any, Dict, List, Tuple

import torch.nn as nn

from .evaluator import DatasetEvaluator


def _padded(h: int, w: int, divisor: int) -> Tuple[int, int]:
    if divisor <= 1:
        return h, w
    return (h + divisor - 1) // divisor * divisor, (w + divisor - 1) // divisor * divisor


class EfficiencyEvaluator(DatasetEvaluator):
    """Exit histogram and mean GFLOPs per image (total and pixel-decoder encoder)."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self._items: List[Tuple[int, int, int]] = []

    def reset(self) -> None:
        self._items = []

    def process(self, inputs: List[Dict[str, Any]], outputs: List[Dict[str, Any]]) -> None:
        divisor = int(getattr(self.model, "size_divisibility", 32))
        for x, out in zip(inputs, outputs):
            if "eco_exit" not in out:
                continue
            h, w = x["image"].shape[-2:]
            ph, pw = _padded(int(h), int(w), divisor)
            self._items.append((ph, pw, int(out["eco_exit"])))

    def evaluate(self) -> Dict[str, Any] | None:
        from ..utils import comm
        from .flops import FlopCache

        items = [it for part in comm.all_gather(self._items) for it in part]
        if not comm.is_main_process():
            return None
        if not items:
            return {}
        cache = FlopCache(self.model)
        gate = getattr(self.model, "gate", None)
        gate_gflops = 0.0
        if gate is not None:
            gate_gflops = gate.linear.in_features * gate.linear.out_features / 1e9
        total = encoder = 0.0
        for ph, pw, k in items:
            f = cache.get((ph, pw), k)
            total += f["total"] + gate_gflops
            encoder += f["encoder"]
        n = len(items)
        hist = Counter(k for _, _, k in items)
        return {
            "eco": {
                "total_gflops": total / n,
                "enc_gflops": encoder / n,
                "mean_exit": sum(k for _, _, k in items) / n,
                "num_images": n,
                "exit_histogram": {str(k): hist[k] for k in sorted(hist)},
            }
        }
