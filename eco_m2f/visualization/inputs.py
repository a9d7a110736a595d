"""The demo's inputs: paths, directories and globs expanded to image files, read lazily.

A directory of thousands of images costs a list of paths, never the images: each is read
when the loader reaches it, through the project's test-time mapper (the resizing and
channel order the model expects), and a file that cannot be read becomes an error record
instead of stopping the run.
"""
from __future__ import annotations

import glob
import logging
import os
from dataclasses import dataclass
from typing import Callable, Sequence

from torch.utils.data import Dataset

__all__ = ["IMAGE_EXTENSIONS", "ImageFiles", "InputFailure", "expand_inputs"]

logger = logging.getLogger(__name__)

#: Files of a directory that are taken as images (case-insensitive).
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")


@dataclass(frozen=True)
class InputFailure:
    """An input that gave no result, and why."""

    path: str
    reason: str


def _directory_images(path: str) -> list[str]:
    names = sorted(os.listdir(path))
    images = [os.path.join(path, n) for n in names
              if os.path.splitext(n)[1].lower() in IMAGE_EXTENSIONS and os.path.isfile(os.path.join(path, n))]
    if len(images) < len(names):
        logger.info("%s: %d entries are not image files (%s) and are left out",
                    path, len(names) - len(images), ", ".join(IMAGE_EXTENSIONS))
    return images


def expand_inputs(specs: Sequence[str]) -> tuple[list[str], list[InputFailure]]:
    """Image files named by ``specs`` (files; directories: their image files, sorted; globs:
    the files they match, sorted), each once, and the specs that name nothing."""
    files: list[str] = []
    seen: set[str] = set()
    failures: list[InputFailure] = []

    def add(path: str) -> None:
        key = os.path.abspath(path)
        if key not in seen:
            seen.add(key)
            files.append(path)

    for spec in specs:
        if os.path.isfile(spec):
            add(spec)
        elif os.path.isdir(spec):
            found = _directory_images(spec)
            if not found:
                failures.append(InputFailure(spec, f"the directory holds no image files ({', '.join(IMAGE_EXTENSIONS)})"))
            for path in found:
                add(path)
        elif glob.has_magic(spec):
            found = sorted(p for p in glob.glob(spec, recursive=True) if os.path.isfile(p))
            if not found:
                failures.append(InputFailure(spec, "no file matches this pattern"))
            for path in found:
                add(path)
        else:
            failures.append(InputFailure(spec, "no such file or directory"))
    return files, failures


class ImageFiles(Dataset):
    """``dataset[i]``: ``mapper({"file_name": paths[i], "image_id": i})``, or, when the file cannot be
    read, ``{"file_name": ..., "image_id": i, "error": message}``."""

    def __init__(self, paths: Sequence[str], mapper: Callable[[dict], dict]) -> None:
        self.paths = list(paths)
        self.mapper = mapper

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> dict:
        record = {"file_name": self.paths[index], "image_id": int(index)}
        try:
            return self.mapper(record)
        except (OSError, ValueError) as err:  # missing, not an image, truncated, corrupt
            return {**record, "error": str(err)}
