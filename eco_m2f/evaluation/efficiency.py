"""Compute actually spent per image, from the cost records models put in their eval outputs.

Every meta-architecture may add ``"cost"`` to each per-image output (DESIGN.md section 8): a flat
dict of numbers and lists of numbers, such as ``{"exit": 3}`` (ECO-M2F) or ``{"tokens": 812,
"tokens_per_layer": [...]}`` (token reduction). This evaluator knows none of those fields. A record
without ``"gflops"`` gets them from fvcore, counting ``model.network`` on that image along the path
the record describes (:class:`~eco_m2f.evaluation.flops.FlopCounter`). The result, task
``"cost"``:

* ``num_images``; ``gflops`` and ``gflops_<scope>`` (e.g. ``gflops_encoder``): means per image;
* every other numeric field F: ``F_mean``, and ``F_histogram`` (``{value: count}``, values as
  strings, JSON's keys) when all its values are integers;
* a list-valued field F: ``F_mean``, the element-wise mean (all lists must have one length).

A field missing from some records is averaged over the records that have it.
"""
from __future__ import annotations

import numbers
from collections import Counter
from typing import Any, Dict, List, Mapping, Sequence

import torch.nn as nn

from .evaluator import DatasetEvaluator

__all__ = ["EfficiencyEvaluator", "summarize_costs"]

GFLOPS = "gflops"


def _plain(value: Any, field: str) -> Any:
    """A cost value as a Python number or list of numbers (0-d tensors and numpy scalars unwrapped)."""
    if hasattr(value, "tolist") and not isinstance(value, (list, tuple)):
        value = value.tolist()
    if isinstance(value, (list, tuple)):
        items = [_plain(v, field) for v in value]
        if any(isinstance(v, list) for v in items):
            raise ValueError(f"cost field {field!r} is a nested list; records hold numbers or flat lists of numbers")
        return items
    if isinstance(value, numbers.Number) and not isinstance(value, complex):
        return value
    raise ValueError(f"cost field {field!r} has value {value!r}; records hold numbers or lists of numbers")


def _mean(values: Sequence[float]) -> float:
    return float(sum(values)) / len(values)


def summarize_costs(records: Sequence[Mapping[str, Any]]) -> Dict[str, Any]:
    """The ``"cost"`` result of :class:`EfficiencyEvaluator` for ``records`` (see the module docstring)."""
    fields: Dict[str, List[Any]] = {}
    for record in records:
        for name, value in record.items():
            fields.setdefault(name, []).append(value)
    out: Dict[str, Any] = {"num_images": len(records)}
    flops = [f for f in fields if f == GFLOPS or f.startswith(GFLOPS + "_")]
    for name in sorted(flops, key=lambda f: (f != GFLOPS, f)):
        out[name] = _mean(fields[name])
    for name, values in fields.items():
        if name in flops:
            continue
        if all(isinstance(v, list) for v in values):
            lengths = sorted({len(v) for v in values})
            if len(lengths) != 1:
                raise ValueError(f"cost field {name!r} holds lists of different lengths {lengths}; cannot average them")
            out[f"{name}_mean"] = [_mean(column) for column in zip(*values)]
        elif any(isinstance(v, list) for v in values):
            raise ValueError(f"cost field {name!r} mixes numbers and lists across images")
        else:
            out[f"{name}_mean"] = _mean(values)
            if all(isinstance(v, numbers.Integral) for v in values):
                counts = Counter(int(v) for v in values)
                out[f"{name}_histogram"] = {str(k): counts[k] for k in sorted(counts)}
    return out


class EfficiencyEvaluator(DatasetEvaluator):
    """Aggregates the ``"cost"`` records of a model's outputs; ``{}`` when no output has one."""

    def __init__(self, model: nn.Module) -> None:
        from .flops import FlopCounter

        self.model = model
        self._counter = FlopCounter(model)
        self._records: List[Dict[str, Any]] = []

    def reset(self) -> None:
        self._records = []

    def process(self, inputs: List[Dict[str, Any]], outputs: List[Dict[str, Any]]) -> None:
        for x, out in zip(inputs, outputs):
            if "cost" not in out:
                continue
            record = {name: _plain(value, name) for name, value in dict(out["cost"]).items()}
            if GFLOPS not in record:
                images = self.model.preprocess_image([x]).tensor  # 1 x 3 x H x W, padded
                counted = self._counter.for_image(images, out["cost"])
                record.update({GFLOPS if k == "total" else f"{GFLOPS}_{k}": v for k, v in counted.items()})
            self._records.append(record)

    def evaluate(self) -> Dict[str, Any] | None:
        from ..utils import comm

        records = [r for part in comm.all_gather(self._records) for r in part]
        if not comm.is_main_process():
            return None
        if not records:
            return {}
        return {"cost": summarize_costs(records)}
