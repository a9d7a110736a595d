"""Synthetic panoptic dataset: the embedded default of every demo and test.

Street-like scenes of textured stuff regions (road, building, vegetation, sky) with thing
instances drawn as distinct shapes (person = ellipse, car = rectangle, truck = triangle,
bicycle = star), varied in size, colour, texture and rotation, occluding each other. The
number of objects per image is log-uniform in [1, 40], so how much computation an image needs
truly varies. The ``hard`` preset (:data:`PRESETS`) makes that spread wider for the ECO-M2F
trends: up to 80 smaller objects, a quarter of them thin rods, and stronger stuff textures. Every
image's complexity is recorded (``complexity_{split}.json``: objects kept and drawn, the occluded
share of their area, small objects, the share of pixels on a segment boundary). Classes are Cityscapes classes and carry their Cityscapes label ids, so the same
images are written twice:

* COCO-panoptic layout under ``<root>/``: ``images/{split}/*.png``, ``panoptic_{split}.json`` +
  ``panoptic_{split}/*.png``, ``panoptic_semseg_{split}/*.png`` (contiguous ids, 255 = void) and
  ``instances_{split}.json`` (COCO instances with RLE masks, for mask AP);
* Cityscapes layout under ``<root>/cityscapes/``: ``leftImg8bit``, ``gtFine`` labelIds /
  instanceIds / labelTrainIds, and ``gtFine/cityscapes_panoptic_{split}.json`` + PNGs exactly
  as ``cityscapesscripts``' createPanopticImgs writes them.

Everything derives from ``seed`` (one generator per image), PNGs are written with fixed
encoder settings and JSON with sorted keys, so the same arguments give byte-identical files.
Pixels of objects left with too small a visible area after occlusion are void (panoptic id 0,
semantic 255, Cityscapes label 0 "unlabeled").
"""
from __future__ import annotations

import contextlib
import multiprocessing
import os
import shutil
import time
import uuid
from dataclasses import asdict, dataclass
from typing import Any, Optional

import numpy as np
from scipy import ndimage

from ..catalog import DatasetCatalog, DatasetPath, MetadataCatalog, datasets_root
from ..io import id2rgb, png_bytes, write_bytes
from .cityscapes import register_cityscapes
from .common import dump_json, ensure_generated, load_panoptic_json, panoptic_metadata, replace_folder, require_path

FORMAT_VERSION = 1
INFO_FILE = "synthetic_info.json"  # written last: its presence marks a complete dataset
DEFAULTS: dict[str, Any] = {"num_train": 200, "num_val": 50, "image_size": 256, "seed": 0, "preset": "standard"}
DEFAULT_SUBDIR = "synthetic"
MAX_OBJECTS = 40
COMPLEXITY_FILE = "complexity_{split}.json"
#: Per-image complexity fields of ``complexity_{split}.json``.
COMPLEXITY_FIELDS = ("objects", "drawn", "occluded_fraction", "small_objects", "boundary_fraction")


@dataclass(frozen=True)
class SceneStyle:
    """How busy a scene gets. The defaults are the standard dataset's; with them the generator
    draws exactly the random numbers it always did, so its files stay byte-identical."""

    max_objects: int = MAX_OBJECTS  # objects per image: log-uniform in [1, max_objects]
    radius_scale: float = 0.28  # largest object radius: radius_scale * size / sqrt(1 + n / 6)
    thin_fraction: float = 0.0  # share of objects drawn as thin rods (aspect 6-12)
    stuff_contrast: float = 1.0  # gain of the stuff textures' variation around their base colour


#: Named styles (``datasets/prepare_synthetic.py --preset``).
PRESETS: dict[str, SceneStyle] = {
    "standard": SceneStyle(),
    "hard": SceneStyle(max_objects=80, radius_scale=0.22, thin_fraction=0.25, stuff_contrast=1.8),
}

STUFF_CLASSES = ("road", "building", "vegetation", "sky")
THING_CLASSES = ("person", "car", "truck", "bicycle")
THING_SHAPES = {"person": "ellipse", "car": "rectangle", "truck": "triangle", "bicycle": "star"}
CITY = {"train": "synthtrain", "val": "synthval"}
PREPARE_CMD = "python datasets/prepare_synthetic.py"


