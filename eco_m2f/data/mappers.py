"""Dataset mappers: one Detectron2 dataset dict in, one model input dict out.

Output (all mappers): ``"image"`` uint8 C x H x W in ``INPUT.FORMAT`` (RGB or BGR) order, ``"height"``/``"width"``
of the ORIGINAL image (to resize predictions back), ``"file_name"``, ``"image_id"``. Training mappers add

* ``"instances"``: ``{"gt_classes": int64 [N], "gt_masks": bool [N, H, W]}``: one mask per segment that is still
  visible after augmentation; crowd segments are dropped; N may be 0 (tensors of shape [0] and [0, H, W]);
* ``"sem_seg"``: int64 [H, W], ignore label (255) where no class is known, including padding.

Training mappers, by ``INPUT.DATASET_MAPPER_NAME`` (registry ``DATASET_MAPPER``):

* ``coco_panoptic_lsj`` / ``mask_former_panoptic``: panoptic PNG (id = R + 256 G + 256^2 B) + ``segments_info``
  -> masks for things and stuff; ``sem_seg`` from the segments (crowd regions keep their class there, as in the
  semantic PNGs converted from panoptic annotations). LSJ or multi-scale augmentation.
* ``mask_former_semantic``: semantic PNG -> ``sem_seg``; one mask per class present.
* ``sem_seg`` (:class:`SemSegDatasetMapper`): the lean semantic mapper of the plain-ViT segmenters: ``"image"`` and
  ``"sem_seg"`` only (no ``"instances"``), with the mmseg/Segmenter pipeline (``build_semantic_augmentation``).
* ``coco_instance_lsj`` / ``mask_former_instance``: things only, from ``annotations`` (polygons / RLE, as
  Detectron2's instance datasets) or, when absent, from the panoptic segments whose ``isthing`` is true;
  ``sem_seg`` then holds thing classes only.

Semantic PNGs are checked: a label outside ``[0, len(stuff_classes))`` other than the ignore label is an error
naming the file and the bad values.

``InferenceDatasetMapper`` (``build_test_mapper``) resizes the shortest edge to ``MIN_SIZE_TEST`` (capped by
``MAX_SIZE_TEST``; 0 keeps the original size), never flips, never pads (sliding-window and whole-image inference
pad inside the model), and keeps the other keys of the dataset dict for the evaluators.
"""
from __future__ import annotations

import copy
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
import torchvision.transforms.v2 as v2
from fvcore.common.registry import Registry
from torchvision import tv_tensors

from .augmentations import (
    PadToDivisible,
    SemSegMask,
    build_lsj_augmentation,
    build_multiscale_augmentation,
    build_semantic_augmentation,
    build_test_augmentation,
)
from .io import read_image, read_png_ids

__all__ = [
    "DATASET_MAPPER",
    "build_mapper",
    "build_test_mapper",
    "PanopticDatasetMapper",
    "SemanticDatasetMapper",
    "SemSegDatasetMapper",
    "InstanceDatasetMapper",
    "InferenceDatasetMapper",
]

DATASET_MAPPER = Registry("DATASET_MAPPER")
DATASET_MAPPER.__doc__ = "Training dataset mappers: fn(cfg, is_train=True) -> callable(dataset_dict) -> dict."

_IMAGE_FORMATS = ("RGB", "BGR")


# ----------------------------------------------------------------------------------------------------- helpers
def _metadata(cfg) -> Any:
    """Metadata of the first training dataset (ignore_label, thing ids), or None without one."""
    names = list(cfg.DATASETS.TRAIN)
    if not names:
        return None
    from .catalog import MetadataCatalog

    return MetadataCatalog.get(names[0])


def _image_format(cfg) -> str:
    """``INPUT.FORMAT``, upper-cased and checked."""
    fmt = str(cfg.INPUT.FORMAT).upper()
    if fmt not in _IMAGE_FORMATS:
        raise ValueError(f"INPUT.FORMAT must be one of {_IMAGE_FORMATS}, got {cfg.INPUT.FORMAT!r}")
    return fmt


def _ignore_label(meta: Any) -> int:
    return int(meta.get("ignore_label", 255)) if meta is not None else 255


