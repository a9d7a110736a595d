"""A strict ``CfgNode``: unknown keys fail with the closest valid key named.

fvcore's node already rejects unknown keys, but with a bare ``KeyError``. Users who come
from Detectron2 mistype long dotted keys; naming the nearest valid key saves a round trip.
"""
from __future__ import annotations

import difflib
import os
from typing import Any, Iterator, List

from fvcore.common.config import CfgNode as _FvcoreCfgNode

BASE_KEY = "_BASE_"


class ConfigKeyError(KeyError):
    """An unknown or misspelled config key."""

    def __str__(self) -> str:  # KeyError quotes its message; keep it readable
        return str(self.args[0]) if self.args else ""


def _flatten(node: Any, prefix: str = "") -> Iterator[str]:
    for key, value in node.items():
        full = f"{prefix}{key}"
        yield full
        if isinstance(value, dict):
            yield from _flatten(value, full + ".")


class CfgNode(_FvcoreCfgNode):
    """fvcore CfgNode whose merges validate every key first and suggest corrections."""

    def all_keys(self) -> List[str]:
        """Every dotted key of this node, parents included."""
        return list(_flatten(self))

    def _check_keys(self, keys: List[str], source: str) -> None:
        valid = set(self.all_keys())
        for key in keys:
            if key in valid or key == BASE_KEY:
                continue
            parent = key.rsplit(".", 1)[0] if "." in key else ""
            if parent and parent in valid and self._is_new_allowed(parent):
                continue
            close = difflib.get_close_matches(key, sorted(valid), n=1, cutoff=0.0)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            raise ConfigKeyError(f"Unknown config key '{key}' in {source}{hint}")

    def _is_new_allowed(self, dotted: str) -> bool:
        node: Any = self
        for part in dotted.split("."):
            node = node[part]
        return isinstance(node, _FvcoreCfgNode) and node.is_new_allowed()

    def merge_from_file(self, cfg_filename: str, allow_unsafe: bool = True) -> None:
        """Merge a YAML file (with `_BASE_`). Like Detectron2, python tags are allowed:
        official Mask2Former configs compute `INPUT.MIN_SIZE_TRAIN` with one."""
        if not os.path.isfile(cfg_filename):
            raise FileNotFoundError(f"Config file not found: {cfg_filename}")
        loaded = self.load_yaml_with_base(cfg_filename, allow_unsafe=allow_unsafe)
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ValueError(f"Config file {cfg_filename} does not hold a mapping at its top level")
        self._check_keys(list(_flatten(loaded)), f"config file {cfg_filename}")
        self.merge_from_other_cfg(type(self)(loaded))

    def merge_from_list(self, cfg_list: List[str]) -> None:
        if len(cfg_list) % 2 != 0:
            raise ValueError(
                f"Command-line overrides must be KEY VALUE pairs; got an odd number of items: {cfg_list}"
            )
        self._check_keys(list(cfg_list[0::2]), "the command-line overrides")
        super().merge_from_list(cfg_list)
