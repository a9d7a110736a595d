"""Checkpoint I/O: Detectron2 .pkl (restricted unpickling), .pth, safetensors; key maps; load reports."""
from __future__ import annotations

from .io import (
    SUPPORTED_EXTENSIONS,
    CheckpointError,
    CheckpointFile,
    UnsafeCheckpointError,
    load_state_dict_file,
    read_checkpoint,
    resolve_checkpoint_path,
    save_checkpoint,
)
from .loader import CheckpointMismatchError, KeyMap, LoadReport, load_weights

__all__ = [
    "SUPPORTED_EXTENSIONS",
    "CheckpointError",
    "CheckpointFile",
    "CheckpointMismatchError",
    "KeyMap",
    "LoadReport",
    "UnsafeCheckpointError",
    "load_state_dict_file",
    "load_weights",
    "read_checkpoint",
    "resolve_checkpoint_path",
    "save_checkpoint",
]