def _require(dataset_dict: dict, key: str) -> Any:
    if key not in dataset_dict:
        raise KeyError(
            f"dataset dict of {dataset_dict.get('file_name', '<no file_name>')!r} has no '{key}' "
            f"(keys: {sorted(dataset_dict)})"
        )
    return dataset_dict[key]


def _load_image(dataset_dict: dict) -> torch.Tensor:
    """3 x H x W uint8 RGB; checks the size recorded in the dataset dict."""
    file_name = _require(dataset_dict, "file_name")
    arr = read_image(file_name, "RGB")  # H x W x 3
    image = torch.from_numpy(np.array(arr, dtype=np.uint8)).permute(2, 0, 1).contiguous()
    h, w = image.shape[-2:]
    exp_h, exp_w = dataset_dict.get("height"), dataset_dict.get("width")
    if (exp_h is not None and exp_h != h) or (exp_w is not None and exp_w != w):
        raise ValueError(f"image {file_name} is {h}x{w} (HxW) but its dataset dict says {exp_h}x{exp_w}")
    return image


def _load_label_map(path: str, image: torch.Tensor, what: str) -> torch.Tensor:
    """H x W int64 label/id map, checked against the image size."""
    arr = read_png_ids(path)
    label = torch.from_numpy(np.array(arr)).to(torch.int64)
    if label.ndim != 2 or tuple(label.shape) != tuple(image.shape[-2:]):
        raise ValueError(f"{what} {path} has shape {tuple(label.shape)}, its image is {tuple(image.shape[-2:])}")
    return label


def _num_classes(meta: Any) -> int | None:
    """Number of semantic classes of a dataset (``len(stuff_classes)``), None when its metadata does not say."""
    classes = meta.get("stuff_classes", None) if meta is not None else None
    return len(classes) if classes else None


def _check_sem_seg_labels(sem: torch.Tensor, num_classes: int | None, ignore_label: int, path: str) -> None:
    """Every label must be a class id in [0, num_classes) or the ignore label; the error lists the bad values."""
    if num_classes is None:
        return
    bad = ((sem < 0) | (sem >= num_classes)) & (sem != ignore_label)
    if bad.any():
        values = torch.unique(sem[bad]).tolist()
        shown = ", ".join(str(v) for v in values[:20]) + (", ..." if len(values) > 20 else "")
        raise ValueError(
            f"semantic PNG {path} holds labels outside the dataset's {num_classes} classes (0..{num_classes - 1}) "
            f"and the ignore label {ignore_label}: {shown} ({int(bad.sum())} pixels)"
        )


def _image_pad_value(cfg) -> list[float]:
    """``MODEL.PIXEL_MEAN`` in RGB order, rounded to the uint8 grid: padding with it gives ~0 after the model's
    normalisation, as mmseg pads normalised images with 0."""
    mean = [float(v) for v in cfg.MODEL.PIXEL_MEAN]
    if len(mean) != 3:
        raise ValueError(f"MODEL.PIXEL_MEAN must have 3 values, got {cfg.MODEL.PIXEL_MEAN}")
    if _image_format(cfg) == "BGR":
        mean = mean[::-1]
    return [float(min(255, max(0, round(v)))) for v in mean]


def _compact_segment_map(pan_ids: torch.Tensor, segment_ids: Sequence[int], file_name: str) -> torch.Tensor:
    """Panoptic ids -> 1 + index of the segment in ``segments_info`` (0 where the id is not listed: void)."""
    if len(segment_ids) == 0:
        return torch.zeros(pan_ids.shape, dtype=torch.int64)
    ids = torch.as_tensor(list(segment_ids), dtype=torch.int64)
    if len(set(ids.tolist())) != len(ids):
        raise ValueError(f"segments_info of {file_name} repeats a segment id: {ids.tolist()}")
    sorted_ids, order = torch.sort(ids)
    pos = torch.searchsorted(sorted_ids, pan_ids).clamp_(max=len(ids) - 1)  # H x W index into sorted_ids
    return torch.where(sorted_ids[pos] == pan_ids, (order + 1)[pos], 0)


