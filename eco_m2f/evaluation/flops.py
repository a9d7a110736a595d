"""GFLOPs of a model's network with fvcore: total and the scopes the model names.

What is counted is ``model.network(images, cost)`` (DESIGN.md section 8): the network proper on
a normalised, padded batch, without pre- or post-processing, as papers report it. fvcore
counts one fused multiply-add as one flop, with its own handles (convolutions, linear layers,
matrix products, norms, resampling) plus the project's (:mod:`.flop_handles`: attention through
``scaled_dot_product_attention`` and ``nn.MultiheadAttention``'s fused path; the deformable-
attention op). Detectron2's ignore list (elementwise and reduction operators, ``batch_norm``)
counts 0, as in Detectron2's ``FlopCountAnalysis``. Every other operator without a handle counts
0 too, and is reported once per process by name (a logged warning): nothing is silenced.

A model whose cost depends on the image (``model.dynamic_cost``) is counted per image along the
path its cost record describes; :class:`FlopCounter` caches counts only where the padded size
and ``model.cost_signature(record)`` fix them.
"""
from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Dict, Hashable, List, Mapping, Optional, Set, Tuple

import torch
import torch.nn as nn

from .flop_handles import ATTENTION_FLOP_HANDLES, DETECTRON2_IGNORED_OPS

__all__ = ["FlopCounter", "FlopReport", "activation_counts", "count_flops", "flop_handles", "flop_report"]

logger = logging.getLogger(__name__)

# Operators already reported as uncounted in this process (each is reported once).
_REPORTED: Set[str] = set()


def flop_handles() -> Dict[str, Any]:
    """Every fvcore handle the project adds: attention operators and the deformable-attention op."""
    from ..modeling.pixel_decoder.ms_deform_attn import DEFORMABLE_ATTENTION_FLOP_HANDLES

    return {**ATTENTION_FLOP_HANDLES, **DEFORMABLE_ATTENTION_FLOP_HANDLES}


def _tensors(out: Any) -> List[torch.Tensor]:
    """The tensors of a (nested) dict/list/tuple, in order: what a JIT trace may return."""
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, Mapping):
        return [t for v in out.values() for t in _tensors(v)]
    if isinstance(out, (list, tuple)):
        return [t for v in out for t in _tensors(v)]
    return []


