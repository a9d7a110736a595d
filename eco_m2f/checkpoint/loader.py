"""Loading a checkpoint into a model, with key maps and a report that fails loudly.

How keys are matched (in this order):

1. ``key_map`` (argument): a ``{old: new}`` dict, or a callable taking the whole state dict and
   returning the renamed one (whole-dict, because some formats can only be told apart from
   the set of keys, e.g. Swin's downsample placement).
2. The model's own map, found automatically. First, if the model defines
   ``model.checkpoint_layout_map(state_dict) -> state_dict``, a whole-model release layout is
   renamed to the model's own (Segmenter: the official ``encoder.*`` / ``decoder.*``); then

   * ``model.checkpoint_key_map(state_dict) -> state_dict`` if the model defines it (full keys);
   * otherwise, if the model has a ``backbone`` attribute that defines ``checkpoint_key_map``
     (every :class:`~eco_m2f.modeling.backbone.base.Backbone` does), the ``backbone.*`` part of
     the checkpoint goes through it (prefix stripped, then put back). Detectron2 names
     (``backbone.stem.conv1.weight``, ``backbone.res2.0.conv1.norm.running_mean``,
     ``backbone.layers.0.downsample...``) and timm/torchvision names become ours.

3. Backbone-only checkpoints (Detectron2's ``matching_heuristics`` files such as ImageNet
   ``R-50.pkl`` with keys ``stem.conv1.weight``, ``res2.0.conv1.weight``, torchvision/timm
   ImageNet weights ``conv1.weight``, ``layer1.0...``): when the checkpoint, read as backbone
   weights (``backbone.`` prefixed, then step 2), matches more of the model's keys than read as
   a full-model checkpoint, it is taken to be the backbone's. Model keys outside the backbone, and the
   backbone keys that ImageNet weights never hold (``Backbone.keys_not_in_pretrained_weights``,
   e.g. Swin's output norms), are then expected to be absent: they are listed in
   ``LoadReport.untouched`` instead of ``missing``.

A model may list keys it filled itself from another file in ``model.keys_loaded_elsewhere()``
(ECO-M2F's gate from ``MODEL.ECO.GATE.WEIGHTS``); those may be absent from the checkpoint.

BatchNorm's ``num_batches_tracked`` is benign either way: absent from a FrozenBN checkpoint
(it stays as initialised, listed in ``untouched``) and extra in a SyncBN checkpoint loaded into
a FrozenBN model (ignored, listed in ``ignored``).

Everything else that does not match (missing keys, unexpected keys, shape mismatches) raises
:class:`CheckpointMismatchError` listing the keys and shapes, unless the matching ``allow_*``
flag is set; then the report is logged as a warning and the matching tensors are loaded.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Union

import torch
import torch.nn as nn

from ..utils.modules import unwrap_model
from .io import CheckpointError, CheckpointFile, read_checkpoint, split_layout, to_tensor

__all__ = ["LoadReport", "CheckpointMismatchError", "load_weights", "KeyMap"]

logger = logging.getLogger(__name__)

StateDict = dict[str, torch.Tensor]
KeyMap = Union[Mapping[str, str], Callable[[StateDict], Mapping[str, torch.Tensor]]]
Shape = tuple[int, ...]

_NBT = ".num_batches_tracked"
_LIST_LIMIT = 200


@dataclass
class LoadReport:
    """What :func:`load_weights` did.

    Attributes:
        missing: model keys the checkpoint lacks (an error unless ``allow_missing``).
        unexpected: checkpoint keys (after mapping) the model lacks (error unless ``allow_unexpected``).
        shape_mismatch: ``(key, checkpoint shape, model shape)`` (error unless ``allow_shape_mismatch``).
        loaded: model keys that were loaded.
        untouched: model keys the checkpoint does not cover by design (the head for a
            backbone-only checkpoint, ``num_batches_tracked``), left as initialised.
        ignored: checkpoint keys skipped by design (``num_batches_tracked`` into FrozenBN).
        backbone_only: the checkpoint was recognised as backbone weights only.
        source: the file (or "<state dict>").
    """

    missing: list[tuple[str, Shape]] = field(default_factory=list)
    unexpected: list[tuple[str, Shape]] = field(default_factory=list)
    shape_mismatch: list[tuple[str, Shape, Shape]] = field(default_factory=list)
    loaded: list[str] = field(default_factory=list)
    untouched: list[str] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)
    backbone_only: bool = False
    source: str = "<state dict>"

    @property
    def missing_keys(self) -> list[str]:
        return [k for k, _ in self.missing]

    @property
    def unexpected_keys(self) -> list[str]:
        return [k for k, _ in self.unexpected]

    @property
    def mismatched_keys(self) -> list[str]:
        return [k for k, _, _ in self.shape_mismatch]

    @property
    def clean(self) -> bool:
        """True when every model key was loaded or is untouched by design."""
        return not (self.missing or self.unexpected or self.shape_mismatch)

    def summary(self) -> str:
        """Human-readable report: counts, then every problem key with its shapes."""
        kind = "backbone-only checkpoint" if self.backbone_only else "checkpoint"
        lines = [
            f"Loading {kind} '{self.source}': {len(self.loaded)} tensors loaded, "
            f"{len(self.missing)} missing, {len(self.unexpected)} unexpected, "
            f"{len(self.shape_mismatch)} with a different shape, {len(self.untouched)} left as initialised."
        ]

        def _block(title: str, rows: list[str]) -> None:
            if not rows:
                return
            lines.append(f"{title} ({len(rows)}):")
            lines.extend(f"  {r}" for r in rows[:_LIST_LIMIT])
            if len(rows) > _LIST_LIMIT:
                lines.append(f"  ... and {len(rows) - _LIST_LIMIT} more")

        _block("Missing in checkpoint (model shape)", [f"{k} {list(s)}" for k, s in self.missing])
        _block("Unexpected in checkpoint (checkpoint shape)", [f"{k} {list(s)}" for k, s in self.unexpected])
        _block(
            "Shape mismatch (checkpoint shape vs model shape)",
            [f"{k}: {list(a)} vs {list(b)}" for k, a, b in self.shape_mismatch],
        )
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.summary()


class CheckpointMismatchError(CheckpointError):
    """The checkpoint's keys/shapes do not match the model (see ``.report``)."""

    def __init__(self, report: LoadReport, allowed: str = ""):
        self.report = report
        hint = (
            "\nPass allow_missing/allow_unexpected/allow_shape_mismatch=True to load anyway"
            f"{allowed}, or a key_map that renames the checkpoint's keys."
        )
        super().__init__(report.summary() + hint)