def _empty_instances(h: int, w: int) -> dict[str, torch.Tensor]:
    return {"gt_classes": torch.zeros((0,), dtype=torch.int64), "gt_masks": torch.zeros((0, h, w), dtype=torch.bool)}


def _instances_from_compact(compact: torch.Tensor, keep: Sequence[int], classes: Sequence[int]) -> dict:
    """Binary masks ``compact == k`` for the kept segment numbers ``keep``; segments cropped away are dropped."""
    h, w = compact.shape
    if len(keep) == 0:
        return _empty_instances(h, w)
    keep_t = torch.as_tensor(list(keep), dtype=torch.int64)
    masks = compact.unsqueeze(0) == keep_t.view(-1, 1, 1)  # N x H x W
    visible = masks.flatten(1).any(dim=1)
    return {"gt_classes": torch.as_tensor(list(classes), dtype=torch.int64)[visible], "gt_masks": masks[visible]}


def _decode_annotation_mask(segm: Any, h: int, w: int, file_name: str) -> np.ndarray:
    """Polygons / uncompressed RLE / compressed RLE -> H x W uint8."""
    from pycocotools import mask as mask_util

    if isinstance(segm, list):
        if not segm:
            return np.zeros((h, w), dtype=np.uint8)
        rle = mask_util.merge(mask_util.frPyObjects(segm, h, w))
    elif isinstance(segm, dict) and "counts" in segm:
        rle = mask_util.frPyObjects(segm, h, w) if isinstance(segm["counts"], list) else segm
    elif isinstance(segm, np.ndarray) and segm.ndim == 2:
        return (segm > 0).astype(np.uint8)
    else:
        raise ValueError(f"unsupported 'segmentation' of type {type(segm).__name__} in annotations of {file_name}")
    with warnings.catch_warnings():  # pycocotools' decoder warns about numpy 2's copy keyword on every call
        warnings.simplefilter("ignore", DeprecationWarning)
        mask = mask_util.decode(rle)
    if mask.shape != (h, w):
        raise ValueError(f"annotation mask of {file_name} has shape {mask.shape}, image is {(h, w)}")
    return mask


def _pack_bits(masks: torch.Tensor) -> torch.Tensor:
    """N x H x W binary -> ceil(N / 8) x H x W uint8, mask i in bit i % 8 of plane i // 8. Nearest resizing,
    cropping, flipping and zero padding copy pixel values, so they commute with the packing (8x less memory)."""
    n, h, w = masks.shape
    planes = (n + 7) // 8
    padded = torch.zeros((planes * 8, h, w), dtype=torch.uint8)
    padded[:n] = masks.to(torch.uint8)
    weights = (2 ** torch.arange(8, dtype=torch.int32)).view(1, 8, 1, 1)
    return (padded.view(planes, 8, h, w).to(torch.int32) * weights).sum(dim=1).to(torch.uint8)


def _unpack_bits(packed: torch.Tensor, n: int) -> torch.Tensor:
    """Inverse of :func:`_pack_bits`: planes x H x W uint8 -> n x H x W bool."""
    planes, h, w = packed.shape
    bits = torch.arange(8, dtype=torch.int32).view(1, 8, 1, 1)
    unpacked = (packed.to(torch.int32).unsqueeze(1) >> bits) & 1  # planes x 8 x H x W
    return unpacked.reshape(planes * 8, h, w)[:n].bool()


