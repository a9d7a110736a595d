"""Image and label-map reading/writing with errors that name the offending file.

PIL reports a corrupt or truncated file with messages such as "cannot identify image file"
that do not say which of thousands of dataset files is broken; these helpers re-raise as
``ValueError`` with the path, so a bad file in a dataset is found at once.
PNG writing uses fixed settings so that generated datasets are byte-identical run to run.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Union

import numpy as np
from PIL import Image, ImageOps

PathLike = Union[str, os.PathLike]

_FORMATS = ("RGB", "BGR", "L", "YUV-BT.601")
# Fixed PNG encoder settings: same pixels -> same bytes.
_PNG_SAVE_KWARGS = {"format": "PNG", "optimize": False, "compress_level": 6}


def _open_and_load(path: PathLike) -> Image.Image:
    """Open and fully decode ``path`` (PIL is lazy), mapping decoder failures to ValueError."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"image file not found: {path}")
    try:
        with Image.open(path) as img:
            img.load()
            return img.copy()
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        raise ValueError(f"cannot decode image file {path}: {err}") from err


def read_image(path: PathLike, format: str = "RGB") -> np.ndarray:
    """Read an image as Detectron2's ``read_image`` does (EXIF orientation applied).

    Returns uint8 HxWx3 for "RGB"/"BGR"/"YUV-BT.601" and HxWx1 for "L".
    Raises FileNotFoundError for a missing file and ValueError naming the file when it
    cannot be decoded.
    """
    if format not in _FORMATS:
        raise ValueError(f"unknown image format {format!r} for {os.fspath(path)}; expected one of {_FORMATS}")
    img = _open_and_load(path)
    try:
        img = ImageOps.exif_transpose(img)
    except Exception as err:  # malformed EXIF block
        raise ValueError(f"cannot read EXIF orientation of image file {os.fspath(path)}: {err}") from err
    if format == "L":
        return np.asarray(img.convert("L"), dtype=np.uint8)[:, :, None]
    if format == "YUV-BT.601":
        rgb = np.asarray(img.convert("RGB"), dtype=np.float32) / 255.0
        m = np.array([[0.299, 0.587, 0.114], [-0.14713, -0.28886, 0.436], [0.615, -0.51499, -0.10001]])
        return np.dot(rgb, m.T).astype(np.float32)
    arr = np.asarray(img.convert("RGB"), dtype=np.uint8)
    if format == "BGR":
        arr = arr[:, :, ::-1]
    return np.ascontiguousarray(arr)


def rgb2id(color: np.ndarray) -> np.ndarray:
    """COCO-panoptic id encoding of an HxWx3 uint8 array: id = R + 256 G + 256^2 B (int32)."""
    color = np.asarray(color)
    if color.ndim != 3 or color.shape[2] != 3:
        raise ValueError(f"rgb2id expects an HxWx3 array, got shape {color.shape}")
    c = color.astype(np.int32)
    return c[:, :, 0] + 256 * c[:, :, 1] + 256 * 256 * c[:, :, 2]


def id2rgb(id_map: np.ndarray) -> np.ndarray:
    """Inverse of :func:`rgb2id`: HxW integer ids (< 256^3) -> HxWx3 uint8."""
    ids = np.asarray(id_map).astype(np.int64)
    if ids.min(initial=0) < 0 or ids.max(initial=0) >= 256**3:
        raise ValueError("panoptic ids must lie in [0, 256^3)")
    out = np.empty(ids.shape + (3,), dtype=np.uint8)
    out[..., 0] = ids % 256
    out[..., 1] = (ids // 256) % 256
    out[..., 2] = ids // (256 * 256)
    return out


def read_png_ids(path: PathLike, expect: str | None = None) -> np.ndarray:
    """Read a label PNG as an int32 HxW id map.

    RGB(A) PNGs are panoptic maps decoded with :func:`rgb2id`; single-channel PNGs
    (semantic maps, Cityscapes labelIds/instanceIds, 8 or 16 bit) are returned as their values.
    ``expect`` ("rgb" for panoptic maps, "single" for class maps) rejects the other kind, so a
    wrong file is an error rather than a silently wrong map.
    Raises FileNotFoundError / ValueError naming the file.
    """
    if expect not in (None, "rgb", "single"):
        raise ValueError(f"expect must be None, 'rgb' or 'single', got {expect!r}")
    img = _open_and_load(path)
    is_rgb = img.mode in ("RGB", "RGBA")
    if expect == "rgb" and not is_rgb:
        raise ValueError(
            f"panoptic PNG {os.fspath(path)} must be RGB (ids encoded as R + 256 G + 256^2 B), got mode {img.mode!r}"
        )
    if expect == "single" and is_rgb:
        raise ValueError(f"label PNG {os.fspath(path)} must be single-channel, got mode {img.mode!r}")
    if img.mode in ("RGB", "RGBA"):
        return rgb2id(np.asarray(img.convert("RGB")))
    if img.mode == "P":
        # palette PNG (e.g. VOC-style): the stored indices are the labels
        return np.asarray(img, dtype=np.uint8).astype(np.int32)
    if img.mode in ("L", "I", "I;16", "I;16B", "I;16L", "1"):
        return np.asarray(img).astype(np.int32)
    raise ValueError(f"unsupported PNG mode {img.mode!r} for a label map: {os.fspath(path)}")


def image_size(path: PathLike) -> tuple[int, int]:
    """(height, width) from the image header only; ValueError naming the file if unreadable."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"image file not found: {path}")
    try:
        with Image.open(path) as img:
            w, h = img.size
    except (OSError, SyntaxError, ValueError) as err:
        raise ValueError(f"cannot decode image file {path}: {err}") from err
    return int(h), int(w)


def png_bytes(array: np.ndarray, compress_level: int = 6) -> bytes:
    """Encode an array as PNG with fixed settings (deterministic bytes).

    uint8 HxW -> 8-bit grey, uint8 HxWx3 -> RGB, uint16 HxW -> 16-bit grey. ``compress_level``
    6 is PIL's default; 1 is ~3x faster on noisy photographs at about the same size.
    """
    import io

    arr = np.ascontiguousarray(array)
    if arr.dtype == np.uint16 and arr.ndim == 2:
        img = Image.fromarray(arr)  # mode "I;16"
    elif arr.dtype == np.uint8 and (arr.ndim == 2 or (arr.ndim == 3 and arr.shape[2] == 3)):
        img = Image.fromarray(arr)
    else:
        raise ValueError(f"cannot write array of dtype {arr.dtype} and shape {arr.shape} as PNG")
    buf = io.BytesIO()
    img.save(buf, **{**_PNG_SAVE_KWARGS, "compress_level": int(compress_level)})
    return buf.getvalue()


def write_png(path: PathLike, array: np.ndarray) -> None:
    """Write ``array`` as a PNG (see :func:`png_bytes`), creating parent folders."""
    write_bytes(path, png_bytes(array))


def write_bytes(path: PathLike, data: bytes) -> None:
    """Write ``data`` to ``path``, creating parent folders."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_bytes(data)
