"""Class names, colours and thing flags of a dataset, indexed by contiguous class id.

Drawings colour every segment by its class, so the same class has the same colour in the
ground truth, in the prediction and in the legend. The catalog metadata follows
Mask2Former's conventions, which differ by dataset kind:

* panoptic and semantic datasets list *every* class in ``stuff_classes`` / ``stuff_colors``
  (contiguous id = position there); the thing classes are the values of
  ``thing_dataset_id_to_contiguous_id`` (or, without it, the names in ``thing_classes``);
* instance datasets list only ``thing_classes`` / ``thing_colors``, every class a thing.

Missing colours come from a fixed palette, so a drawing never depends on chance.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Sequence

import numpy as np

__all__ = ["ClassPalette"]


def _colors(colors: Optional[Sequence[Sequence[int]]], n: int, where: str) -> np.ndarray:
    """``n`` x 3 uint8 colours from the metadata, or the project's palette when absent."""
    if not colors:
        from ..data.datasets.common import palette

        return np.asarray(palette(n), dtype=np.uint8).reshape(n, 3)
    arr = np.asarray(colors, dtype=np.int64)
    if arr.shape != (n, 3) or arr.min() < 0 or arr.max() > 255:
        raise ValueError(f"{where}: expected {n} RGB colours in 0..255, got an array of shape {arr.shape}")
    return arr.astype(np.uint8)


@dataclass(frozen=True)
class ClassPalette:
    """``names[c]``, ``colors[c]`` (RGB uint8) and ``is_thing[c]`` of contiguous class id ``c``."""

    names: tuple[str, ...]
    colors: np.ndarray  # K x 3 uint8
    is_thing: tuple[bool, ...]

    def __post_init__(self) -> None:
        k = len(self.names)
        if self.colors.shape != (k, 3) or len(self.is_thing) != k:
            raise ValueError(f"ClassPalette needs one colour and one thing flag per class ({k} classes)")

    def __len__(self) -> int:
        return len(self.names)

    def check(self, class_id: int, where: str) -> int:
        """``class_id`` as an int, or ValueError naming ``where`` when no class has that id."""
        c = int(class_id)
        if not 0 <= c < len(self.names):
            raise ValueError(f"{where}: class id {c} is outside the {len(self.names)} classes of the dataset")
        return c

    @classmethod
    def from_metadata(cls, metadata: Any) -> "ClassPalette":
        """The palette of a catalog :class:`~eco_m2f.data.catalog.Metadata` (see the module docstring)."""
        name = getattr(metadata, "name", "?")
        stuff = metadata.get("stuff_classes", None)
        things = metadata.get("thing_classes", None)
        thing_map = metadata.get("thing_dataset_id_to_contiguous_id", None)
        if stuff:
            names = tuple(str(s) for s in stuff)
            colors = _colors(metadata.get("stuff_colors", None), len(names), f"stuff_colors of dataset '{name}'")
            if thing_map:
                thing_ids = {int(v) for v in thing_map.values()}
                if max(thing_ids) >= len(names):
                    raise ValueError(
                        f"Dataset '{name}': thing_dataset_id_to_contiguous_id maps to class {max(thing_ids)}, "
                        f"but stuff_classes lists only {len(names)} classes"
                    )
            else:
                thing_names = set(things or ())
                thing_ids = {i for i, n in enumerate(names) if n in thing_names}
            return cls(names, colors, tuple(i in thing_ids for i in range(len(names))))
        if things:
            names = tuple(str(s) for s in things)
            colors = _colors(metadata.get("thing_colors", None), len(names), f"thing_colors of dataset '{name}'")
            return cls(names, colors, (True,) * len(names))
        raise ValueError(f"Metadata of dataset '{name}' has neither stuff_classes nor thing_classes to name the classes")

    @classmethod
    def generic(cls, num_classes: int) -> "ClassPalette":
        """``class 0`` ... ``class K-1`` in palette colours, for a model without dataset metadata."""
        return cls(tuple(f"class {i}" for i in range(num_classes)), _colors(None, num_classes, ""), (False,) * num_classes)