class _MapperBase:
    """Shared reading, augmentation and output formatting of the training mappers."""

    def __init__(self, cfg, is_train: bool = True, augmentations: Sequence[Callable] | Callable | None = None,
                 lsj: bool = False):
        self.is_train = is_train
        self.image_format = _image_format(cfg)
        meta = _metadata(cfg)
        self.ignore_label = _ignore_label(meta)
        self.num_classes = _num_classes(meta)
        thing_map = meta.get("thing_dataset_id_to_contiguous_id", None) if meta is not None else None
        self.thing_contiguous_ids = set(thing_map.values()) if thing_map else None
        if augmentations is None:
            augmentations = (build_lsj_augmentation(cfg, self.ignore_label) if lsj
                             else build_multiscale_augmentation(cfg, self.ignore_label))
        if not callable(augmentations):
            augmentations = v2.Compose(list(augmentations))
        self.augmentations = augmentations
        size_div = int(cfg.INPUT.SIZE_DIVISIBILITY)
        self.pad = PadToDivisible(size_div, seg_pad_value=self.ignore_label) if size_div > 0 else None

    def _augment(self, sample: dict[str, Any]) -> dict[str, Any]:
        sample = self.augmentations(sample)
        if self.pad is not None:
            sample = self.pad(sample)
        return sample

    def _output(self, dataset_dict: dict, orig_hw: tuple[int, int], image: torch.Tensor, instances: dict,
                sem_seg: torch.Tensor) -> dict:
        image = image.as_subclass(torch.Tensor)
        if self.image_format == "BGR":
            image = image.flip(0)
        h, w = image.shape[-2:]
        if tuple(sem_seg.shape) != (h, w) or tuple(instances["gt_masks"].shape[-2:]) != (h, w):
            raise RuntimeError(f"augmented targets of {dataset_dict.get('file_name')} lost alignment with the image")
        return {
            "file_name": dataset_dict.get("file_name"),
            "image_id": dataset_dict.get("image_id"),
            "height": int(dataset_dict.get("height", orig_hw[0])),
            "width": int(dataset_dict.get("width", orig_hw[1])),
            "image": image.contiguous(),
            "instances": instances,
            "sem_seg": sem_seg.as_subclass(torch.Tensor).to(torch.int64),
        }

    def _is_thing(self, seg: dict, file_name: str) -> bool:
        if "isthing" in seg:
            return bool(seg["isthing"])
        if self.thing_contiguous_ids is None:
            raise KeyError(
                f"segment {seg.get('id')} of {file_name} has no 'isthing' and the dataset metadata has no "
                "thing_dataset_id_to_contiguous_id to tell things from stuff"
            )
        return int(seg["category_id"]) in self.thing_contiguous_ids

    # panoptic path, shared by the panoptic mapper and the instance mapper without "annotations"
    def _map_panoptic(self, dataset_dict: dict, things_only: bool) -> dict:
        image = _load_image(dataset_dict)
        orig_hw = tuple(image.shape[-2:])
        file_name = dataset_dict.get("file_name", "?")
        pan_file = _require(dataset_dict, "pan_seg_file_name")
        segments = _require(dataset_dict, "segments_info")
        pan_ids = _load_label_map(pan_file, image, "panoptic PNG")
        compact = _compact_segment_map(pan_ids, [int(s["id"]) for s in segments], pan_file)

        # class of each segment number (0 = void); kept = segments that become instances
        lut = torch.full((len(segments) + 1,), self.ignore_label, dtype=torch.int64)
        keep, classes = [], []
        for k, seg in enumerate(segments, start=1):
            thing = self._is_thing(seg, file_name) if things_only else True
            if not thing:
                continue
            lut[k] = int(seg["category_id"])
            if not seg.get("iscrowd", 0):
                keep.append(k)
                classes.append(int(seg["category_id"]))
        sample = {"image": tv_tensors.Image(image), "segments": tv_tensors.Mask(compact),
                  "sem_seg": SemSegMask(lut[compact])}
        sample = self._augment(sample)
        compact_aug = sample["segments"].as_subclass(torch.Tensor)
        instances = _instances_from_compact(compact_aug, keep, classes)
        return self._output(dataset_dict, orig_hw, sample["image"], instances, sample["sem_seg"])


# ------------------------------------------------------------------------------------------------------ mappers
class PanopticDatasetMapper(_MapperBase):
    """Panoptic training targets (things and stuff) from a panoptic PNG + ``segments_info``."""

    def __call__(self, dataset_dict: dict) -> dict:
        return self._map_panoptic(dataset_dict, things_only=False)


