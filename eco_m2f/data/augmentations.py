"""Training/test augmentations on ``torchvision.transforms.v2``, as the official Mask2Former configs use them.

Images and targets travel together through one transform call, so geometry stays aligned:

* ``tv_tensors.Image``  (3 x H x W uint8, RGB): bilinear resize, padded with ``image_pad_value`` (128);
* ``SemSegMask``        (H x W integer class map): nearest resize, padded with the ignore label (255);
* ``tv_tensors.Mask``   (H x W id map or N x H x W binary stack): nearest resize, padded with 0 (void / empty).

Every random choice is drawn from torch's global generator (as torchvision's own transforms do), so the loader can
make a sample's augmentation a pure function of ``SEED`` and the sample's position by seeding that generator.

Recipes (``build_*_augmentation``):

* large-scale jitter (``coco_*_lsj``): flip, resize so the image fits ``s * IMAGE_SIZE`` with
  ``s ~ U(MIN_SCALE, MAX_SCALE)``, then a fixed ``IMAGE_SIZE`` crop padded at the bottom/right;
* multi-scale (``mask_former_*``): shortest-edge resize (``MIN_SIZE_TRAIN`` / ``MAX_SIZE_TRAIN`` /
  ``MIN_SIZE_TRAIN_SAMPLING``), optional crop with a single-category area limit (``INPUT.CROP.*``), optional
  SSD photometric distortion (``COLOR_AUG_SSD``), flip;
* semantic (``sem_seg``, the mmseg/Segmenter pipeline): the same resize, where the sampling ``"ratio_range"``
  is mmseg's ``Resize(img_scale=(MAX_SIZE_TRAIN, MIN_SIZE_TRAIN), ratio_range=(MIN_SCALE, MAX_SCALE))``, crop
  with the category limit (mmseg's ``cat_max_ratio``), flip, photometric distortion, then padding to the crop
  size (image: the pixel mean, i.e. mmseg's 0 after normalisation; label: ignore);
* test: shortest edge to ``MIN_SIZE_TEST`` capped by ``MAX_SIZE_TEST``.
"""
from __future__ import annotations

import math
from typing import Any, Sequence, Union

import torch
import torchvision.transforms.v2 as v2
import torchvision.transforms.v2.functional as F
from torchvision import tv_tensors

__all__ = [
    "SemSegMask",
    "ResizeShortestEdge",
    "ResizeScale",
    "RandomRatioResize",
    "FixedSizeCrop",
    "RandomCropCategoryAreaConstraint",
    "ColorAugSSD",
    "PadToDivisible",
    "PadToSize",
    "shortest_edge_output_shape",
    "crop_size_for",
    "build_flip_augmentation",
    "build_lsj_augmentation",
    "build_resize_augmentation",
    "build_multiscale_augmentation",
    "build_semantic_augmentation",
    "build_test_augmentation",
]

IMAGE_PAD_VALUE = 128  # Detectron2 pads images with 128 (mid-grey) in FixedSizeCrop and size-divisibility padding
CROP_TYPES = ("relative", "relative_range", "absolute", "absolute_range")
SIZE_SAMPLING = ("choice", "range", "ratio_range")  # INPUT.MIN_SIZE_TRAIN_SAMPLING
PadValue = Union[float, Sequence[float]]  # one value, or one per image channel


class SemSegMask(tv_tensors.Mask):
    """A semantic class map (H x W). A ``Mask`` for every torchvision kernel, but padded with the ignore label."""


# ----------------------------------------------------------------------------------------------------- helpers
def _image_size(flat_inputs: list[Any]) -> tuple[int, int]:
    """(H, W) of the sample, taken from its image (all spatial inputs share it)."""
    sizes = {tuple(F.get_size(x)) for x in flat_inputs if isinstance(x, (tv_tensors.Image, tv_tensors.Mask))}
    if not sizes:
        raise TypeError("augmentation input holds no tv_tensors.Image / tv_tensors.Mask")
    if len(sizes) != 1:
        raise ValueError(f"image and masks differ in spatial size: {sorted(sizes)}")
    (size,) = sizes
    return int(size[0]), int(size[1])


