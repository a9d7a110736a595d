"""Synthetic semantic dataset for the token-reduction ViT segmenters.

Each image is a warped Voronoi tiling whose cells carry one of 16 **texture classes** (stripes at
four orientations and two frequencies, checks, dots, grids, bricks, zigzags, rings, blotches,
speckle, flat). Colours are drawn per region independently of the class, so a model has to
recognise the pattern, not the colour. The number of regions per image is drawn from one of
:data:`NUM_LEVELS` complexity levels, from one to four regions (large uniform areas) up to
thousands of tiny cells (fine clutter), and the seeds are spread with a smooth random density, so
coarse and fine parts also mix inside one image. Hence the fraction of **easy tokens** (16x16
patches holding a single class) truly varies per image, from 1.0 down to nearly 0; it is recorded
per image, with the level, in the info JSON and in the dataset dicts.

Layout (Detectron2 semantic style, one folder per variant under ``$DETECTRON2_DATASETS``)::

    synthetic_sem_seg/
      images/{train,val}/000000.png        # RGB
      annotations/{train,val}/000000.png   # class ids 0..15 (no ignore pixels)
      synthetic_sem_seg_info.json          # arguments, classes, per-image level / easy-token fractions

Everything derives from the seed (two generators per image), PNGs are written with fixed encoder
settings and JSON with sorted keys, so the same arguments give byte-identical files, with any
number of worker processes. Generation writes into a hidden ``.<name>.partial`` sibling folder
(each file written whole, then renamed) and resumes there after being killed; the finished folder
is renamed onto the target.
"""
from __future__ import annotations

import functools
import glob
import os
import shutil
import time
from collections.abc import Sequence
from typing import Any, Optional

import numpy as np
from scipy import ndimage
from scipy.spatial import cKDTree

from ..catalog import DatasetCatalog, DatasetPath, MetadataCatalog, datasets_root
from ..io import png_bytes, read_png_ids
from .common import (
    dump_json,
    ensure_generated,
    file_lock,
    load_json,
    lock_path,
    map_jobs,
    palette,
    replace_folder,
    require_path,
)

FORMAT_VERSION = 1
INFO_FILE = "synthetic_sem_seg_info.json"  # written last: its presence marks a complete dataset
PREPARE_CMD = "python datasets/prepare_synthetic_semantic.py"
PATCH_SIZES = (16, 32)  # easy-token fractions recorded for ViT patches (16) and CTS/STEP 2x2 superpatches (32)
NUM_LEVELS = 5
# regions per 512x512 image at each complexity level: [low, high), drawn log-uniformly (scaled with the area)
LEVEL_REGIONS = ((1, 4), (4, 24), (24, 128), (128, 640), (640, 3000))
REFERENCE_AREA = 512 * 512

# (name, kind, period in pixels, orientation in degrees): the classes in contiguous-id order
TEXTURES: tuple[tuple[str, str, float, float], ...] = (
    ("flat", "flat", 0, 0),
    ("speckle", "speckle", 0, 0),
    ("blotches", "blotches", 6, 0),
    ("stripes horizontal", "stripes", 8, 0),
    ("stripes vertical", "stripes", 8, 90),
    ("stripes diagonal", "stripes", 8, 45),
    ("stripes antidiagonal", "stripes", 8, 135),
    ("fine stripes horizontal", "stripes", 4, 0),
    ("fine stripes vertical", "stripes", 4, 90),
    ("checks", "checks", 8, 0),
    ("fine checks", "checks", 4, 0),
    ("dots", "dots", 6, 0),
    ("grid", "grid", 6, 0),
    ("bricks", "bricks", 12, 0),
    ("zigzag", "zigzag", 8, 0),
    ("rings", "rings", 6, 0),
)
CLASSES: tuple[str, ...] = tuple(t[0] for t in TEXTURES)
COLORS: list[list[int]] = palette(len(CLASSES), seed=5)

# variant folder -> (height, width, num_train, num_val) generated on first use
VARIANTS: dict[str, tuple[int, int, int, int]] = {
    "synthetic_sem_seg": (512, 512, 1000, 100),
    "synthetic_sem_seg_512x1024": (512, 1024, 500, 50),
}
DEFAULT_SEED = 0