def _cs_label(name: str):
    from cityscapesscripts.helpers.labels import name2label

    return name2label[name]


def synthetic_categories() -> list[dict[str, Any]]:
    """The 8 classes sorted by Cityscapes label id; contiguous id = position in this list."""
    cats = []
    for name in STUFF_CLASSES + THING_CLASSES:
        l = _cs_label(name)
        cats.append(
            {"id": int(l.id), "name": name, "isthing": int(l.hasInstances), "color": list(l.color), "supercategory": l.category}
        )
    cats.sort(key=lambda c: c["id"])
    return cats


def get_synthetic_metadata() -> dict[str, Any]:
    """Class metadata of the COCO-panoptic layout (4 things, 8 classes in all)."""
    return panoptic_metadata(synthetic_categories())


# --------------------------------------------------------------------------- rasterisation
@dataclass
class _Scene:
    image: np.ndarray  # H x W x 3 uint8
    label_ids: np.ndarray  # H x W uint8, Cityscapes label id (0 = void)
    pan_ids: np.ndarray  # H x W int32, segment id (stuff: label id, thing: label*1000+k, void 0)
    num_objects: int  # thing instances with a segment
    complexity: dict[str, float]  # COMPLEXITY_FIELDS


def _normal(rng: np.random.Generator, sigma: float, shape: tuple[int, ...]) -> np.ndarray:
    return sigma * rng.standard_normal(size=shape, dtype=np.float32)


def _smooth_noise(rng: np.random.Generator, ys: np.ndarray, xs: np.ndarray, h: int, w: int, cell: int) -> np.ndarray:
    """Low-frequency noise in [-1, 1] at pixels (ys, xs): a coarse random grid, bilinear."""
    gh, gw = h // cell + 2, w // cell + 2
    grid = rng.uniform(-1.0, 1.0, size=(gh, gw)).astype(np.float32)
    gy, gx = ys * np.float32(1.0 / cell), xs * np.float32(1.0 / cell)
    iy, ix = gy.astype(np.int32), gx.astype(np.int32)
    fy, fx = gy - iy, gx - ix
    top = grid[iy, ix] * (1 - fx) + grid[iy, ix + 1] * fx
    bottom = grid[iy + 1, ix] * (1 - fx) + grid[iy + 1, ix + 1] * fx
    return top * (1 - fy) + bottom * fy


