"""Pictures of token maps: what became of each patch token of a token-reduction Segmenter.

``model.token_maps(images)`` gives per image one :class:`~eco_m2f.modeling.token_reduction.TokenMap`
per map (the framework's ``"blocks"``: after which block each cell's token left; a method's own,
e.g. shared window sizes). Each becomes a label-grid panel over the image
(:func:`~eco_m2f.visualization.label_grid.label_grid_panel`). A map's grid covers the padded
batch the network saw; only the cells of the image itself are drawn and counted, placed over
the picture at the scale between it and the network input (the mapper resizes images), so the
maps can stand beside the result drawn at the original size. The demo (``--show-tokens``) and
``scripts/visualize_token_maps.py`` both draw them with :func:`token_map_panels`.
"""
from __future__ import annotations

import os
from fractions import Fraction
from typing import Any, Dict, List, Mapping, Sequence, Tuple

import numpy as np
import torch

from .panels import Panel

__all__ = ["image_cells", "model_token_maps", "token_map_counts", "token_map_legend", "token_map_panels",
           "write_token_maps"]

Color = Tuple[int, int, int]
Size = Tuple[int, int]
# from early (first value) to late: warm to cool; the last value (e.g. "all blocks") is light grey
_RAMP: Tuple[Color, ...] = ((215, 48, 39), (244, 109, 67), (253, 174, 97), (254, 224, 144), (171, 217, 233),
                            (116, 173, 209), (69, 117, 180), (49, 54, 149))
_LAST: Color = (235, 235, 235)


def token_map_legend(labels: Dict[int, str], present: Sequence[int]) -> List[Tuple[int, str, Color]]:
    """(value, text, colour) for every value of ``labels``, in order: the values spread over a
    warm-to-cool ramp, the largest one light grey (the tokens that went all the way)."""
    values = sorted(int(v) for v in labels)
    unknown = sorted(set(int(v) for v in present) - set(values))
    if unknown:
        raise ValueError(f"token map holds values {unknown} that its labels do not describe ({values})")
    ramp = len(values) - 1 if len(values) > 1 else 1  # values on the ramp (all but the last)
    out = []
    for i, v in enumerate(values):
        if i == ramp:
            color = _LAST
        else:
            color = _RAMP[round(i * (len(_RAMP) - 1) / max(1, ramp - 1))]
        out.append((v, labels[v], color))
    return out


def model_token_maps(model: torch.nn.Module, inputs: Sequence[Mapping[str, Any]]) -> Tuple[List[Dict[str, Any]], Size]:
    """Per input, the token maps of one pass of the model's encoder over the batch, padded as
    its whole-image inference pads it, and the padded size (H, W) that their grids cover."""
    if not getattr(model, "records_token_maps", False):
        raise ValueError(f"{type(model).__name__} records no token maps (only a token-reduction encoder does)")
    with torch.no_grad():
        images = model.preprocess_image([dict(x) for x in inputs]).tensor  # B x 3 x H x W, padded
        maps = model.token_maps(images)
    return maps, (int(images.shape[-2]), int(images.shape[-1]))


def _patch(grid_shape: Sequence[int], padded_size: Size) -> Size:
    """Pixels per cell of a grid that tiles the padded batch."""
    gh, gw = int(grid_shape[0]), int(grid_shape[1])
    if padded_size[0] % gh or padded_size[1] % gw:
        raise ValueError(f"a {gh}x{gw} token map does not tile the padded {padded_size[0]}x{padded_size[1]} input")
    return padded_size[0] // gh, padded_size[1] // gw


def image_cells(token_map: Any, network_size: Size, padded_size: Size) -> np.ndarray:
    """The map's values over the cells of the image (``network_size``: the mapped image's H, W
    at the top left of the ``padded_size`` batch), the padding's cells cut off."""
    values = token_map.values.cpu().numpy() if hasattr(token_map.values, "cpu") else np.asarray(token_map.values)
    ph, pw = _patch(values.shape, padded_size)
    return values[: -(-int(network_size[0]) // ph), : -(-int(network_size[1]) // pw)]


def token_map_counts(maps: Mapping[str, Any], network_size: Size, padded_size: Size) -> Dict[str, Dict[str, int]]:
    """title -> {label: cells of the image with that label} of every map (labels of no cell left out)."""
    out: Dict[str, Dict[str, int]] = {}
    for token_map in maps.values():
        values = image_cells(token_map, network_size, padded_size)
        counts = {}
        for v in sorted(token_map.labels):
            n = int((values == v).sum())
            if n:
                counts[token_map.labels[v]] = n
        out[token_map.title] = counts
    return out


def token_map_panels(maps: Mapping[str, Any], image: np.ndarray, network_size: Size, padded_size: Size,
                     alpha: float = 0.6) -> List[Panel]:
    """One panel per map over ``image`` (H x W x 3 uint8, any size: the original or the mapped
    input), the cells placed at the scale between ``image`` and ``network_size``, with a legend
    counting the image's cells of each label."""
    from .label_grid import GridLabel, label_grid_panel

    h, w = int(network_size[0]), int(network_size[1])
    panels = []
    for token_map in maps.values():
        values = image_cells(token_map, network_size, padded_size)
        ph, pw = _patch(token_map.values.shape, padded_size)
        cell = (Fraction(ph * image.shape[0], h), Fraction(pw * image.shape[1], w))
        legend = [GridLabel(v, text, color) for v, text, color in token_map_legend(token_map.labels, np.unique(values))]
        panels.append(label_grid_panel(values, legend, image=image, title=token_map.title, alpha=alpha, cell_size=cell))
    return panels


def _image_rgb(x: Dict[str, Any], input_format: str) -> np.ndarray:
    """The mapped input image (3 x H x W uint8) as H x W x 3 RGB."""
    image = x["image"].permute(1, 2, 0).cpu().numpy()
    return image[:, :, ::-1].copy() if input_format == "BGR" else image


def write_token_maps(model: torch.nn.Module, inputs: Sequence[Dict[str, Any]], out_dir: str, prefix: str = "token_maps") -> List[str]:
    """One PNG per input (the mapped image, then each token map over it); returns the paths."""
    from .panels import render_figure, save_picture

    os.makedirs(out_dir, exist_ok=True)
    paths = []
    for i, x in enumerate(inputs):
        maps, padded = model_token_maps(model, [x])
        rgb = _image_rgb(x, model.input_format)
        panels = [Panel(rgb, str(x.get("file_name", f"image {i}")).rsplit("/", 1)[-1])]
        panels.extend(token_map_panels(maps[0], rgb, rgb.shape[:2], padded))
        path = os.path.join(out_dir, f"{prefix}_{i:03d}.png")
        save_picture(path, render_figure([panels]).image)
        paths.append(path)
    return paths
