"""``MODEL.DEVICE`` -> a torch device, with the CPU fallback every entry point shares."""
from __future__ import annotations

import logging

import torch

__all__ = ["resolve_device"]

logger = logging.getLogger(__name__)


def resolve_device(name: str) -> torch.device:
    """"cuda"/"cuda:N"/"gpu" when CUDA is available (else CPU, with a warning), or "cpu".

    Any other value is an error naming ``MODEL.DEVICE``.
    """
    device = str(name).lower()
    if device.startswith("cuda") or device == "gpu":
        if torch.cuda.is_available():
            return torch.device("cuda" if device == "gpu" else device)
        logger.warning("MODEL.DEVICE is '%s' but CUDA is not available: running on CPU", name)
        return torch.device("cpu")
    if device == "cpu":
        return torch.device("cpu")
    raise ValueError(f"MODEL.DEVICE '{name}' is not supported; use 'cuda' or 'cpu'")
