"""Reading and writing checkpoint files.

Supported inputs:

* Detectron2 ``.pkl``: a pickled ``{"model": {name: ndarray}, "__author__": str,
  "matching_heuristics": bool}`` or a bare ``{name: ndarray}``. Pickle can run arbitrary code,
  so these files are read with a restricted unpickler that only resolves numpy's array, dtype
  and scalar reconstructors and plain containers; any other global aborts the read *before*
  it is called, with an error naming the file and the global.
* ``.pth`` / ``.pt`` / ``.ckpt``: ``torch.load(weights_only=True)`` holding ``{"model": sd}``,
  ``{"state_dict": sd}`` or a bare state dict.
* ``.safetensors``: ``safetensors.torch.load_file``.

``detectron2://X`` (Detectron2's model-zoo prefix) and ``http(s)://`` paths are downloaded
into iopath's cache first.

Writing: :func:`save_checkpoint` writes ``{"model": state_dict, **extra}`` as ``.pth``
atomically (temporary file in the same folder + ``os.replace``), so a crash never leaves a
truncated checkpoint behind.
"""
from __future__ import annotations

import collections
import io
import os
import pickle
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch
import torch.nn as nn

from ..utils.file_io import atomic_open
from ..utils.modules import unwrap_model

__all__ = [
    "CheckpointError",
    "UnsafeCheckpointError",
    "CheckpointFile",
    "read_checkpoint",
    "load_state_dict_file",
    "save_checkpoint",
    "resolve_checkpoint_path",
    "SUPPORTED_EXTENSIONS",
]

PICKLE_EXTENSIONS = (".pkl", ".pickle")
TORCH_EXTENSIONS = (".pth", ".pt", ".ckpt", ".bin")
SAFETENSORS_EXTENSIONS = (".safetensors",)
SUPPORTED_EXTENSIONS = PICKLE_EXTENSIONS + TORCH_EXTENSIONS + SAFETENSORS_EXTENSIONS

# Detectron2's model zoo prefix, as detectron2.utils.file_io resolves it.
_D2_PREFIX = "detectron2://"
_D2_URL = "https://dl.fbaipublicfiles.com/detectron2/"


class CheckpointError(RuntimeError):
    """A checkpoint file cannot be read or has an unexpected layout."""


class UnsafeCheckpointError(CheckpointError, pickle.UnpicklingError):
    """A pickled checkpoint references a global outside the allow-list (it could run code)."""


# --------------------------------------------------------------------------- restricted unpickler


def _numpy_multiarray():
    """numpy's ``multiarray`` module under numpy 2 (``numpy._core``) and numpy 1 (``numpy.core``)."""
    core = getattr(np, "_core", None)
    if core is not None and hasattr(core, "multiarray"):
        return core.multiarray
    return np.core.multiarray  # pragma: no cover - numpy < 2


def _numpy_frombuffer():
    """numpy's private ``_frombuffer`` (protocol-5 array pickles), or None if absent."""
    for mod_name in ("numpy._core.numeric", "numpy.core.numeric"):
        try:
            mod = __import__(mod_name, fromlist=["_frombuffer"])
        except ImportError:  # pragma: no cover
            continue
        fn = getattr(mod, "_frombuffer", None)
        if fn is not None:
            return fn
    return None  # pragma: no cover


def _latin1_encode(text: str, encoding: str = "latin1") -> bytes:
    """``_codecs.encode`` restricted to latin-1: protocol-2 pickles store bytes this way."""
    if encoding.replace("-", "").replace("_", "").lower() not in ("latin1", "iso88591"):
        raise UnsafeCheckpointError(
            f"pickle asks for _codecs.encode with encoding {encoding!r}; only latin-1 is allowed"
        )
    return text.encode("latin-1")