# ---------------------------------------------------------------------------------------------- statistics
def easy_token_fraction(label: np.ndarray, patch: int) -> float:
    """Fraction of the ``patch`` x ``patch`` cells of the label map's grid that hold one class.

    The grid covers the map padded at the bottom/right to a multiple of ``patch`` (as a ViT pads its
    input); padding pixels do not count, so a border cell is easy when its image pixels are one class.
    """
    h, w = label.shape
    gh, gw = -(-h // patch), -(-w // patch)
    lab = label.astype(np.int32)
    lo = np.full((gh * patch, gw * patch), np.iinfo(np.int32).max, dtype=np.int32)
    hi = np.full((gh * patch, gw * patch), -1, dtype=np.int32)
    lo[:h, :w] = lab
    hi[:h, :w] = lab
    cell_min = lo.reshape(gh, patch, gw, patch).min(axis=(1, 3))  # gh x gw
    cell_max = hi.reshape(gh, patch, gw, patch).max(axis=(1, 3))
    return float((cell_min == cell_max).mean())


# ---------------------------------------------------------------------------------------------- rendering
def _smooth_noise(rng: np.random.Generator, h: int, w: int, cell: float) -> np.ndarray:
    """H x W float32 noise in [-1, 1] varying over ``cell`` pixels: a coarse random grid, bilinear."""
    cell = max(2.0, float(cell))
    gh, gw = int(h / cell) + 2, int(w / cell) + 2
    grid = rng.uniform(-1.0, 1.0, size=(gh, gw)).astype(np.float32)
    ys = np.arange(h, dtype=np.float32) / cell
    xs = np.arange(w, dtype=np.float32) / cell
    return ndimage.map_coordinates(grid, np.meshgrid(ys, xs, indexing="ij"), order=1, mode="nearest")


def image_params(seed: int, split_index: int, index: int, height: int, width: int) -> dict[str, int]:
    """Complexity level and region count of one image, from their own generator (cheap to recompute)."""
    rng = np.random.default_rng([seed, split_index, index, 0])
    level = int(rng.integers(0, NUM_LEVELS))
    scale = height * width / REFERENCE_AREA
    lo = max(1.0, LEVEL_REGIONS[level][0] * scale)
    hi = max(lo + 1.0, LEVEL_REGIONS[level][1] * scale)
    return {"complexity_level": level, "num_regions": int(np.exp(rng.uniform(np.log(lo), np.log(hi))))}


def _region_map(rng: np.random.Generator, h: int, w: int, n: int) -> tuple[np.ndarray, np.ndarray]:
    """H x W int index of the warped Voronoi cell of each pixel, and the n x 2 (y, x) seeds.

    Seeds are drawn from a smooth random density (strength varies per image), so coarse and fine
    areas mix; the query points are displaced by smooth noise of about a third of a cell, which
    makes the borders irregular at every scale.
    """
    candidates = np.stack([rng.uniform(0, h, 4 * n), rng.uniform(0, w, 4 * n)], axis=1)  # 4n x 2
    density = _smooth_noise(rng, h, w, min(h, w) / 3)
    weights = np.exp(rng.uniform(0.0, 3.0) * density[candidates[:, 0].astype(int), candidates[:, 1].astype(int)])
    seeds = candidates[rng.choice(4 * n, size=n, replace=False, p=weights / weights.sum())]
    cell = np.sqrt(h * w / n)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    yy += 0.35 * cell * _smooth_noise(rng, h, w, cell)
    xx += 0.35 * cell * _smooth_noise(rng, h, w, cell)
    _, index = cKDTree(seeds).query(np.stack([yy.ravel(), xx.ravel()], axis=1))
    return index.reshape(h, w).astype(np.int32), seeds


def _texture(kind: str, period: np.ndarray, angle: np.ndarray, y: np.ndarray, x: np.ndarray,
             centre: np.ndarray, rng: np.random.Generator, noise: np.ndarray) -> np.ndarray:
    """Texture value in [0, 1] of one class at N pixels; period/angle/centre are per pixel (N, N, N x 2)."""
    c, s = np.cos(angle), np.sin(angle)
    u, v = x * c + y * s, -x * s + y * c  # pattern frame: stripes run along u, repeat along v
    if kind == "flat":
        return np.zeros_like(y)
    if kind == "speckle":
        return rng.uniform(0.0, 1.0, size=y.shape).astype(np.float32)
    if kind == "blotches":
        return 0.5 + 0.5 * noise
    if kind == "stripes":
        return ((v / period) % 1.0 < 0.5).astype(np.float32)
    if kind == "checks":
        return (((np.floor(u / (period / 2)) + np.floor(v / (period / 2))) % 2) == 0).astype(np.float32)
    if kind == "dots":
        du, dv = (u / period) % 1.0 - 0.5, (v / period) % 1.0 - 0.5
        return (du * du + dv * dv < 0.09).astype(np.float32)
    if kind == "grid":
        return (((u / period) % 1.0 < 0.25) | ((v / period) % 1.0 < 0.25)).astype(np.float32)
    if kind == "bricks":
        row = np.floor(v / (period / 2))
        shifted = u / period + 0.5 * (row % 2)
        mortar = ((v / (period / 2)) % 1.0 < 0.2) | (shifted % 1.0 < 0.1)
        return mortar.astype(np.float32)
    if kind == "zigzag":
        tri = np.abs((u / period) % 1.0 - 0.5) * period  # triangle wave along u
        return (((v + tri) / period) % 1.0 < 0.5).astype(np.float32)
    if kind == "rings":
        r = np.hypot(y - centre[:, 0], x - centre[:, 1])
        return ((r / period) % 1.0 < 0.5).astype(np.float32)
    raise ValueError(f"unknown texture kind {kind!r}")


def _region_colours(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Two n x 3 colours per region, independent of the class: brightness levels 60-160 apart, each
    with its own random tint, so every pattern stays visible whatever its colours."""
    m0 = rng.uniform(30, 225, size=n)
    gap = rng.uniform(60, 160, size=n)
    up = np.where(m0 + 60 > 255, False, np.where(m0 - 60 < 0, True, rng.uniform(size=n) < 0.5))
    m1 = np.clip(np.where(up, m0 + gap, m0 - gap), 0, 255)
    tint = rng.uniform(-50, 50, size=(2, n, 3))
    c0 = np.clip(m0[:, None] + tint[0], 0, 255)
    c1 = np.clip(m1[:, None] + tint[1], 0, 255)
    return c0.astype(np.float32), c1.astype(np.float32)


def render_image(rng: np.random.Generator, height: int, width: int, num_regions: int) -> tuple[np.ndarray, np.ndarray]:
    """One image (H x W x 3 uint8) and its label map (H x W uint8 class ids)."""
    region, seeds = _region_map(rng, height, width, num_regions)
    n = len(seeds)
    region_class = rng.integers(0, len(CLASSES), size=n)
    period_scale = rng.uniform(0.9, 1.1, size=n).astype(np.float32)
    angle_jitter = np.deg2rad(rng.uniform(-8, 8, size=n)).astype(np.float32)
    phase = rng.uniform(0, 64, size=(n, 2)).astype(np.float32)
    c0, c1 = _region_colours(rng, n)
    blotch_noise = _smooth_noise(rng, height, width, 6.0)

    label = region_class[region].astype(np.uint8)
    image = np.empty((height * width, 3), dtype=np.float32)  # no sensor noise: it triples the PNG size
    flat_region = region.ravel()
    flat_label = label.ravel()
    ys, xs = np.divmod(np.arange(height * width, dtype=np.int64), width)
    for k, (_, kind, period, angle) in enumerate(TEXTURES):
        pix = np.flatnonzero(flat_label == k)
        if pix.size == 0:
            continue
        r = flat_region[pix]
        y = ys[pix].astype(np.float32) + phase[r, 0]
        x = xs[pix].astype(np.float32) + phase[r, 1]
        t = _texture(kind, period * period_scale[r], np.deg2rad(angle) + angle_jitter[r], y, x,
                     seeds[r].astype(np.float32) + phase[r], rng, blotch_noise.ravel()[pix])
        image[pix] = c0[r] + t[:, None] * (c1[r] - c0[r])
    return np.clip(np.rint(image), 0, 255).astype(np.uint8).reshape(height, width, 3), label


def image_record(label: np.ndarray, params: dict[str, int], stem: str) -> dict[str, Any]:
    """The per-image entry of the info JSON."""
    return {
        "file_name": f"{stem}.png",
        **params,
        "easy_token_fraction": {str(p): round(easy_token_fraction(label, p), 6) for p in PATCH_SIZES},
    }


# ---------------------------------------------------------------------------------------------- writing
def _write_atomic(path: str, data: bytes) -> None:
    """Write ``data`` to a temporary name and rename it: a killed run never leaves a truncated file."""
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def _make_image(task: tuple[str, str, int, int, int, int, int]) -> dict[str, Any]:
    """Render and write one image + label (skipped when its label exists: resuming), return its record."""
    folder, split, split_index, index, height, width, seed = task
    stem = f"{index:06d}"
    params = image_params(seed, split_index, index, height, width)
    label_path = os.path.join(folder, "annotations", split, stem + ".png")
    if os.path.isfile(label_path):  # written last: the image is complete
        return image_record(read_png_ids(label_path, expect="single"), params, stem)
    rng = np.random.default_rng([seed, split_index, index, 1])
    image, label = render_image(rng, height, width, params["num_regions"])
    _write_atomic(os.path.join(folder, "images", split, stem + ".png"), png_bytes(image, compress_level=1))
    _write_atomic(label_path, png_bytes(label))
    return image_record(label, params, stem)


def _check_args(num_train: int, num_val: int, height: int, width: int, seed: int, workers: int) -> None:
    for key, val, lo in (("num_train", num_train, 0), ("num_val", num_val, 0), ("height", height, 16),
                         ("width", width, 16), ("seed", seed, 0), ("workers", workers, 1)):
        if not isinstance(val, (int, np.integer)) or isinstance(val, bool) or val < lo:
            raise ValueError(f"{key} must be an integer >= {lo}, got {val!r}")


def generate_synthetic_semantic_dataset(
    root: str | os.PathLike,
    num_train: int = VARIANTS["synthetic_sem_seg"][2],
    num_val: int = VARIANTS["synthetic_sem_seg"][3],
    height: int = VARIANTS["synthetic_sem_seg"][0],
    width: int = VARIANTS["synthetic_sem_seg"][1],
    seed: int = DEFAULT_SEED,
    workers: int = 1,
) -> dict[str, Any]:
    """Generate (or regenerate) the dataset at ``root`` with ``workers`` processes; returns a summary.

    Resumes a killed run with the same arguments (the partial folder keeps every finished image);
    other arguments start afresh. Same arguments -> byte-identical files, whatever ``workers``.
    """
    _check_args(num_train, num_val, height, width, seed, workers)
    root = os.path.abspath(os.fspath(root))
    os.makedirs(os.path.dirname(root), exist_ok=True)
    with file_lock(lock_path(root)):
        return _generate(root, int(num_train), int(num_val), int(height), int(width), int(seed), int(workers))


def _generate(root: str, num_train: int, num_val: int, height: int, width: int, seed: int,
              workers: int) -> dict[str, Any]:
    t0 = time.perf_counter()
    partial = os.path.join(os.path.dirname(root), f".{os.path.basename(root)}.partial")
    args = {"format_version": FORMAT_VERSION, "num_train": num_train, "num_val": num_val,
            "height": height, "width": width, "seed": seed}
    args_file = os.path.join(partial, "arguments.json")
    if os.path.isdir(partial) and (not os.path.isfile(args_file) or load_json(args_file) != args):
        shutil.rmtree(partial)  # left by a run with other arguments: nothing to reuse
    splits = (("train", num_train), ("val", num_val))
    for split, _ in splits:
        for sub in ("images", "annotations"):
            os.makedirs(os.path.join(partial, sub, split), exist_ok=True)
    dump_json(args, args_file)
    for stray in glob.glob(os.path.join(glob.escape(partial), "*", "*", "*.tmp-*")):  # from a killed run
        os.remove(stray)

    tasks = [(partial, split, split_index, i, height, width, seed)
             for split_index, (split, n) in enumerate(splits) for i in range(n)]
    done = map_jobs(_make_image, tasks, workers)
    records = {"train": done[:num_train], "val": done[num_train:]}
    info = {
        **args,
        "classes": list(CLASSES),
        "textures": [{"name": n, "kind": k, "period": p, "angle": a} for n, k, p, a in TEXTURES],
        "patch_sizes": list(PATCH_SIZES),
        "images": records,
    }
    os.remove(args_file)
    dump_json(info, os.path.join(partial, INFO_FILE))
    replace_folder(partial, root)
    return {"root": root, "seconds": time.perf_counter() - t0, "images": records}


def summarize(records: Sequence[dict], patch: int = 16) -> dict[str, Any]:
    """Count, per-level counts and easy-token fraction range of a split's records."""
    fractions = [r["easy_token_fraction"][str(patch)] for r in records]
    levels = [r["complexity_level"] for r in records]
    return {
        "num_images": len(records),
        "per_level": [levels.count(k) for k in range(NUM_LEVELS)],
        "easy_min": min(fractions, default=float("nan")),
        "easy_mean": float(np.mean(fractions)) if fractions else float("nan"),
        "easy_max": max(fractions, default=float("nan")),
    }


# ---------------------------------------------------------------------------------------------- catalog
def default_root(variant: str = "synthetic_sem_seg") -> str:
    """``$DETECTRON2_DATASETS/<variant>`` (read at call time)."""
    return os.path.join(datasets_root(), variant)


def ensure_synthetic_semantic_dataset(variant: str = "synthetic_sem_seg", root: Optional[str] = None) -> str:
    """Return the folder of ``variant``, generating it with its :data:`VARIANTS` defaults if missing."""
    if variant not in VARIANTS:
        raise KeyError(f"unknown synthetic semantic variant {variant!r}; known: {sorted(VARIANTS)}")
    root = os.path.abspath(root or default_root(variant))
    height, width, num_train, num_val = VARIANTS[variant]

    def generate() -> None:
        workers = min(8, os.cpu_count() or 1, max(1, (num_train + num_val) // 64))  # a pool pays off from ~64 images
        summary = _generate(root, num_train, num_val, height, width, DEFAULT_SEED, workers)
        print(f"Generated the synthetic semantic dataset in {root} ({summary['seconds']:.1f} s)")

    return ensure_generated(root, INFO_FILE, generate, f"{PREPARE_CMD} --height {height} --width {width}")


def load_synthetic_semantic(dataset_name: str, variant: str, split: str) -> list[dict]:
    """Dataset dicts of one split (generating the variant if missing), in image order.

    Besides Detectron2's fields each dict carries ``complexity_level`` and ``easy_token_fraction``
    (16x16 patches), for per-image analyses of token reduction.
    """
    root = ensure_synthetic_semantic_dataset(variant)
    cmd = f"{PREPARE_CMD} --root {root}"
    info = load_json(require_path(os.path.join(root, INFO_FILE), dataset_name, cmd, kind="file"), dataset_name)
    image_dir = require_path(os.path.join(root, "images", split), dataset_name, cmd)
    gt_dir = require_path(os.path.join(root, "annotations", split), dataset_name, cmd)
    dicts = [{
        "file_name": os.path.join(image_dir, rec["file_name"]),
        "sem_seg_file_name": os.path.join(gt_dir, rec["file_name"]),
        "image_id": f"{split}_{os.path.splitext(rec['file_name'])[0]}",
        "height": int(info["height"]),
        "width": int(info["width"]),
        "complexity_level": int(rec["complexity_level"]),
        "easy_token_fraction": float(rec["easy_token_fraction"]["16"]),
    } for rec in info["images"][split]]
    if dicts and not os.path.isfile(dicts[0]["sem_seg_file_name"]):
        raise FileNotFoundError(f"Dataset '{dataset_name}': {dicts[0]['sem_seg_file_name']} listed by {INFO_FILE} "
                                f"does not exist; regenerate with: {cmd}")
    return dicts


def register_synthetic_semantic() -> None:
    """Register ``synthetic_sem_seg_{train,val}`` (512x512) and ``synthetic_sem_seg_512x1024_{train,val}``."""
    for variant in VARIANTS:
        ensure = functools.partial(ensure_synthetic_semantic_dataset, variant)  # picklable
        for split in ("train", "val"):
            name = f"{variant}_{split}"
            if name in DatasetCatalog:
                continue
            DatasetCatalog.register(name, lambda n=name, v=variant, s=split: load_synthetic_semantic(n, v, s))
            MetadataCatalog.get(name).set(
                image_root=DatasetPath(f"{variant}/images/{split}", ensure),
                sem_seg_root=DatasetPath(f"{variant}/annotations/{split}", ensure),
                evaluator_type="sem_seg",
                ignore_label=255,
                stuff_classes=list(CLASSES),
                stuff_colors=[list(c) for c in COLORS],
                stuff_dataset_id_to_contiguous_id={i: i for i in range(len(CLASSES))},
            )