def _uniform(low: float, high: float) -> float:
    return float(low + (high - low) * torch.rand(()).item())


def _randint(low: int, high: int) -> int:
    """Integer in [low, high) from torch's generator."""
    return int(torch.randint(low, high, ()).item())


def _pad_fill(inpt: Any, image_pad_value: "PadValue", seg_pad_value: int) -> "PadValue":
    if isinstance(inpt, SemSegMask):
        return seg_pad_value
    if isinstance(inpt, tv_tensors.Mask):
        return 0
    return image_pad_value


def _resize(inpt: Any, size: list[int]) -> Any:
    # masks: nearest with pixel-centre sampling (as PIL's NEAREST), so they stay aligned with the bilinear image
    if isinstance(inpt, tv_tensors.Mask):
        return F.resize(inpt, size, interpolation=v2.InterpolationMode.NEAREST_EXACT)
    return F.resize(inpt, size, interpolation=v2.InterpolationMode.BILINEAR, antialias=True)


def shortest_edge_output_shape(h: int, w: int, short_edge: int, max_size: int) -> tuple[int, int]:
    """Size after scaling the short side to ``short_edge`` unless the long side would exceed ``max_size``."""
    scale = short_edge / min(h, w)
    newh, neww = h * scale, w * scale
    if max_size > 0 and max(newh, neww) > max_size:
        shrink = max_size / max(newh, neww)
        newh, neww = newh * shrink, neww * shrink
    return int(newh + 0.5), int(neww + 0.5)


def crop_size_for(h: int, w: int, crop_type: str, crop_size: Sequence[float]) -> tuple[int, int]:
    """Crop (h, w) for an image of size (h, w), with Detectron2's ``INPUT.CROP.TYPE`` semantics."""
    ch, cw = crop_size
    if crop_type == "relative":
        return int(h * ch + 0.5), int(w * cw + 0.5)
    if crop_type == "relative_range":
        rh, rw = (torch.rand(2) * (1.0 - torch.tensor([ch, cw], dtype=torch.float32))).tolist()
        return int(h * (ch + rh) + 0.5), int(w * (cw + rw) + 0.5)
    if crop_type == "absolute":
        return min(int(ch), h), min(int(cw), w)
    if crop_type == "absolute_range":
        lo, hi = int(crop_size[0]), int(crop_size[1])
        return _randint(min(h, lo), min(h, hi) + 1), _randint(min(w, lo), min(w, hi) + 1)
    raise ValueError(f"INPUT.CROP.TYPE must be one of {CROP_TYPES}, got {crop_type!r}")


# -------------------------------------------------------------------------------------------------- transforms
class ResizeShortestEdge(v2.Transform):
    """Scale the short side to a length drawn from ``short_edge_length`` ("choice") or its [min, max] ("range")."""

    def __init__(self, short_edge_length: Sequence[int] | int, max_size: int = 0, sample_style: str = "choice"):
        super().__init__()
        if isinstance(short_edge_length, int):
            short_edge_length = (short_edge_length,)
        self.short_edge_length = [int(s) for s in short_edge_length]
        if sample_style not in ("choice", "range"):
            raise ValueError(f"MIN_SIZE_TRAIN_SAMPLING must be 'choice' or 'range', got {sample_style!r}")
        if sample_style == "range" and len(self.short_edge_length) != 2:
            raise ValueError(f"'range' sampling needs two sizes (min, max), got {self.short_edge_length}")
        if not self.short_edge_length:
            raise ValueError("ResizeShortestEdge needs at least one size")
        self.max_size = int(max_size)
        self.sample_style = sample_style

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        h, w = _image_size(flat_inputs)
        if self.sample_style == "range":
            size = _randint(self.short_edge_length[0], self.short_edge_length[1] + 1)
        else:
            size = self.short_edge_length[_randint(0, len(self.short_edge_length))]
        if size == 0:  # Detectron2: a size of 0 disables resizing
            return {"size": None}
        return {"size": list(shortest_edge_output_shape(h, w, size, self.max_size))}

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        return inpt if params["size"] is None else _resize(inpt, params["size"])