# --------------------------------------------------------------------------- helpers


def _as_state_dict(obj: Any, source: str) -> tuple[StateDict, bool]:
    """(tensor state dict, matching_heuristics) from a CheckpointFile or a (wrapped) mapping."""
    if isinstance(obj, CheckpointFile):
        return dict(obj.state_dict), obj.matching_heuristics
    if not isinstance(obj, Mapping):
        raise TypeError(f"load_weights expects a path, a CheckpointFile or a state dict, got {type(obj).__name__}")
    inner, extra = split_layout(obj, source)
    sd = {k: to_tensor(v, k, source) for k, v in inner.items()}
    return sd, bool(extra.get("matching_heuristics", False))


def _apply_key_map(sd: StateDict, key_map: KeyMap) -> StateDict:
    if isinstance(key_map, Mapping):
        return {key_map.get(k, k): v for k, v in sd.items()}
    if not callable(key_map):
        raise TypeError(f"key_map must be a dict or a callable, got {type(key_map).__name__}")
    out = key_map(dict(sd))
    if not isinstance(out, Mapping):
        raise TypeError(f"key_map returned {type(out).__name__}; it must return the renamed state dict")
    return dict(out)


def _strip_wrapper_prefix(sd: StateDict, top_level: set[str]) -> StateDict:
    """Drop a ``module.`` (DDP) or ``model.`` (wrapper module) prefix shared by every key."""
    for prefix in ("module.", "model."):
        name = prefix[:-1]
        if sd and name not in top_level and all(k.startswith(prefix) for k in sd):
            return {k[len(prefix):]: v for k, v in sd.items()}
    return sd


def _first(key: str) -> str:
    return key.split(".", 1)[0]


# --------------------------------------------------------------------------- main entry


