"""The model and the class names a picture-making command needs, from the config alone.

The demo and the dataset figure build the model of ``MODEL.META_ARCHITECTURE``, load its
weights strictly (a mismatching checkpoint is an error listing the keys) and say loudly when
the result means nothing: no weights at all, or backbone weights only.
"""
from __future__ import annotations

import logging
from typing import Any, Optional

import torch
import torch.nn as nn

from .classes import ClassPalette

__all__ = ["build_inference_model", "dataset_palette", "inference_device", "metadata_of"]

logger = logging.getLogger(__name__)

UNTRAINED_WARNING = (
    "MODEL.WEIGHTS is empty: the model has random weights (untrained) and its predictions mean nothing. "
    "Pass a checkpoint with --opts MODEL.WEIGHTS path/to/model_final.pth"
)


def inference_device(cfg: Any) -> torch.device:
    """``MODEL.DEVICE``; CUDA that is not available falls back to the CPU with a warning (as training)."""
    device = str(cfg.MODEL.DEVICE).lower()
    if device.startswith("cuda") or device == "gpu":
        if torch.cuda.is_available():
            return torch.device("cuda" if device == "gpu" else device)
        logger.warning("MODEL.DEVICE is '%s' but CUDA is not available: running on CPU", cfg.MODEL.DEVICE)
        return torch.device("cpu")
    if device == "cpu":
        return torch.device("cpu")
    raise ValueError(f"MODEL.DEVICE '{cfg.MODEL.DEVICE}' is not supported; use 'cuda' or 'cpu'")


def build_inference_model(cfg: Any, weights: Optional[str] = None) -> nn.Module:
    """The config's model with ``weights`` (default ``MODEL.WEIGHTS``) loaded, on its device, in eval mode."""
    from ..checkpoint import load_weights
    from ..architectures import build_model

    weights = cfg.MODEL.WEIGHTS if weights is None else weights
    model = build_model(cfg)
    if not weights:
        logger.warning(UNTRAINED_WARNING)
    else:
        report = load_weights(model, weights)
        if report.backbone_only:
            logger.warning("%s holds backbone weights only: the rest of the model is untrained and its "
                           "predictions mean nothing", weights)
        logger.info("Loaded %s: %d tensors", weights, len(report.loaded))
    return model.to(inference_device(cfg)).eval()


def metadata_of(cfg: Any, dataset_name: Optional[str] = None) -> Any:
    """Catalog metadata of ``dataset_name``, else of ``DATASETS.TEST[0]``, else ``DATASETS.TRAIN[0]``; or None."""
    from ..data import MetadataCatalog

    names = [dataset_name] if dataset_name else [*cfg.DATASETS.TEST, *cfg.DATASETS.TRAIN]
    return MetadataCatalog.get(names[0]) if names else None


def dataset_palette(cfg: Any, dataset_name: Optional[str] = None) -> ClassPalette:
    """Class names and colours of the config's dataset (see :func:`metadata_of`); generic ones,
    ``MODEL.SEM_SEG_HEAD.NUM_CLASSES`` of them, with a warning when the dataset names none."""
    meta = metadata_of(cfg, dataset_name)
    if meta is not None and ("stuff_classes" in meta or "thing_classes" in meta):
        return ClassPalette.from_metadata(meta)
    where = f"dataset '{meta.name}'" if meta is not None else "the config (DATASETS.TEST and DATASETS.TRAIN are empty)"
    logger.warning("No class names in %s: classes are drawn as 'class 0', 'class 1', ...", where)
    return ClassPalette.generic(int(cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES))