def _allowed_globals() -> dict[tuple[str, str], Any]:
    multiarray = _numpy_multiarray()
    allowed: dict[tuple[str, str], Any] = {}
    for mod in ("numpy.core.multiarray", "numpy._core.multiarray"):
        allowed[(mod, "_reconstruct")] = multiarray._reconstruct
        allowed[(mod, "scalar")] = multiarray.scalar
    frombuffer = _numpy_frombuffer()
    if frombuffer is not None:
        for mod in ("numpy.core.numeric", "numpy._core.numeric"):
            allowed[(mod, "_frombuffer")] = frombuffer
    allowed[("numpy", "ndarray")] = np.ndarray
    allowed[("numpy", "dtype")] = np.dtype
    allowed[("collections", "OrderedDict")] = collections.OrderedDict
    allowed[("_codecs", "encode")] = _latin1_encode
    for mod in ("builtins", "__builtin__"):
        for name, obj in (
            ("dict", dict),
            ("list", list),
            ("tuple", tuple),
            ("set", set),
            ("frozenset", frozenset),
            ("str", str),
            ("bytes", bytes),
            ("bytearray", bytearray),
            ("int", int),
            ("float", float),
            ("bool", bool),
            ("complex", complex),
        ):
            allowed[(mod, name)] = obj
    return allowed


class _RestrictedUnpickler(pickle.Unpickler):
    """An Unpickler whose ``find_class`` only resolves the allow-list.

    ``find_class`` runs when the GLOBAL/STACK_GLOBAL opcode is read, i.e. before the
    REDUCE that would call the object, so a forbidden callable is never executed.
    """

    def __init__(self, file: io.BufferedIOBase, source: str):
        super().__init__(file, encoding="latin1")
        self._source = source
        self._allowed = _allowed_globals()

    def find_class(self, module: str, name: str) -> Any:
        obj = self._allowed.get((module, name))
        if obj is None:
            raise UnsafeCheckpointError(
                f"Refusing to read '{self._source}': it references the global '{module}.{name}', "
                "which is not allowed in a checkpoint (only numpy arrays/dtypes/scalars and plain "
                "containers are). The file may run code when unpickled; do not load it with pickle."
            )
        return obj

    def persistent_load(self, pid: Any) -> Any:
        raise UnsafeCheckpointError(
            f"Refusing to read '{self._source}': it uses pickle persistent ids ({pid!r}); this looks "
            "like a torch.save file, rename it to .pth so that torch.load(weights_only=True) reads it."
        )


def _restricted_pickle_load(path: Path) -> Any:
    with open(path, "rb") as f:
        try:
            return _RestrictedUnpickler(f, str(path)).load()
        except UnsafeCheckpointError:
            raise
        except Exception as exc:  # corrupt/truncated file
            raise CheckpointError(f"Cannot unpickle '{path}': {type(exc).__name__}: {exc}") from exc


# --------------------------------------------------------------------------- reading


@dataclass
class CheckpointFile:
    """What a checkpoint file holds, in torch tensors.

    Attributes:
        state_dict: parameter/buffer name -> CPU tensor, names as stored in the file.
        matching_heuristics: Detectron2's flag for backbone-only checkpoints whose keys are
            matched to the model by suffix (e.g. ImageNet ``R-50.pkl``: ``stem.conv1.weight``).
        author: Detectron2's ``__author__`` field (or "").
        path: the local file it was read from.
        extra: the file's other top-level entries (iteration, optimizer, ...), untouched.
    """

    state_dict: dict[str, torch.Tensor]
    matching_heuristics: bool = False
    author: str = ""
    path: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


def resolve_checkpoint_path(path: str | os.PathLike) -> Path:
    """Local path of a checkpoint; ``detectron2://`` and ``http(s)://`` are downloaded (cached)."""
    text = os.fspath(path)
    if text.startswith(_D2_PREFIX):
        text = _D2_URL + text[len(_D2_PREFIX):]
    if text.startswith(("http://", "https://")):
        from iopath.common.file_io import HTTPURLHandler, PathManager

        manager = PathManager()
        manager.register_handler(HTTPURLHandler())
        try:
            return Path(manager.get_local_path(text))
        except Exception as exc:
            raise CheckpointError(
                f"Cannot download checkpoint '{os.fspath(path)}' ({text}): {type(exc).__name__}: {exc}. "
                "Download it by hand and pass the local file instead."
            ) from exc
    local = Path(text).expanduser()
    if not local.is_file():
        hint = " (it is a directory)" if local.is_dir() else ""
        raise FileNotFoundError(f"Checkpoint file '{local}' does not exist{hint}.")
    return local


def to_tensor(value: Any, key: str, source: str) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, np.ndarray):
        if value.dtype == object:
            raise CheckpointError(f"'{source}': entry '{key}' is an object array, not numeric weights.")
        # (np.ascontiguousarray would turn 0-d arrays such as num_batches_tracked into 1-d)
        contiguous = value if value.flags.c_contiguous and value.flags.writeable else value.copy(order="C")
        return torch.from_numpy(contiguous)
    if isinstance(value, (np.generic, int, float, bool)):
        return torch.as_tensor(np.asarray(value))
    raise CheckpointError(
        f"'{source}': entry '{key}' is a {type(value).__name__}, not an array/tensor."
    )