def _stuff_layout(rng: np.random.Generator, h: int, w: int, ids: dict[str, int]) -> np.ndarray:
    """Label-id map of the stuff classes: a street scene or, sometimes, a warped Voronoi tiling."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    out = np.empty((h, w), dtype=np.uint8)
    if rng.uniform() < 0.7:
        # street: sky above a wavy horizon, a building/vegetation band, road below
        x = np.arange(w, dtype=np.float32)
        horizon = h * rng.uniform(0.2, 0.5) + h * rng.uniform(0.0, 0.08) * np.sin(2 * np.pi * (x / w) * rng.uniform(0.5, 3) + rng.uniform(0, 6.3))
        road = h * rng.uniform(0.6, 0.85) + h * rng.uniform(0.0, 0.05) * np.sin(2 * np.pi * (x / w) * rng.uniform(0.5, 2) + rng.uniform(0, 6.3))
        # columns alternate between building and vegetation; vegetation bulges above the horizon
        cuts = np.sort(rng.uniform(0, w, size=rng.integers(1, 5)))
        band = np.searchsorted(cuts, x)  # column -> band index
        first = rng.integers(0, 2)
        is_veg = ((band + first) % 2).astype(bool)
        bulge = h * 0.1 * np.abs(np.sin(x / w * np.pi * rng.uniform(2, 8))) * is_veg
        building_top = horizon - h * rng.uniform(0.0, 0.1) * (~is_veg) - bulge
        out[:] = ids["sky"]
        mid = yy >= building_top[None, :]
        out[mid & ~is_veg[None, :]] = ids["building"]
        out[mid & is_veg[None, :]] = ids["vegetation"]
        out[yy >= road[None, :]] = ids["road"]
        if rng.uniform() < 0.2:  # some scenes have no sky: buildings fill the top
            out[out == ids["sky"]] = ids["building"]
    else:
        n = int(rng.integers(3, 8))
        cy, cx = rng.uniform(0, h, size=n), rng.uniform(0, w, size=n)
        names = rng.choice(np.array(STUFF_CLASSES), size=n)
        names[: len(STUFF_CLASSES)] = rng.permutation(np.array(STUFF_CLASSES))[: min(n, len(STUFF_CLASSES))]
        warp = 0.08 * max(h, w) * _smooth_noise(rng, yy.ravel(), xx.ravel(), h, w, max(4, h // 6)).reshape(h, w)
        d = (yy[None] + warp[None] - cy[:, None, None]) ** 2 + (xx[None] - warp[None] - cx[:, None, None]) ** 2
        cell = np.argmin(d, axis=0)
        lut = np.array([ids[str(nm)] for nm in names], dtype=np.uint8)
        out[:] = lut[cell]
    return out


def _stuff_texture(rng: np.random.Generator, name: str, ys: np.ndarray, xs: np.ndarray, h: int, w: int, contrast: float = 1.0) -> np.ndarray:
    """N x 3 float colours of one stuff class at pixels (ys, xs): noise, stripes or checks, their
    variation around the base colour scaled by ``contrast``."""
    n = ys.shape[0]
    s = max(h, w) / 256.0
    if name == "road":
        base = np.full(3, rng.uniform(70, 120)) + rng.uniform(-8, 8, size=3)
        lum = _normal(rng, 12, (n,)) + 10 * _smooth_noise(rng, ys, xs, h, w, max(2, int(16 * s)))
        dash = max(2, int(rng.uniform(8, 20) * s))
        lane_y = rng.uniform(0.7, 0.95) * h
        lane = (np.abs(ys - lane_y) < max(1.0, 2 * s)) & ((xs // dash) % 2 == 0)
        lum = lum + 110 * lane
        tex = base[None, :] + _gain(lum, contrast)[:, None]
    elif name == "building":
        base = np.array([rng.uniform(90, 170), rng.uniform(70, 140), rng.uniform(60, 130)])
        px, py = max(3, int(rng.uniform(8, 20) * s)), max(3, int(rng.uniform(8, 20) * s))
        window = ((xs % px) < px * 0.55) & ((ys % py) < py * 0.6)
        brick = ((xs // max(2, px // 2) + ys // max(2, py // 3)) % 2) * 12.0
        lum = -55 * window + brick + _normal(rng, 6, (n,))
        tex = base[None, :] + _gain(lum, contrast)[:, None] + window[:, None] * (np.array([0, 10, 30]) * rng.uniform(0, 1))[None, :]
    elif name == "vegetation":
        base = np.array([rng.uniform(40, 90), rng.uniform(110, 170), rng.uniform(20, 60)])
        lum = 35 * _smooth_noise(rng, ys, xs, h, w, max(2, int(12 * s))) + 18 * _smooth_noise(rng, ys, xs, h, w, max(2, int(4 * s)))
        lum = lum + _normal(rng, 10, (n,))
        tex = base[None, :] + _gain(lum, contrast)[:, None] * np.array([0.6, 1.0, 0.5])[None, :]
    elif name == "sky":
        top = np.array([rng.uniform(60, 110), rng.uniform(120, 170), rng.uniform(200, 250)])
        bottom = np.array([rng.uniform(170, 220), rng.uniform(200, 235), rng.uniform(225, 255)])
        t = (ys / max(1, h - 1))[:, None]
        tex = top[None, :] * (1 - t) + bottom[None, :] * t
        f = rng.uniform(0.03, 0.1) / s
        stripes = 10 * np.sin((xs * np.cos(0.5) + ys * np.sin(0.5)) * f + rng.uniform(0, 6.3))
        clouds = 30 * np.clip(_smooth_noise(rng, ys, xs, h, w, max(2, int(24 * s))), 0, 1)
        tex = tex + _gain(stripes + clouds + _normal(rng, 3, (n,)), contrast)[:, None]
    else:
        raise ValueError(f"unknown stuff class {name!r}")
    return tex.astype(np.float32, copy=False)


def _gain(values: np.ndarray, contrast: float) -> np.ndarray:
    return values if contrast == 1.0 else values * np.float32(contrast)


def _shape_mask(shape: str, u: np.ndarray, v: np.ndarray, a: float, b: float) -> np.ndarray:
    """Inside-test of a shape centred at 0 with half-extents (a, b) in its own frame (u, v)."""
    if shape == "ellipse":
        return (u / a) ** 2 + (v / b) ** 2 <= 1.0
    if shape == "rectangle":
        return (np.abs(u) <= a) & (np.abs(v) <= b)
    if shape == "triangle":
        # apex up (v negative is up); base at v = +b
        un, vn = u / a, v / b
        return (vn <= 1.0) & (vn >= -1.0 + 2.0 * np.abs(un))
    if shape == "star":
        rho = np.sqrt((u / a) ** 2 + (v / b) ** 2)
        phi = np.arctan2(v, u)
        t = (phi * 5.0 / (2 * np.pi) + 0.25) % 1.0  # 5 tips
        tri = 1.0 - 2.0 * np.abs(t - 0.5)  # 1 at a tip, 0 between tips
        return rho <= 0.42 + 0.58 * tri
    raise ValueError(f"unknown shape {shape!r}")


def _num_objects(rng: np.random.Generator, max_objects: int = MAX_OBJECTS) -> int:
    """Log-uniform integer in [1, max_objects]."""
    return int(min(max_objects, np.floor(np.exp(rng.uniform(0.0, np.log(max_objects + 1))))))


def render_scene(rng: np.random.Generator, size: int, style: SceneStyle = SceneStyle()) -> _Scene:
    """Draw one image and its label maps (vectorised numpy, bounding-box-local for objects)."""
    h = w = size
    ids = {name: int(_cs_label(name).id) for name in STUFF_CLASSES + THING_CLASSES}
    stuff = _stuff_layout(rng, h, w, ids)
    image = np.zeros((h, w, 3), dtype=np.float32)
    for name in STUFF_CLASSES:
        sel = stuff == ids[name]
        ys, xs = np.nonzero(sel)
        image[sel] = _stuff_texture(rng, name, ys.astype(np.float32), xs.astype(np.float32), h, w, style.stuff_contrast)

    n = _num_objects(rng, style.max_objects)
    obj = np.full((h, w), -1, dtype=np.int16)  # index of the top-most object per pixel
    classes = []
    # objects get smaller as the scene gets busier, with a wide spread inside one image
    r_max = size * style.radius_scale / np.sqrt(1.0 + n / 6.0)
    r_min = max(2.5, size * 0.035)
    drawn = np.zeros(n, dtype=np.int64)  # pixels each object covered when drawn
    for k in range(n):
        cls = THING_CLASSES[int(rng.integers(0, len(THING_CLASSES)))]
        r = float(np.exp(rng.uniform(np.log(r_min), np.log(max(r_min * 1.01, r_max)))))
        aspect = float(np.exp(rng.uniform(-0.45, 0.45)))
        if style.thin_fraction > 0 and rng.uniform() < style.thin_fraction:  # a thin rod: poles, railings
            aspect = float(np.sqrt(rng.uniform(6.0, 12.0)))
        a, b = r * aspect, r / aspect
        if cls == "person":  # upright-ish
            a, b = min(a, b), max(a, b)
        theta = float(rng.uniform(-0.6, 0.6) if cls in ("person", "truck") else rng.uniform(0, np.pi))
        cx, cy = float(rng.uniform(0, w)), float(rng.uniform(0, h))
        hue = rng.uniform(0, 1)
        color = 255 * np.array([0.5 + 0.5 * np.cos(2 * np.pi * (hue + o)) for o in (0.0, 1 / 3, 2 / 3)])
        color = color * rng.uniform(0.45, 1.0) + rng.uniform(0, 60)
        stripe_f, stripe_amp = rng.uniform(0.3, 1.2), rng.uniform(10, 45)
        noise_amp = rng.uniform(3, 15)
        ext = np.hypot(a, b) + 1.0
        x0, x1 = max(0, int(np.floor(cx - ext))), min(w, int(np.ceil(cx + ext)) + 1)
        y0, y1 = max(0, int(np.floor(cy - ext))), min(h, int(np.ceil(cy + ext)) + 1)
        if x0 >= x1 or y0 >= y1:
            classes.append(cls)
            continue
        yy, xx = np.mgrid[y0:y1, x0:x1].astype(np.float32)
        dx, dy = xx + 0.5 - cx, yy + 0.5 - cy
        c, s = np.cos(theta), np.sin(theta)
        u, v = dx * c + dy * s, -dx * s + dy * c  # object frame
        inside = _shape_mask(THING_SHAPES[cls], u, v, a, b)
        # object texture: stripes in its own frame, shading along v, speckle noise
        tex = color[None, None, :] + (
            stripe_amp * np.sin(u * stripe_f) - 25.0 * (v / max(b, 1.0)) + _normal(rng, noise_amp, u.shape)
        )[..., None]
        region = image[y0:y1, x0:x1]
        region[inside] = tex[inside]
        obj[y0:y1, x0:x1][inside] = k
        drawn[k] = int(inside.sum())
        classes.append(cls)

    # visible areas after occlusion; tiny remnants become void
    areas = np.bincount(obj.ravel() + 1, minlength=n + 1)[1:]
    min_area = max(4, int(round(0.0015 * h * w)))
    label_ids = stuff.copy()
    pan_ids = stuff.astype(np.int32)
    per_class = {c: 0 for c in THING_CLASSES}
    lut_pan = np.zeros(n + 1, dtype=np.int32)  # object index + 1 -> pan id (0 = void)
    lut_lab = np.zeros(n + 1, dtype=np.uint8)
    num_kept = 0
    for k in range(n):
        if areas[k] == 0:
            continue
        if areas[k] < min_area:
            continue  # stays 0: void
        cls = classes[k]
        lut_pan[k + 1] = ids[cls] * 1000 + per_class[cls]
        lut_lab[k + 1] = ids[cls]
        per_class[cls] += 1
        num_kept += 1
    covered = obj >= 0
    pan_ids[covered] = lut_pan[obj[covered] + 1]
    label_ids[covered] = lut_lab[obj[covered] + 1]
    img = np.clip(np.rint(image), 0, 255).astype(np.uint8)
    kept = areas >= min_area  # as the loop above: min_area >= 4
    complexity = _complexity(pan_ids, areas[kept], drawn[kept], n)
    return _Scene(image=img, label_ids=label_ids, pan_ids=pan_ids, num_objects=num_kept, complexity=complexity)


def _complexity(pan_ids: np.ndarray, visible: np.ndarray, drawn: np.ndarray, num_drawn: int) -> dict[str, float]:
    """How hard an image is to parse (:data:`COMPLEXITY_FIELDS`): instances kept and drawn, the
    share of the kept instances' drawn area that others hide, instances under 1% of the image,
    and the share of pixels whose right or lower neighbour lies in another segment."""
    h, w = pan_ids.shape
    edge = np.zeros((h, w), dtype=bool)
    edge[:, :-1] |= pan_ids[:, :-1] != pan_ids[:, 1:]
    edge[:-1, :] |= pan_ids[:-1, :] != pan_ids[1:, :]
    total_drawn = int(drawn.sum())
    return {
        "objects": int(visible.shape[0]),
        "drawn": int(num_drawn),
        "occluded_fraction": round(1.0 - float(visible.sum()) / total_drawn, 6) if total_drawn else 0.0,
        "small_objects": int((visible < 0.01 * h * w).sum()),
        "boundary_fraction": round(float(edge.mean()), 6),
    }


def _segments(pan_ids: np.ndarray) -> list[tuple[int, int, list[int]]]:
    """(segment id, area, [x, y, w, h]) for every non-void id, sorted by id."""
    counts = np.bincount(pan_ids.ravel())
    uniq = np.flatnonzero(counts)
    uniq = uniq[uniq != 0]
    lut = np.zeros(counts.shape[0], dtype=np.int32)
    lut[uniq] = np.arange(1, uniq.shape[0] + 1, dtype=np.int32)
    slices = ndimage.find_objects(lut[pan_ids])  # compact labels 1..S -> bounding slices
    out = []
    for sid, (ys, xs) in zip(uniq.tolist(), slices):
        out.append((sid, int(counts[sid]), [xs.start, ys.start, xs.stop - xs.start, ys.stop - ys.start]))
    return out


# ------------------------------------------------------------------------------- writing
def _luts() -> tuple[np.ndarray, np.ndarray]:
    """Label id -> contiguous id and label id -> Cityscapes train id (255 = void)."""
    cats = synthetic_categories()
    contiguous = {c["id"]: i for i, c in enumerate(cats)}
    sem_lut = np.full(256, 255, dtype=np.uint8)
    train_lut = np.full(256, 255, dtype=np.uint8)
    for c in cats:
        sem_lut[c["id"]] = contiguous[c["id"]]
        train_lut[c["id"]] = _cs_label(c["name"]).trainId
    return sem_lut, train_lut


def _render_image(job: tuple[int, int, int, int, SceneStyle]) -> dict[str, Any]:
    """One image, from its own generator: its encoded files (path relative to the root -> bytes)
    and what the annotation files need. Runs in a worker process when the generator has several."""
    from pycocotools import mask as mask_util

    seed, split_index, i, size, style = job
    split = ("train", "val")[split_index]
    sem_lut, train_lut = _luts()
    thing = {c["id"]: bool(c["isthing"]) for c in synthetic_categories()}
    rng = np.random.default_rng([seed, split_index, i])
    scene = render_scene(rng, size, style)
    stem = f"{i:06d}"
    city = CITY[split]
    cs_id = f"{city}_000000_{i:06d}"
    segs = _segments(scene.pan_ids)
    image_png = png_bytes(scene.image, compress_level=1)
    pan_png = png_bytes(id2rgb(scene.pan_ids))
    label_ids = np.where(scene.pan_ids == 0, 0, scene.label_ids).astype(np.uint8)
    gt = os.path.join("cityscapes", "gtFine", split, city, cs_id)
    files = {
        # COCO-panoptic layout
        os.path.join("images", split, stem + ".png"): image_png,
        os.path.join(f"panoptic_{split}", stem + ".png"): pan_png,
        os.path.join(f"panoptic_semseg_{split}", stem + ".png"): png_bytes(sem_lut[label_ids]),
        # Cityscapes layout (real label ids); panoptic PNG ids equal the instanceIds values
        os.path.join("cityscapes", "leftImg8bit", split, city, cs_id + "_leftImg8bit.png"): image_png,
        gt + "_gtFine_labelIds.png": png_bytes(label_ids),
        gt + "_gtFine_instanceIds.png": png_bytes(scene.pan_ids.astype(np.uint16)),
        gt + "_gtFine_labelTrainIds.png": png_bytes(train_lut[label_ids]),
        os.path.join("cityscapes", "gtFine", f"cityscapes_panoptic_{split}", cs_id + "_gtFine_panoptic.png"): pan_png,
    }
    things = [(sid, area, bbox) for sid, area, bbox in segs if thing[sid // 1000 if sid >= 1000 else sid]]
    rles = []
    if things:
        masks = np.stack([scene.pan_ids == sid for sid, *_ in things], axis=2).astype(np.uint8)
        rles = mask_util.encode(np.asfortranarray(masks))  # H x W x N -> N RLEs
    return {"files": files, "segs": segs, "things": list(zip(things, rles)), "num_objects": scene.num_objects,
            "complexity": scene.complexity, "stem": stem, "cs_id": cs_id}


def _write_split(root: str, split: str, num_images: int, size: int, seed: int, split_index: int,
                 style: SceneStyle = SceneStyle(), pool: Optional[Any] = None) -> dict[str, Any]:
    """Render and write one split; ``pool`` (a multiprocessing pool) renders images in parallel.
    Images are written in order whatever the pool, so the files do not depend on it."""
    cats = synthetic_categories()
    jobs = [(seed, split_index, i, size, style) for i in range(num_images)]
    rendered = pool.imap(_render_image, jobs, chunksize=4) if pool is not None else map(_render_image, jobs)

    images, pan_anns, inst_anns = [], [], []
    cs_images, cs_anns = [], []
    num_objects = []
    complexity = []
    ann_id = 1
    for i, r in enumerate(rendered):
        image_id = i + 1
        stem, cs_id, segs = r["stem"], r["cs_id"], r["segs"]
        num_objects.append(r["num_objects"])
        complexity.append({"image_id": image_id, "file_name": stem + ".png", **r["complexity"]})
        for rel, data in r["files"].items():
            write_bytes(os.path.join(root, rel), data)
        images.append({"id": image_id, "file_name": stem + ".png", "height": size, "width": size})
        seg_infos = [
            {"id": sid, "category_id": sid // 1000 if sid >= 1000 else sid, "iscrowd": 0, "area": area, "bbox": bbox}
            for sid, area, bbox in segs
        ]
        pan_anns.append({"image_id": image_id, "file_name": stem + ".png", "segments_info": seg_infos})
        for (sid, area, bbox), rle in r["things"]:
            inst_anns.append({
                "id": ann_id, "image_id": image_id, "category_id": sid // 1000 if sid >= 1000 else sid, "iscrowd": 0,
                "area": area, "bbox": bbox,
                "segmentation": {"size": [int(x) for x in rle["size"]], "counts": rle["counts"].decode("ascii")},
            })
            ann_id += 1
        # createPanopticImgs names the image "<id>_gtFine_leftImg8bit.png" (sic); written identically
        cs_images.append({"id": cs_id, "width": size, "height": size, "file_name": cs_id + "_gtFine_leftImg8bit.png"})
        cs_anns.append({
            "image_id": cs_id, "file_name": cs_id + "_gtFine_panoptic.png",
            "segments_info": [
                {"id": sid, "category_id": sid // 1000 if sid >= 1000 else sid, "area": area, "bbox": bbox, "iscrowd": 0}
                for sid, area, bbox in segs
            ],
        })
    cs = os.path.join(root, "cityscapes")
    pan_cats = [{k: c[k] for k in ("id", "name", "isthing", "color", "supercategory")} for c in cats]
    info = {"description": "eco_m2f synthetic panoptic dataset", "version": str(FORMAT_VERSION)}
    dump_json({"info": info, "licenses": [], "images": images, "annotations": pan_anns, "categories": pan_cats},
              os.path.join(root, f"panoptic_{split}.json"))
    dump_json({"fields": list(COMPLEXITY_FIELDS), "images": complexity}, os.path.join(root, COMPLEXITY_FILE.format(split=split)))
    inst_cats = [{"id": c["id"], "name": c["name"], "supercategory": c["supercategory"]} for c in cats if c["isthing"]]
    dump_json({"info": info, "licenses": [], "images": images, "annotations": inst_anns, "categories": inst_cats},
              os.path.join(root, f"instances_{split}.json"))
    # the categories createPanopticImgs writes: every label not ignored in evaluation
    from cityscapesscripts.helpers.labels import labels

    cs_cats = [
        {"id": int(l.id), "name": l.name, "color": list(l.color), "supercategory": l.category, "isthing": 1 if l.hasInstances else 0}
        for l in labels if not l.ignoreInEval
    ]
    dump_json({"images": cs_images, "annotations": cs_anns, "categories": cs_cats},
              os.path.join(cs, "gtFine", f"cityscapes_panoptic_{split}.json"), indent=4)
    return {"num_images": num_images, "num_objects": num_objects, "num_instances": ann_id - 1}


def generate_synthetic_dataset(
    root: str | os.PathLike,
    num_train: int = DEFAULTS["num_train"],
    num_val: int = DEFAULTS["num_val"],
    image_size: int = DEFAULTS["image_size"],
    seed: int = DEFAULTS["seed"],
    preset: str = DEFAULTS["preset"],
    workers: int = 1,
) -> dict[str, Any]:
    """Generate (or regenerate) the synthetic dataset at ``root``; returns a summary.

    Files are written into a temporary sibling folder that is renamed onto ``root`` at the end,
    so readers never see a half-written dataset. Same arguments -> byte-identical files.
    ``preset`` names a :data:`PRESETS` style ("standard" or "hard"); ``workers`` > 1 renders
    images in that many processes (the files are the same).
    """
    if preset not in PRESETS:
        raise ValueError(f"unknown synthetic preset {preset!r}; known: {sorted(PRESETS)}")
    style = PRESETS[preset]
    for key, val, lo in (("num_train", num_train, 0), ("num_val", num_val, 0), ("image_size", image_size, 32),
                         ("workers", workers, 1)):
        if not isinstance(val, (int, np.integer)) or val < lo:
            raise ValueError(f"{key} must be an integer >= {lo}, got {val!r}")
    root = os.path.abspath(os.fspath(root))
    parent = os.path.dirname(root)
    os.makedirs(parent, exist_ok=True)
    tmp = os.path.join(parent, f".{os.path.basename(root)}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    t0 = time.perf_counter()
    try:
        splits = {}
        with contextlib.ExitStack() as stack:
            pool = stack.enter_context(multiprocessing.Pool(int(workers))) if workers > 1 else None
            for split_index, (split, n) in enumerate((("train", num_train), ("val", num_val))):
                splits[split] = _write_split(tmp, split, int(n), int(image_size), int(seed), split_index, style, pool)
        info = {
            "format_version": FORMAT_VERSION,
            "seed": int(seed),
            "image_size": int(image_size),
            "num_train": int(num_train),
            "num_val": int(num_val),
            "preset": preset,
            "style": asdict(style),
            "categories": synthetic_categories(),
            "num_objects": {s: v["num_objects"] for s, v in splits.items()},
        }
        dump_json(info, os.path.join(tmp, INFO_FILE))
        replace_folder(tmp, root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return {
        "root": root,
        "seconds": time.perf_counter() - t0,
        "splits": {s: {k: v[k] for k in ("num_images", "num_instances")} | {"max_objects": max(v["num_objects"], default=0),
                                                                             "min_objects": min(v["num_objects"], default=0)}
                   for s, v in splits.items()},
    }


def default_synthetic_root() -> str:
    """``$DETECTRON2_DATASETS/synthetic`` (read at call time)."""
    return os.path.join(datasets_root(), DEFAULT_SUBDIR)


def ensure_synthetic_dataset(root: Optional[str] = None) -> str:
    """Return the synthetic dataset folder, generating it with :data:`DEFAULTS` if missing.

    Safe with several processes: one generates under a file lock, the others wait and reuse it.
    """
    root = os.path.abspath(root or default_synthetic_root())

    def generate() -> None:
        summary = generate_synthetic_dataset(root, **DEFAULTS)
        print(f"Generated the synthetic dataset in {root} ({summary['seconds']:.1f} s)")

    return ensure_generated(root, INFO_FILE, generate, PREPARE_CMD)


# --------------------------------------------------------------------------- registration
def load_synthetic_panoptic(dataset_name: str, split: str) -> list[dict]:
    """Dataset dicts of the COCO-panoptic layout (generating the dataset if missing)."""
    root = ensure_synthetic_dataset()
    cmd = f"{PREPARE_CMD} --root {root}"
    pan_json = require_path(os.path.join(root, f"panoptic_{split}.json"), dataset_name, cmd, kind="file")
    image_root = require_path(os.path.join(root, "images", split), dataset_name, cmd)
    pan_root = require_path(os.path.join(root, f"panoptic_{split}"), dataset_name, cmd)
    sem_root = require_path(os.path.join(root, f"panoptic_semseg_{split}"), dataset_name, cmd)
    return load_panoptic_json(pan_json, image_root, pan_root, get_synthetic_metadata(), dataset_name, sem_root)


def register_synthetic() -> None:
    """Register ``synthetic_panoptic_{train,val}`` (+ ``_with_sem_seg`` aliases) and the
    ``synthetic_cityscapes_fine_{panoptic,sem_seg,instance_seg}_{train,val}`` datasets."""
    meta = get_synthetic_metadata()
    ensure = ensure_synthetic_dataset  # module-level, so metadata stays picklable

    def p(rel: str) -> DatasetPath:
        return DatasetPath(f"{DEFAULT_SUBDIR}/{rel}", ensure)

    for split in ("train", "val"):
        for name in (f"synthetic_panoptic_{split}", f"synthetic_panoptic_{split}_with_sem_seg"):
            if name in DatasetCatalog:
                continue
            DatasetCatalog.register(name, lambda n=name, s=split: load_synthetic_panoptic(n, s))
            MetadataCatalog.get(name).set(
                image_root=p(f"images/{split}"),
                panoptic_root=p(f"panoptic_{split}"),
                panoptic_json=p(f"panoptic_{split}.json"),
                sem_seg_root=p(f"panoptic_semseg_{split}"),
                json_file=p(f"instances_{split}.json"),
                evaluator_type="coco_panoptic_seg",
                ignore_label=255,
                label_divisor=1000,
                **meta,
            )
    register_cityscapes(
        prefix="synthetic_", base=f"{DEFAULT_SUBDIR}/cityscapes", before_read=ensure,
        prepare_cmd=f"{PREPARE_CMD} --root $DETECTRON2_DATASETS/{DEFAULT_SUBDIR}",
    )
