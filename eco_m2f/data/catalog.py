"""Detectron2-style dataset and metadata catalogs.

``DatasetCatalog`` maps a dataset name to a function returning its list of dataset dicts
(called lazily, so registering a dataset never touches the disk); ``MetadataCatalog`` maps a
name to a :class:`Metadata` attribute bag (class names, colours, id maps, paths, evaluator type).

Paths that depend on ``$DETECTRON2_DATASETS`` are stored as :class:`DatasetPath` values and
resolved each time they are read, so changing the environment variable after import (as tests
and notebooks do) takes effect.
"""
from __future__ import annotations

import difflib
import enum
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Optional

__all__ = [
    "BoxMode",
    "DatasetCatalog",
    "DatasetPath",
    "Metadata",
    "MetadataCatalog",
    "datasets_root",
]


def datasets_root() -> str:
    """The datasets folder: ``$DETECTRON2_DATASETS`` or ``./datasets``, read at call time."""
    return os.path.expanduser(os.environ.get("DETECTRON2_DATASETS", "datasets"))


class BoxMode(enum.IntEnum):
    """Box formats in dataset dicts; values equal Detectron2's ``BoxMode`` enum."""

    XYXY_ABS = 0
    XYWH_ABS = 1


@dataclass(frozen=True)
class DatasetPath:
    """A path relative to :func:`datasets_root`, resolved when read.

    ``before_read`` (optional) runs first, e.g. to generate a missing synthetic dataset.
    """

    relative: str
    before_read: Optional[Callable[[], Any]] = None

    def resolve(self) -> str:
        if self.before_read is not None:
            self.before_read()
        return os.path.join(datasets_root(), self.relative)

    def __str__(self) -> str:  # for printing metadata without triggering anything
        return os.path.join("$DETECTRON2_DATASETS", self.relative)


def _resolve(value: Any) -> Any:
    return value.resolve() if isinstance(value, DatasetPath) else value


class Metadata:
    """Attribute bag for one dataset (Detectron2 semantics).

    ``set(**kw)`` adds fields; re-setting a field to a *different* value is an error, because
    two registrations disagreeing on e.g. class names is always a bug.
    Reading a missing field raises AttributeError listing the fields that exist.
    """

    def __init__(self, name: str = "", **kwargs: Any) -> None:
        object.__setattr__(self, "name", name)
        object.__setattr__(self, "_fields", {})
        if kwargs:
            self.set(**kwargs)

    def __getattr__(self, key: str) -> Any:
        fields = self.__dict__.get("_fields", {})
        if key in fields:
            return _resolve(fields[key])
        if key.startswith("__"):
            raise AttributeError(key)
        close = difflib.get_close_matches(key, list(fields), n=1)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        raise AttributeError(
            f"Metadata of dataset '{self.name}' has no field '{key}'.{hint} "
            f"Available fields: {sorted(fields)}"
        )

    def __setattr__(self, key: str, value: Any) -> None:
        if key == "name":
            raise AttributeError("the name of a Metadata object cannot be changed")
        fields = self._fields
        if key in fields:
            old = fields[key]
            if old != value:
                raise ValueError(
                    f"Metadata field '{key}' of dataset '{self.name}' is already set to {old!r}; "
                    f"refusing to change it to {value!r}"
                )
            return
        fields[key] = value

    def __delattr__(self, key: str) -> None:
        del self._fields[key]

    def set(self, **kwargs: Any) -> "Metadata":
        """Set several fields at once; returns self."""
        for k, v in kwargs.items():
            setattr(self, k, v)
        return self

    def get(self, key: str, default: Any = None) -> Any:
        """Field value (paths resolved) or ``default`` when absent."""
        if key in self._fields:
            return _resolve(self._fields[key])
        return default

    def __contains__(self, key: str) -> bool:
        return key in self._fields

    def as_dict(self) -> dict[str, Any]:
        """All fields with paths resolved (may trigger synthetic-dataset generation)."""
        return {k: _resolve(v) for k, v in self._fields.items()}

    def __repr__(self) -> str:
        items = ", ".join(f"{k}={str(v) if isinstance(v, DatasetPath) else v!r}" for k, v in self._fields.items())
        return f"Metadata(name={self.name!r}, {items})"


def _unknown_name_message(kind: str, name: str, known: list[str]) -> str:
    close = difflib.get_close_matches(name, known, n=3)
    hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    return f"{kind} '{name}' is not registered.{hint} Registered: {sorted(known)}"


class _DatasetCatalog:
    """name -> function returning ``list[dict]`` (Detectron2's DatasetCatalog)."""

    def __init__(self) -> None:
        self._funcs: dict[str, Callable[[], list[dict]]] = {}

    def register(self, name: str, func: Callable[[], list[dict]]) -> None:
        if not callable(func):
            raise TypeError(f"DatasetCatalog.register('{name}', ...) needs a callable, got {type(func).__name__}")
        if name in self._funcs:
            raise ValueError(f"Dataset '{name}' is already registered")
        self._funcs[name] = func

    def get(self, name: str) -> list[dict]:
        """Call the loader of ``name``; unknown names fail with the closest registered ones."""
        try:
            func = self._funcs[name]
        except KeyError:
            raise KeyError(_unknown_name_message("Dataset", name, list(self._funcs))) from None
        dicts = func()
        if not isinstance(dicts, list):
            raise TypeError(f"The loader of dataset '{name}' returned {type(dicts).__name__}, expected a list of dicts")
        return dicts

    def list(self) -> list[str]:
        return list(self._funcs)

    def remove(self, name: str) -> None:
        self._funcs.pop(name)

    def __contains__(self, name: str) -> bool:
        return name in self._funcs


class _MetadataCatalog:
    """name -> :class:`Metadata`; ``get`` creates an empty one on first use (as Detectron2)."""

    def __init__(self) -> None:
        self._metas: dict[str, Metadata] = {}

    def get(self, name: str) -> Metadata:
        if name not in self._metas:
            self._metas[name] = Metadata(name=name)
        return self._metas[name]

    def list(self) -> list[str]:
        return list(self._metas)

    def remove(self, name: str) -> None:
        self._metas.pop(name)

    def __contains__(self, name: str) -> bool:
        return name in self._metas


DatasetCatalog = _DatasetCatalog()
MetadataCatalog = _MetadataCatalog()
