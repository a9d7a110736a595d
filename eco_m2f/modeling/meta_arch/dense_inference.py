"""Dense semantic inference of any network on normalised images: whole image or sliding window.

``network`` maps a normalised, padded batch B x 3 x H x W to class scores B x K x H x W at the
same (padded) size; both functions return one K x h x w map per image at that image's own size
(the padding cropped off).

Sliding windows follow mmseg's grid: along each axis ``ceil((L - crop) / stride) + 1`` windows
(one if the image is shorter than the crop), the last one flush with the far border; a window
never extends past the image, so an image smaller than the crop is one window of its own size.
Windows of every image of the batch are run together, ``batch_size`` at a time, grouped by
shape (so no window is padded beyond the patch size), and the scores of overlapping windows
are averaged per pixel.
"""
from __future__ import annotations

from collections import defaultdict
from typing import Callable, Dict, List, Sequence, Tuple

import torch

from .image_list import ImageList

__all__ = ["predict_whole", "predict_sliding", "window_boxes"]

Network = Callable[[torch.Tensor], torch.Tensor]
Box = Tuple[int, int, int, int]  # y0, y1, x0, x1


def _axis_starts(length: int, crop: int, stride: int) -> List[int]:
    if length <= crop:
        return [0]
    count = -(-(length - crop) // stride) + 1
    return [min(i * stride, length - crop) for i in range(count)]


def window_boxes(height: int, width: int, crop: Sequence[int], stride: Sequence[int]) -> List[Box]:
    """(y0, y1, x0, x1) of every window of an image of ``height`` x ``width``."""
    ch, cw = int(crop[0]), int(crop[1])
    return [
        (y, min(y + ch, height), x, min(x + cw, width))
        for y in _axis_starts(height, ch, int(stride[0]))
        for x in _axis_starts(width, cw, int(stride[1]))
    ]


def predict_whole(network: Network, images: Sequence[torch.Tensor], size_divisibility: int) -> List[torch.Tensor]:
    """Scores of each C x h x w image, the batch padded together (bottom/right) as in training."""
    batch = ImageList.from_tensors(list(images), size_divisibility)
    scores = network(batch.tensor)
    return [s[:, :h, :w] for s, (h, w) in zip(scores, batch.image_sizes)]


def predict_sliding(
    network: Network,
    images: Sequence[torch.Tensor],
    crop: Sequence[int],
    stride: Sequence[int],
    size_divisibility: int,
    batch_size: int = 0,
) -> List[torch.Tensor]:
    """Scores of each C x h x w image from windows of ``crop`` every ``stride`` pixels (averaged where they overlap)."""
    by_shape: Dict[Tuple[int, int], List[Tuple[int, Box]]] = defaultdict(list)
    for i, image in enumerate(images):
        for box in window_boxes(image.shape[-2], image.shape[-1], crop, stride):
            by_shape[(box[1] - box[0], box[3] - box[2])].append((i, box))

    sums: List[torch.Tensor | None] = [None] * len(images)
    counts = [torch.zeros((1, *img.shape[-2:]), device=img.device) for img in images]
    for windows in by_shape.values():
        step = batch_size if batch_size > 0 else len(windows)
        for start in range(0, len(windows), step):
            chunk = windows[start : start + step]
            crops = [images[i][:, y0:y1, x0:x1] for i, (y0, y1, x0, x1) in chunk]
            for (i, (y0, y1, x0, x1)), scores in zip(chunk, predict_whole(network, crops, size_divisibility)):
                if sums[i] is None:
                    sums[i] = scores.new_zeros((scores.shape[0], *images[i].shape[-2:]), dtype=torch.float32)
                sums[i][:, y0:y1, x0:x1] += scores.float()
                counts[i][:, y0:y1, x0:x1] += 1
    return [s / c for s, c in zip(sums, counts)]