class SemanticDatasetMapper(_MapperBase):
    """Semantic training targets from a semantic PNG (contiguous ids, ignore label elsewhere)."""

    def __call__(self, dataset_dict: dict) -> dict:
        image = _load_image(dataset_dict)
        orig_hw = tuple(image.shape[-2:])
        sem_file = _require(dataset_dict, "sem_seg_file_name")
        sem = _load_label_map(sem_file, image, "semantic PNG")
        _check_sem_seg_labels(sem, self.num_classes, self.ignore_label, sem_file)
        sample = self._augment({"image": tv_tensors.Image(image), "sem_seg": SemSegMask(sem)})
        sem_aug = sample["sem_seg"].as_subclass(torch.Tensor)
        classes = torch.unique(sem_aug)
        classes = classes[classes != self.ignore_label]
        instances = {"gt_classes": classes.to(torch.int64),
                     "gt_masks": sem_aug.unsqueeze(0) == classes.view(-1, 1, 1)}  # N x H x W
        return self._output(dataset_dict, orig_hw, sample["image"], instances, sem_aug)


class InstanceDatasetMapper(_MapperBase):
    """Instance training targets (things only) from ``annotations`` or from thing segments of a panoptic PNG."""

    def __call__(self, dataset_dict: dict) -> dict:
        if "annotations" not in dataset_dict:
            return self._map_panoptic(dataset_dict, things_only=True)
        image = _load_image(dataset_dict)
        h, w = image.shape[-2:]
        file_name = dataset_dict.get("file_name", "?")
        anns = [a for a in dataset_dict["annotations"] if not a.get("iscrowd", 0)]
        masks = np.zeros((len(anns), h, w), dtype=np.uint8)
        for i, ann in enumerate(anns):
            masks[i] = _decode_annotation_mask(_require(ann, "segmentation"), h, w, file_name)
        classes = torch.as_tensor([int(a["category_id"]) for a in anns], dtype=torch.int64)
        masks_t = torch.from_numpy(masks)  # N x H x W
        sem = torch.full((h, w), self.ignore_label, dtype=torch.int64)
        for i in range(len(anns)):  # later annotations win where instances overlap
            sem[masks_t[i].bool()] = classes[i]
        sample = {"image": tv_tensors.Image(image), "sem_seg": SemSegMask(sem)}
        if len(anns):  # an empty N=0 stack is not passed through the resize kernels
            sample["masks"] = tv_tensors.Mask(_pack_bits(masks_t))
        sample = self._augment(sample)
        if len(anns):
            gt_masks = _unpack_bits(sample["masks"].as_subclass(torch.Tensor), len(anns))
        else:
            gt_masks = torch.zeros((0, *sample["image"].shape[-2:]), dtype=torch.bool)
        visible = gt_masks.flatten(1).any(dim=1)
        instances = {"gt_classes": classes[visible], "gt_masks": gt_masks[visible]}
        return self._output(dataset_dict, (h, w), sample["image"], instances, sample["sem_seg"])


class SemSegDatasetMapper:
    """Lean semantic training input: ``"image"`` (uint8 3 x H x W) and ``"sem_seg"`` (int64 H x W, ignore label where
    unlabelled and where padded), plus ``"height"``/``"width"`` (original size), ``"file_name"``, ``"image_id"``.

    Augmentation: :func:`build_semantic_augmentation` (mmseg/Segmenter); images are padded with the pixel mean.
    Normalisation stays in the model (``MODEL.PIXEL_MEAN`` / ``PIXEL_STD``).
    """

    def __init__(self, cfg, is_train: bool = True, augmentations: Callable | None = None):
        self.is_train = is_train
        self.image_format = _image_format(cfg)
        meta = _metadata(cfg)
        self.ignore_label = _ignore_label(meta)
        self.num_classes = _num_classes(meta)
        pad_value = _image_pad_value(cfg)
        self.augmentations = (augmentations if augmentations is not None
                              else build_semantic_augmentation(cfg, self.ignore_label, pad_value))
        size_div = int(cfg.INPUT.SIZE_DIVISIBILITY)
        self.pad = PadToDivisible(size_div, pad_value, self.ignore_label) if size_div > 0 else None

    def __call__(self, dataset_dict: dict) -> dict:
        image = _load_image(dataset_dict)
        h0, w0 = image.shape[-2:]
        sem_file = _require(dataset_dict, "sem_seg_file_name")
        sem = _load_label_map(sem_file, image, "semantic PNG")
        _check_sem_seg_labels(sem, self.num_classes, self.ignore_label, sem_file)
        sample = self.augmentations({"image": tv_tensors.Image(image), "sem_seg": SemSegMask(sem)})
        if self.pad is not None:
            sample = self.pad(sample)
        image = sample["image"].as_subclass(torch.Tensor)
        if self.image_format == "BGR":
            image = image.flip(0)
        return {
            "file_name": dataset_dict.get("file_name"),
            "image_id": dataset_dict.get("image_id"),
            "height": int(dataset_dict.get("height", h0)),
            "width": int(dataset_dict.get("width", w0)),
            "image": image.contiguous(),
            "sem_seg": sample["sem_seg"].as_subclass(torch.Tensor).to(torch.int64).contiguous(),
        }


