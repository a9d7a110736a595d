"""``MODEL.DEVICE`` -> a torch device, with the CPU fallback every entry point shares; host-to-device
copies that do not wait for the GPU."""
from __future__ import annotations

import logging

import torch

__all__ = ["resolve_device", "to_device"]

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


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Copy a small CPU tensor to ``device`` without a host sync: on CUDA the copy goes from
    pinned memory with ``non_blocking=True``, so the CPU does not wait for queued kernels (a
    plain ``.to(device)`` of pageable memory waits for them)."""
    device = torch.device(device)
    if device.type == "cuda" and t.device.type == "cpu":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)