def _is_flat_tensor_dict(obj: Any) -> bool:
    return (
        isinstance(obj, Mapping)
        and len(obj) > 0
        and all(isinstance(k, str) for k in obj)
        and all(isinstance(v, (torch.Tensor, np.ndarray, np.generic)) for v in obj.values())
    )


def split_layout(obj: Any, source: str) -> tuple[Mapping[str, Any], dict[str, Any]]:
    """(state dict, other top-level entries) from {"model": sd}, {"state_dict": sd} or sd."""
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"'{source}' holds a {type(obj).__name__}; expected a dict (state dict).")
    for layout_key in ("model", "state_dict"):
        inner = obj.get(layout_key)
        if isinstance(inner, Mapping):
            extra = {k: v for k, v in obj.items() if k != layout_key}
            return inner, extra
    if _is_flat_tensor_dict(obj):
        return obj, {}
    keys = list(obj.keys())[:10]
    raise CheckpointError(
        f"'{source}' is not a state dict: expected {{'model': ...}}, {{'state_dict': ...}} or a dict of "
        f"tensors/arrays, found top-level keys {keys}."
    )


def read_checkpoint(path: str | os.PathLike) -> CheckpointFile:
    """Read a ``.pkl`` / ``.pth`` / ``.safetensors`` checkpoint into a :class:`CheckpointFile`."""
    local = resolve_checkpoint_path(path)
    source = str(local)
    suffix = local.suffix.lower()
    if suffix in PICKLE_EXTENSIONS:
        raw = _restricted_pickle_load(local)
    elif suffix in TORCH_EXTENSIONS:
        try:
            raw = torch.load(local, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise CheckpointError(
                f"Cannot read '{source}' with torch.load(weights_only=True): {type(exc).__name__}: {exc}"
            ) from exc
    elif suffix in SAFETENSORS_EXTENSIONS:
        from safetensors.torch import load_file

        try:
            raw = load_file(str(local), device="cpu")
        except Exception as exc:
            raise CheckpointError(f"Cannot read safetensors file '{source}': {exc}") from exc
    else:
        raise CheckpointError(
            f"Unknown checkpoint extension '{local.suffix}' for '{source}'; "
            f"supported: {', '.join(SUPPORTED_EXTENSIONS)}."
        )

    sd_raw, extra = split_layout(raw, source)
    state_dict: dict[str, torch.Tensor] = {}
    for key, value in sd_raw.items():
        if not isinstance(key, str):
            raise CheckpointError(f"'{source}': state-dict key {key!r} is not a string.")
        state_dict[key] = to_tensor(value, key, source)
    author = extra.get("__author__", "")
    return CheckpointFile(
        state_dict=state_dict,
        matching_heuristics=bool(extra.get("matching_heuristics", False)),
        author=author if isinstance(author, str) else str(author),
        path=source,
        extra=extra,
    )


def load_state_dict_file(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The state dict of a checkpoint file (names as stored), as CPU tensors."""
    return read_checkpoint(path).state_dict


# --------------------------------------------------------------------------- writing


def save_checkpoint(path: str | os.PathLike, model: nn.Module | Mapping[str, torch.Tensor], **extra: Any) -> Path:
    """Write ``{"model": state_dict, **extra}`` to ``path`` (.pth) atomically.

    The state dict is moved to CPU so that the file loads on any machine. ``extra`` holds
    anything ``torch.load(weights_only=True)`` can read back (iteration, optimizer state, ...).
    """
    if "model" in extra:
        raise ValueError("save_checkpoint: 'model' is reserved for the state dict; rename the extra entry.")
    target = Path(path)
    if target.suffix.lower() not in TORCH_EXTENSIONS:
        raise ValueError(f"save_checkpoint writes torch files; use a .pth path, got '{target}'.")
    if isinstance(model, nn.Module):
        state = unwrap_model(model).state_dict()
    else:
        state = dict(model)
    state = {k: (v.detach().cpu() if isinstance(v, torch.Tensor) else v) for k, v in state.items()}
    with atomic_open(target, "wb") as f:
        torch.save({"model": state, **extra}, f)
    return target
