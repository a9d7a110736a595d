"""Batch images of different sizes into one padded tensor (Detectron2's ImageList)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Sequence, Tuple

import torch
import torch.nn.functional as F


@dataclass
class ImageList:
    """A padded batch and the unpadded size of each image in it."""

    tensor: torch.Tensor  # B x C x Hpad x Wpad
    image_sizes: List[Tuple[int, int]]

    @classmethod
    def from_tensors(cls, tensors: Sequence[torch.Tensor], size_divisibility: int = 0, pad_value: float = 0.0) -> "ImageList":
        """Pad every C x H x W tensor to the largest size, rounded up to ``size_divisibility``."""
        if len(tensors) == 0:
            raise ValueError("ImageList.from_tensors needs at least one image")
        sizes = [(int(t.shape[-2]), int(t.shape[-1])) for t in tensors]
        max_h = max(h for h, _ in sizes)
        max_w = max(w for _, w in sizes)
        if size_divisibility > 1:
            max_h = (max_h + size_divisibility - 1) // size_divisibility * size_divisibility
            max_w = (max_w + size_divisibility - 1) // size_divisibility * size_divisibility
        padded = [F.pad(t, (0, max_w - t.shape[-1], 0, max_h - t.shape[-2]), value=pad_value) for t in tensors]
        return cls(torch.stack(padded, dim=0), sizes)