class ResizeScale(v2.Transform):
    """Large-scale jitter resize: fit the image into ``s * (target_height, target_width)``, s ~ U(min, max)."""

    def __init__(self, min_scale: float, max_scale: float, target_height: int, target_width: int):
        super().__init__()
        if not 0 < min_scale <= max_scale:
            raise ValueError(f"need 0 < MIN_SCALE <= MAX_SCALE, got {min_scale}, {max_scale}")
        self.min_scale, self.max_scale = float(min_scale), float(max_scale)
        self.target_height, self.target_width = int(target_height), int(target_width)

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        h, w = _image_size(flat_inputs)
        s = _uniform(self.min_scale, self.max_scale)
        scale = min(s * self.target_height / h, s * self.target_width / w)
        return {"size": [max(1, int(round(h * scale))), max(1, int(round(w * scale)))]}

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        return _resize(inpt, params["size"])


class RandomRatioResize(v2.Transform):
    """mmseg's ``Resize(img_scale=(long, short), ratio_range=(lo, hi), keep_ratio=True)``: draw r ~ U(lo, hi),
    then scale the image, keeping its aspect, by the largest factor that fits its short side into
    ``int(short * r)`` and its long side into ``int(long * r)``."""

    def __init__(self, short_edge: int, long_edge: int, min_ratio: float, max_ratio: float):
        super().__init__()
        if not 0 < min_ratio <= max_ratio:
            raise ValueError(f"need 0 < MIN_SCALE <= MAX_SCALE for 'ratio_range' sampling, got {min_ratio}, {max_ratio}")
        if short_edge <= 0 or long_edge <= 0:
            raise ValueError("'ratio_range' sampling needs MIN_SIZE_TRAIN (one value) and MAX_SIZE_TRAIN > 0, "
                             f"got {short_edge} and {long_edge}")
        self.short_edge, self.long_edge = int(short_edge), int(long_edge)
        self.min_ratio, self.max_ratio = float(min_ratio), float(max_ratio)

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        h, w = _image_size(flat_inputs)
        r = _uniform(self.min_ratio, self.max_ratio)
        short, long = int(self.short_edge * r), int(self.long_edge * r)
        return {"size": list(shortest_edge_output_shape(h, w, short, long))}

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        return _resize(inpt, params["size"])


class FixedSizeCrop(v2.Transform):
    """Random crop to at most ``crop_size``, then pad bottom/right up to exactly ``crop_size`` (if ``pad``).

    As Detectron2's FixedSizeCrop, one uniform draw places the crop in both axes.
    """

    def __init__(self, crop_size: Sequence[int], pad: bool = True, image_pad_value: float = IMAGE_PAD_VALUE,
                 seg_pad_value: int = 255):
        super().__init__()
        self.crop_size = (int(crop_size[0]), int(crop_size[1]))
        self.pad = pad
        self.image_pad_value = image_pad_value
        self.seg_pad_value = int(seg_pad_value)

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        h, w = _image_size(flat_inputs)
        ch, cw = min(h, self.crop_size[0]), min(w, self.crop_size[1])
        u = torch.rand(()).item()
        top, left = int(round((h - ch) * u)), int(round((w - cw) * u))
        pad_h, pad_w = (self.crop_size[0] - ch, self.crop_size[1] - cw) if self.pad else (0, 0)
        return {"top": top, "left": left, "height": ch, "width": cw, "pad": [0, 0, pad_w, pad_h]}

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        out = F.crop(inpt, params["top"], params["left"], params["height"], params["width"])
        if any(params["pad"]):
            out = F.pad(out, params["pad"], fill=_pad_fill(inpt, self.image_pad_value, self.seg_pad_value))
        return out


