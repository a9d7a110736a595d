"""Running the official ``cityscapesscripts`` (conversion, evaluation) under today's numpy.

The scripts predate numpy 2: they call ``np.in1d`` (removed in numpy 2.4) and the aliases numpy
1.24 removed (``np.int``, ``np.float``...), JSON-dump numpy scalars, exit the interpreter on
errors and print their progress. One shim serves every caller:

* :class:`NumpyCompat`: numpy plus those names, set as a script module's global ``np`` (only
  that module's namespace changes; numpy and site-packages stay as they are);
* :func:`import_cityscapes_evaluation`: import ``cityscapesscripts.evaluation.<name>`` with the
  shim in place when numpy lacks ``in1d``;
* :func:`cityscapes_scripts`: a block that runs script modules with the shim and a numpy-aware
  ``writeDict2JSON`` patched on for its duration, their output captured, ``sys.exit`` turned into
  ``RuntimeError`` and, optionally, the working directory moved (the instance script writes
  ``matches.json`` into it);
* :func:`call_cityscapesscripts`: one function call in such a block.
"""
from __future__ import annotations

import contextlib
import importlib
import io
import json
import logging
import os
import types
from collections.abc import Callable
from typing import Any, Iterator, Optional

import numpy as np

__all__ = ["NumpyCompat", "call_cityscapesscripts", "cityscapes_scripts", "import_cityscapes_evaluation"]

logger = logging.getLogger(__name__)

# Builtins that numpy once exported under these names and cityscapesscripts still uses.
_REMOVED_ALIASES = {"int": int, "float": float, "bool": bool, "object": object, "long": int, "str": str}


class NumpyCompat(types.ModuleType):
    """numpy, plus ``in1d`` and the removed builtin aliases."""

    def __init__(self) -> None:
        super().__init__("numpy")

    def __getattr__(self, name: str) -> Any:
        if hasattr(np, name):
            return getattr(np, name)
        if name in _REMOVED_ALIASES:
            return _REMOVED_ALIASES[name]
        raise AttributeError(name)

    @staticmethod
    def in1d(ar1: Any, ar2: Any, assume_unique: bool = False, invert: bool = False) -> np.ndarray:
        return np.isin(np.asarray(ar1).ravel(), ar2, assume_unique=assume_unique, invert=invert)


def import_cityscapes_evaluation(name: str) -> types.ModuleType:
    """Import ``cityscapesscripts.evaluation.<name>``, its ``np`` the shim when numpy lacks ``in1d``."""
    mod = importlib.import_module(f"cityscapesscripts.evaluation.{name}")
    if not hasattr(np, "in1d") and hasattr(mod, "np") and not isinstance(mod.np, NumpyCompat):
        mod.np = NumpyCompat()
    return mod


def _write_dict_to_json(data: Any, file_name: str) -> None:
    """cityscapesscripts' writeDict2JSON, accepting the numpy scalars numpy 2 returns from count_nonzero."""

    def default(o: Any) -> Any:
        if isinstance(o, np.generic):
            return o.item()
        if isinstance(o, np.ndarray):
            return o.tolist()
        return o.__dict__

    with open(file_name, "w") as f:
        json.dump(data, f, default=default, sort_keys=True, indent=4)


@contextlib.contextmanager
def cityscapes_scripts(*modules: Any, workdir: Optional[str | os.PathLike] = None) -> Iterator[io.StringIO]:
    """Run cityscapesscripts ``modules`` inside the block (see the module docstring).

    Yields the buffer that collects their console output; the patches and the working directory
    are restored when the block ends.
    """
    saved = [(m, name, getattr(m, name)) for m in modules for name in ("np", "writeDict2JSON") if hasattr(m, name)]
    for m, name, _ in saved:
        setattr(m, name, NumpyCompat() if name == "np" else _write_dict_to_json)
    out = io.StringIO()
    cwd = os.getcwd()
    if workdir is not None:
        os.chdir(workdir)
    try:
        with contextlib.redirect_stdout(out):
            yield out
    except SystemExit as e:
        tail = " | ".join(out.getvalue().strip().splitlines()[-5:])
        raise RuntimeError(f"cityscapesscripts failed (exit {e.code}): {tail}") from None
    finally:
        os.chdir(cwd)
        for m, name, original in saved:
            setattr(m, name, original)
        if out.getvalue():
            logger.debug("cityscapesscripts output:\n%s", out.getvalue())


def call_cityscapesscripts(func: Callable[..., Any], *args: Any, quiet: bool = True, **kwargs: Any) -> Any:
    """Call a cityscapesscripts function; its ``printError`` (print + sys.exit) becomes a RuntimeError.

    With ``quiet`` its progress printing is captured (and included in the error message).
    """
    if quiet:
        with cityscapes_scripts():
            return func(*args, **kwargs)
    try:
        return func(*args, **kwargs)
    except SystemExit as err:
        raise RuntimeError(f"cityscapesscripts {getattr(func, '__name__', func)} failed (exit {err.code})") from None