def load_weights(
    model: nn.Module,
    path_or_state_dict: str | os.PathLike | Mapping[str, Any] | CheckpointFile,
    key_map: KeyMap | None = None,
    allow_missing: bool = False,
    allow_unexpected: bool = False,
    allow_shape_mismatch: bool = False,
) -> LoadReport:
    """Load a checkpoint (file or state dict) into ``model``; see the module docstring.

    Raises:
        CheckpointMismatchError: keys/shapes differ and the corresponding ``allow_*`` is False.
            Nothing is loaded in that case.
    """
    model = unwrap_model(model)
    if isinstance(path_or_state_dict, (str, os.PathLike)):
        ckpt = read_checkpoint(path_or_state_dict)
        source = ckpt.path
        sd, matching_heuristics = _as_state_dict(ckpt, source)
    else:
        source = getattr(path_or_state_dict, "path", "") or "<state dict>"
        sd, matching_heuristics = _as_state_dict(path_or_state_dict, source)

    if key_map is not None:
        sd = _apply_key_map(sd, key_map)

    model_sd = model.state_dict()
    top_level = {_first(k) for k in model_sd}
    sd = _strip_wrapper_prefix(sd, top_level)

    layout_map = getattr(model, "checkpoint_layout_map", None)
    if callable(layout_map):
        sd = dict(layout_map(sd))

    backbone_only = False
    exempt: set[str] = set()
    model_map = getattr(model, "checkpoint_key_map", None)
    backbone = getattr(model, "backbone", None)
    backbone_map = getattr(backbone, "checkpoint_key_map", None) if isinstance(backbone, nn.Module) else None
    if callable(model_map):
        sd = dict(model_map(sd))
    elif callable(backbone_map):

        def through_backbone_map(full: StateDict) -> StateDict:
            bb = {k[len("backbone."):]: v for k, v in full.items() if k.startswith("backbone.")}
            rest = {k: v for k, v in full.items() if not k.startswith("backbone.")}
            return {**rest, **{f"backbone.{k}": v for k, v in backbone_map(bb).items()}}

        as_full = through_backbone_map(sd)
        as_backbone = through_backbone_map({f"backbone.{k}": v for k, v in sd.items()})
        # A backbone-only checkpoint is one that matches the model better with "backbone." in front
        # (Detectron2's matching_heuristics flag decides ties).
        hits_backbone = len(as_backbone.keys() & model_sd.keys())
        hits_full = len(as_full.keys() & model_sd.keys())
        if hits_backbone > hits_full or (matching_heuristics and hits_backbone == hits_full > 0):
            backbone_only = True
            sd = as_backbone
            exempt_fn = getattr(backbone, "keys_not_in_pretrained_weights", None)
            if callable(exempt_fn):
                exempt = {f"backbone.{k}" for k in exempt_fn()}
        else:
            sd = as_full

    # Keys the model filled itself from another file (e.g. an ECO gate from MODEL.ECO.GATE.WEIGHTS).
    elsewhere = getattr(model, "keys_loaded_elsewhere", None)
    if callable(elsewhere):
        exempt |= set(elsewhere())

    report = LoadReport(backbone_only=backbone_only, source=source)
    to_load: StateDict = {}
    for key, value in sd.items():
        target = model_sd.get(key)
        if target is None:
            if key.endswith(_NBT) and key[: -len(_NBT)] + ".running_mean" in model_sd:
                report.ignored.append(key)
            else:
                report.unexpected.append((key, tuple(value.shape)))
            continue
        if tuple(value.shape) != tuple(target.shape):
            report.shape_mismatch.append((key, tuple(value.shape), tuple(target.shape)))
            continue
        to_load[key] = value
        report.loaded.append(key)
    for key, target in model_sd.items():
        if key in sd:
            continue
        benign = key.endswith(_NBT) or key in exempt or (backbone_only and not key.startswith("backbone."))
        if benign:
            report.untouched.append(key)
        else:
            report.missing.append((key, tuple(target.shape)))

    refused = []
    if report.missing and not allow_missing:
        refused.append("missing keys")
    if report.unexpected and not allow_unexpected:
        refused.append("unexpected keys")
    if report.shape_mismatch and not allow_shape_mismatch:
        refused.append("shape mismatches")
    if refused:
        raise CheckpointMismatchError(report, allowed=f" (refused: {', '.join(refused)})")

    with torch.no_grad():
        incompatible = model.load_state_dict(to_load, strict=False)
    leftover = [k for k in incompatible.unexpected_keys if not k.endswith(_NBT)]
    if leftover:  # pragma: no cover - would be a bug in the bookkeeping above
        raise CheckpointError(f"load_state_dict rejected keys it was given: {leftover[:20]}")

    if report.clean:
        logger.info(
            "Loaded %d tensors from '%s'%s (%d left as initialised).",
            len(report.loaded),
            source,
            " (backbone only)" if backbone_only else "",
            len(report.untouched),
        )
    else:
        logger.warning("%s", report.summary())
    return report