class RandomCropCategoryAreaConstraint(v2.Transform):
    """Random crop (``INPUT.CROP.TYPE``/``SIZE``) that retries, up to 10 times, until no single category covers
    ``single_category_max_area`` or more of the crop's labelled pixels (Detectron2's
    RandomCrop_CategoryAreaConstraint). The categories are read from the sample's ``SemSegMask``."""

    max_tries = 10

    def __init__(self, crop_type: str, crop_size: Sequence[float], single_category_max_area: float = 1.0,
                 ignored_category: int | None = 255):
        super().__init__()
        if crop_type not in CROP_TYPES:
            raise ValueError(f"INPUT.CROP.TYPE must be one of {CROP_TYPES}, got {crop_type!r}")
        if len(crop_size) != 2:
            raise ValueError(f"INPUT.CROP.SIZE must have two values, got {list(crop_size)}")
        self.crop_type = crop_type
        self.crop_size = tuple(float(c) for c in crop_size)
        self.single_category_max_area = float(single_category_max_area)
        self.ignored_category = ignored_category

    def _random_window(self, h: int, w: int) -> tuple[int, int, int, int]:
        ch, cw = crop_size_for(h, w, self.crop_type, self.crop_size)
        ch, cw = max(1, min(ch, h)), max(1, min(cw, w))
        return _randint(0, h - ch + 1), _randint(0, w - cw + 1), ch, cw

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        h, w = _image_size(flat_inputs)
        if self.single_category_max_area >= 1.0:
            top, left, ch, cw = self._random_window(h, w)
            return {"top": top, "left": left, "height": ch, "width": cw}
        sem = [x for x in flat_inputs if isinstance(x, SemSegMask)]
        if not sem:
            raise ValueError("INPUT.CROP.SINGLE_CATEGORY_MAX_AREA < 1 needs a semantic map (SemSegMask) in the sample")
        sem_seg = sem[0].as_subclass(torch.Tensor)
        for _ in range(self.max_tries):
            top, left, ch, cw = self._random_window(h, w)
            labels, counts = torch.unique(sem_seg[top:top + ch, left:left + cw], return_counts=True)
            if self.ignored_category is not None:
                counts = counts[labels != self.ignored_category]
            if len(counts) > 1 and counts.max().item() < counts.sum().item() * self.single_category_max_area:
                break
        return {"top": top, "left": left, "height": ch, "width": cw}

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        return F.crop(inpt, params["top"], params["left"], params["height"], params["width"])


class ColorAugSSD(v2.Transform):
    """SSD's photometric distortion on the image only (Detectron2's ColorAugSSDTransform, mmseg's
    PhotoMetricDistortion): each step with probability 1/2, additive brightness (+-32), multiplicative contrast
    and HSV saturation ([0.5, 1.5]), hue shift (+-18 of OpenCV's 180), with contrast either first or last.
    Expects RGB uint8 images."""

    _transformed_types = (tv_tensors.Image,)

    def __init__(self, brightness_delta: float = 32, contrast_range: tuple[float, float] = (0.5, 1.5),
                 saturation_range: tuple[float, float] = (0.5, 1.5), hue_delta: float = 18):
        super().__init__()
        self.brightness_delta = float(brightness_delta)
        self.contrast_range = contrast_range
        self.saturation_range = saturation_range
        self.hue_delta = float(hue_delta)

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        # 9 draws, always in the same order, so the sequence of random numbers does not depend on the outcome
        coins = (torch.rand(5) < 0.5).tolist()
        u = torch.rand(4).tolist()
        lerp = lambda r, t: r[0] + (r[1] - r[0]) * t  # noqa: E731
        return {
            "brightness": (2 * u[0] - 1) * self.brightness_delta if coins[0] else None,
            "contrast_first": coins[1],
            "contrast": lerp(self.contrast_range, u[1]) if coins[2] else None,
            "saturation": lerp(self.saturation_range, u[2]) if coins[3] else None,
            "hue": (2 * u[3] - 1) * self.hue_delta / 180.0 if coins[4] else None,
        }

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        if inpt.dtype != torch.uint8 or inpt.shape[-3] != 3:
            raise TypeError(f"ColorAugSSD expects a 3-channel uint8 image, got {inpt.dtype} {tuple(inpt.shape)}")
        img = inpt.as_subclass(torch.Tensor).float()  # 3 x H x W in [0, 255]
        if params["brightness"] is not None:
            img = (img + params["brightness"]).clamp_(0, 255)
        if params["contrast_first"] and params["contrast"] is not None:
            img = (img * params["contrast"]).clamp_(0, 255)
        if params["saturation"] is not None:
            img = _scale_hsv_saturation(img, params["saturation"])
        if params["hue"] is not None:
            img = F.adjust_hue(img / 255.0, params["hue"]) * 255.0
        if not params["contrast_first"] and params["contrast"] is not None:
            img = (img * params["contrast"]).clamp_(0, 255)
        return tv_tensors.wrap(img.round_().clamp_(0, 255).to(torch.uint8), like=inpt)