class _Network(nn.Module):
    """``model.network(images, cost)`` as a module whose output is a tuple of tensors (traceable)."""

    def __init__(self, model: nn.Module, cost: Optional[Mapping[str, Any]]) -> None:
        super().__init__()
        self.model = model
        self.cost = cost

    def forward(self, images: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        out = _tensors(self.model.network(images, self.cost))
        if not out:
            raise TypeError(f"{type(self.model).__name__}.network() returned no tensor to trace")
        return tuple(out)


@dataclass
class FlopReport:
    """One fvcore count of ``model.network(images, cost)``, per image of the batch."""

    gflops: Dict[str, float]  # "total" and one entry per model.flop_scopes() name
    by_operator: Dict[str, float]  # counted operator (fvcore's short name) -> GFLOPs
    # child module of the model (backbone, sem_seg_head...) -> operator -> GFLOPs
    by_child: Dict[str, Dict[str, float]] = field(default_factory=dict)
    uncounted: Dict[str, int] = field(default_factory=dict)  # operator without a handle -> calls
    ignored: Dict[str, int] = field(default_factory=dict)  # operator of Detectron2's ignore list -> calls


def _report_uncounted(ops: Mapping[str, int], model_name: str) -> None:
    new = {op: n for op, n in ops.items() if op not in _REPORTED}
    if not new:
        return
    _REPORTED.update(new)
    listing = ", ".join(f"{op} ({n}x)" for op, n in sorted(new.items()))
    logger.warning("FLOPs of %s: no fvcore handle for %s; counted as 0", model_name, listing)


def flop_report(model: nn.Module, images: torch.Tensor, cost: Optional[Mapping[str, Any]] = None) -> FlopReport:
    """Count ``model.network(images, cost)`` (B x 3 x H x W, normalised and padded); GFLOPs per image."""
    from fvcore.nn import FlopCountAnalysis

    if images.dim() != 4:
        raise ValueError(f"images must be a B x C x H x W batch, got shape {tuple(images.shape)}")
    scopes = dict(model.flop_scopes())
    modules = dict(model.named_modules())
    unknown = sorted(name for name, path in scopes.items() if path not in modules)
    if unknown:
        raise ValueError(
            f"{type(model).__name__}.flop_scopes() names {[scopes[n] for n in unknown]}, "
            "which are not submodules of the model"
        )
    ignored: Counter = Counter()

    def ignore(op: str):
        def handle(inputs: List[Any], outputs: List[Any]) -> Counter:
            ignored[op] += 1
            return Counter()

        return handle

    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            analysis = FlopCountAnalysis(_Network(model, cost), (images,))
            analysis.set_op_handle(**flop_handles())
            analysis.set_op_handle(**{op: ignore(op) for op in DETECTRON2_IGNORED_OPS})
            # reported below, once per operator name and process, instead of once per count
            analysis.unsupported_ops_warnings(False)
            analysis.uncalled_modules_warnings(False)
            total = analysis.total()
            by_module = analysis.by_module()
            by_operator = analysis.by_operator()
            by_module_operator = analysis.by_module_and_operator()
            uncounted = dict(analysis.unsupported_ops())
    finally:
        model.train(was_training)
    _report_uncounted(uncounted, type(model).__name__)
    batch = images.shape[0]
    gflops = {"total": total / batch / 1e9}
    for name, path in scopes.items():
        gflops[name] = by_module.get(f"model.{path}", 0) / batch / 1e9
    by_child = {
        name: {op: n / batch / 1e9 for op, n in by_module_operator.get(f"model.{name}", {}).items()}
        for name, _ in model.named_children()
    }
    return FlopReport(
        gflops=gflops,
        by_operator={op: n / batch / 1e9 for op, n in sorted(by_operator.items(), key=lambda kv: -kv[1])},
        by_child={name: ops for name, ops in by_child.items() if ops},
        uncounted=uncounted,
        ignored=dict(ignored),
    )


def count_flops(model: nn.Module, images: torch.Tensor, cost: Optional[Mapping[str, Any]] = None) -> Dict[str, float]:
    """GFLOPs per image of ``model.network(images, cost)``: {"total": ..., <scope>: ...}."""
    return flop_report(model, images, cost).gflops


def activation_counts(model: nn.Module, images: torch.Tensor, cost: Optional[Mapping[str, Any]] = None) -> Dict[str, float]:
    """fvcore's activation count of ``model.network(images, cost)`` per image: output elements of
    convolutions and matrix products, in total and per child module of the model."""
    from fvcore.nn import ActivationCountAnalysis

    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            analysis = ActivationCountAnalysis(_Network(model, cost), (images,))
            analysis.unsupported_ops_warnings(False)  # activations are counted for a few operators only
            analysis.uncalled_modules_warnings(False)
            by_module = analysis.by_module()
    finally:
        model.train(was_training)
    batch = images.shape[0]
    out = {"total": by_module.get("", 0) / batch}
    for name, _ in model.named_children():
        if by_module.get(f"model.{name}", 0):
            out[name] = by_module[f"model.{name}"] / batch
    return out


class FlopCounter:
    """GFLOPs of single images, cached where the model says the cost cannot differ.

    The key is (padded H, padded W, ``model.cost_signature(cost)``); a model with
    ``dynamic_cost`` whose signature is None (its path depends on what it sees) is counted
    again for every image.
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self._cache: Dict[Hashable, Dict[str, float]] = {}

    def for_image(self, images: torch.Tensor, cost: Optional[Mapping[str, Any]] = None) -> Dict[str, float]:
        """GFLOPs of ``images`` (1 x 3 x H x W, normalised and padded) along the path of ``cost``."""
        if images.dim() != 4 or images.shape[0] != 1:
            raise ValueError(f"for_image counts one image: expected 1 x C x H x W, got {tuple(images.shape)}")
        signature = None if cost is None else self.model.cost_signature(cost)
        if signature is None and self.model.dynamic_cost:
            return count_flops(self.model, images, cost)
        key = (int(images.shape[-2]), int(images.shape[-1]), signature)
        if key not in self._cache:
            self._cache[key] = count_flops(self.model, images, cost)
        return self._cache[key]