class InferenceDatasetMapper:
    """Inference input: image resized by its shortest edge, original height/width, other dict keys kept."""

    def __init__(self, cfg, augmentations: Callable | None = None):
        self.image_format = _image_format(cfg)
        self.augmentations = augmentations if augmentations is not None else build_test_augmentation(cfg)

    def __call__(self, dataset_dict: dict) -> dict:
        out = copy.copy(dataset_dict)
        out.pop("annotations", None)
        image = _load_image(dataset_dict)
        out.setdefault("height", int(image.shape[-2]))
        out.setdefault("width", int(image.shape[-1]))
        image = self.augmentations(tv_tensors.Image(image)).as_subclass(torch.Tensor)
        if self.image_format == "BGR":
            image = image.flip(0)
        out["image"] = image.contiguous()
        return out


# ----------------------------------------------------------------------------------------------------- registry
@DATASET_MAPPER.register()
def coco_panoptic_lsj(cfg, is_train: bool = True):
    """COCO panoptic with large-scale jitter."""
    return PanopticDatasetMapper(cfg, is_train, lsj=True) if is_train else InferenceDatasetMapper(cfg)


@DATASET_MAPPER.register()
def coco_instance_lsj(cfg, is_train: bool = True):
    """COCO instances with large-scale jitter."""
    return InstanceDatasetMapper(cfg, is_train, lsj=True) if is_train else InferenceDatasetMapper(cfg)


@DATASET_MAPPER.register()
def mask_former_panoptic(cfg, is_train: bool = True):
    """Panoptic with multi-scale resize + crop (Cityscapes, ADE20K)."""
    return PanopticDatasetMapper(cfg, is_train) if is_train else InferenceDatasetMapper(cfg)


@DATASET_MAPPER.register()
def mask_former_semantic(cfg, is_train: bool = True):
    """Semantic with multi-scale resize + crop (Cityscapes, ADE20K)."""
    return SemanticDatasetMapper(cfg, is_train) if is_train else InferenceDatasetMapper(cfg)


@DATASET_MAPPER.register()
def sem_seg(cfg, is_train: bool = True):
    """Lean semantic (image + sem_seg) with the mmseg/Segmenter pipeline (plain-ViT segmenters)."""
    return SemSegDatasetMapper(cfg, is_train) if is_train else InferenceDatasetMapper(cfg)


@DATASET_MAPPER.register()
def mask_former_instance(cfg, is_train: bool = True):
    """Instances with multi-scale resize + crop (Cityscapes)."""
    return InstanceDatasetMapper(cfg, is_train) if is_train else InferenceDatasetMapper(cfg)


def build_mapper(cfg, is_train: bool = True) -> Callable[[dict], dict]:
    """The mapper named by ``INPUT.DATASET_MAPPER_NAME`` (training) or the test mapper."""
    if not is_train:
        return InferenceDatasetMapper(cfg)
    name = cfg.INPUT.DATASET_MAPPER_NAME
    if name not in DATASET_MAPPER:
        known = sorted(k for k, _ in DATASET_MAPPER)
        raise KeyError(f"INPUT.DATASET_MAPPER_NAME {name!r} is not a registered mapper; known: {known}")
    return DATASET_MAPPER.get(name)(cfg, True)


def build_test_mapper(cfg) -> InferenceDatasetMapper:
    """The inference mapper used by ``build_detection_test_loader``."""
    return InferenceDatasetMapper(cfg)