def _scale_hsv_saturation(img: torch.Tensor, alpha: float) -> torch.Tensor:
    """Multiply HSV saturation by ``alpha`` (clipped to 1) keeping hue and value; img 3 x H x W float in [0, 255].

    With V = max and m = min over channels, S = (V - m) / V. Each channel c -> V - k (V - c) keeps V and the hue
    (which depends only on ratios of c - m) and scales S by k; k is capped at V / (V - m), i.e. S' <= 1.
    """
    v = img.amax(dim=0, keepdim=True)
    m = img.amin(dim=0, keepdim=True)
    k = torch.full_like(v, float(alpha))
    if alpha > 1:
        spread = v - m
        cap = torch.where(spread > 0, v / spread.clamp(min=1e-6), k)
        k = torch.minimum(k, cap)
    return (v - k * (v - img)).clamp_(0, 255)


class PadToDivisible(v2.Transform):
    """Pad bottom/right so H and W are multiples of ``size_divisibility`` (INPUT.SIZE_DIVISIBILITY > 0)."""

    def __init__(self, size_divisibility: int, image_pad_value: PadValue = IMAGE_PAD_VALUE, seg_pad_value: int = 255):
        super().__init__()
        self.size_divisibility = int(size_divisibility)
        self.image_pad_value = image_pad_value
        self.seg_pad_value = int(seg_pad_value)

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        h, w = _image_size(flat_inputs)
        d = self.size_divisibility
        return {"pad": [0, 0, math.ceil(w / d) * d - w, math.ceil(h / d) * d - h]}

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        if not any(params["pad"]):
            return inpt
        return F.pad(inpt, params["pad"], fill=_pad_fill(inpt, self.image_pad_value, self.seg_pad_value))


class PadToSize(v2.Transform):
    """Pad bottom/right up to ``size`` (H, W) (mmseg's ``Pad(size=crop_size)``); larger sides are left as they are."""

    def __init__(self, size: Sequence[int], image_pad_value: PadValue = IMAGE_PAD_VALUE, seg_pad_value: int = 255):
        super().__init__()
        self.size = (int(size[0]), int(size[1]))
        self.image_pad_value = image_pad_value
        self.seg_pad_value = int(seg_pad_value)

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        h, w = _image_size(flat_inputs)
        return {"pad": [0, 0, max(0, self.size[1] - w), max(0, self.size[0] - h)]}

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        if not any(params["pad"]):
            return inpt
        return F.pad(inpt, params["pad"], fill=_pad_fill(inpt, self.image_pad_value, self.seg_pad_value))


# ------------------------------------------------------------------------------------------------------ recipes
def build_flip_augmentation(cfg) -> list[v2.Transform]:
    """``INPUT.RANDOM_FLIP``: "horizontal" | "vertical" | "none" (probability 1/2)."""
    mode = str(cfg.INPUT.RANDOM_FLIP).lower()
    if mode == "horizontal":
        return [v2.RandomHorizontalFlip(p=0.5)]
    if mode == "vertical":
        return [v2.RandomVerticalFlip(p=0.5)]
    if mode == "none":
        return []
    raise ValueError(f"INPUT.RANDOM_FLIP must be 'horizontal', 'vertical' or 'none', got {cfg.INPUT.RANDOM_FLIP!r}")


def build_lsj_augmentation(cfg, seg_pad_value: int = 255) -> v2.Compose:
    """Large-scale jitter of the COCO recipes (``coco_panoptic_lsj`` / ``coco_instance_lsj``)."""
    size = int(cfg.INPUT.IMAGE_SIZE)
    return v2.Compose(build_flip_augmentation(cfg) + [
        ResizeScale(cfg.INPUT.MIN_SCALE, cfg.INPUT.MAX_SCALE, size, size),
        FixedSizeCrop((size, size), pad=True, seg_pad_value=seg_pad_value),
    ])


def build_resize_augmentation(cfg) -> v2.Transform:
    """Training resize by ``INPUT.MIN_SIZE_TRAIN_SAMPLING``: Detectron2's "choice" / "range" of short sides
    (``MIN_SIZE_TRAIN``, long side capped by ``MAX_SIZE_TRAIN``), or mmseg's "ratio_range": base scale
    (``MIN_SIZE_TRAIN`` short, ``MAX_SIZE_TRAIN`` long) times r ~ U(``MIN_SCALE``, ``MAX_SCALE``)."""
    sampling = cfg.INPUT.MIN_SIZE_TRAIN_SAMPLING
    if sampling not in SIZE_SAMPLING:
        raise ValueError(f"INPUT.MIN_SIZE_TRAIN_SAMPLING must be one of {SIZE_SAMPLING}, got {sampling!r}")
    if sampling != "ratio_range":
        return ResizeShortestEdge(cfg.INPUT.MIN_SIZE_TRAIN, cfg.INPUT.MAX_SIZE_TRAIN, sampling)
    sizes = cfg.INPUT.MIN_SIZE_TRAIN
    sizes = [sizes] if isinstance(sizes, int) else list(sizes)
    if len(sizes) != 1:
        raise ValueError(f"INPUT.MIN_SIZE_TRAIN_SAMPLING 'ratio_range' needs one INPUT.MIN_SIZE_TRAIN (the base short "
                         f"side), got {sizes}")
    return RandomRatioResize(sizes[0], cfg.INPUT.MAX_SIZE_TRAIN, cfg.INPUT.MIN_SCALE, cfg.INPUT.MAX_SCALE)


def _build_category_crop(cfg, ignore_label: int) -> RandomCropCategoryAreaConstraint:
    return RandomCropCategoryAreaConstraint(cfg.INPUT.CROP.TYPE, cfg.INPUT.CROP.SIZE,
                                            cfg.INPUT.CROP.SINGLE_CATEGORY_MAX_AREA, ignore_label)


def build_multiscale_augmentation(cfg, ignore_label: int = 255) -> v2.Compose:
    """Multi-scale resize + crop + colour + flip of the Cityscapes/ADE20K recipes (``mask_former_*``)."""
    augs: list[v2.Transform] = [build_resize_augmentation(cfg)]
    if cfg.INPUT.CROP.ENABLED:
        augs.append(_build_category_crop(cfg, ignore_label))
    if cfg.INPUT.COLOR_AUG_SSD:
        augs.append(ColorAugSSD())
    augs.extend(build_flip_augmentation(cfg))
    return v2.Compose(augs)


def build_semantic_augmentation(cfg, ignore_label: int = 255, image_pad_value: PadValue = IMAGE_PAD_VALUE) -> v2.Compose:
    """The mmseg/Segmenter training pipeline (``sem_seg`` mapper): resize, crop with the single-category limit,
    flip, photometric distortion, and, for an "absolute" ``INPUT.CROP.TYPE``, padding up to ``INPUT.CROP.SIZE``
    (image with ``image_pad_value``, label with ``ignore_label``), so every training image has the crop size."""
    augs: list[v2.Transform] = [build_resize_augmentation(cfg)]
    if cfg.INPUT.CROP.ENABLED:
        augs.append(_build_category_crop(cfg, ignore_label))
    augs.extend(build_flip_augmentation(cfg))
    if cfg.INPUT.COLOR_AUG_SSD:
        augs.append(ColorAugSSD())
    if cfg.INPUT.CROP.ENABLED and cfg.INPUT.CROP.TYPE == "absolute":
        augs.append(PadToSize(cfg.INPUT.CROP.SIZE, image_pad_value, ignore_label))
    return v2.Compose(augs)


def build_test_augmentation(cfg) -> v2.Compose:
    """Shortest edge to ``MIN_SIZE_TEST`` capped by ``MAX_SIZE_TEST`` (0 keeps the original size)."""
    return v2.Compose([ResizeShortestEdge([int(cfg.INPUT.MIN_SIZE_TEST)], int(cfg.INPUT.MAX_SIZE_TEST), "choice")])
