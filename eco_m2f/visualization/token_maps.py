"""Pictures of token maps: what became of each patch token of a token-reduction Segmenter.

``model.token_maps(images)`` gives per image one :class:`~eco_m2f.modeling.token_reduction.TokenMap`
per map (the framework's ``"blocks"``: after which block each cell's token left; a method's own,
e.g. shared window sizes). Each becomes a label-grid panel over the image
(:func:`~eco_m2f.visualization.label_grid.label_grid_panel`), beside the input, one PNG per image.
"""
from __future__ import annotations

import os
from typing import Any, Dict, List, Sequence, Tuple

import numpy as np
import torch

__all__ = ["token_map_legend", "write_token_maps"]

Color = Tuple[int, int, int]
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


def _image_rgb(x: Dict[str, Any], input_format: str) -> np.ndarray:
    """The mapped input image (3 x H x W uint8) as H x W x 3 RGB."""
    image = x["image"].permute(1, 2, 0).cpu().numpy()
    return image[:, :, ::-1].copy() if input_format == "BGR" else image


def write_token_maps(model: torch.nn.Module, inputs: Sequence[Dict[str, Any]], out_dir: str, prefix: str = "token_maps") -> List[str]:
    """One PNG per input (the mapped image, then each token map over it); returns the paths."""
    from .label_grid import GridLabel, label_grid_panel
    from .panels import Panel, render_figure, save_picture

    os.makedirs(out_dir, exist_ok=True)
    paths = []
    for i, x in enumerate(inputs):
        images = model.preprocess_image([x]).tensor
        maps = model.token_maps(images)[0]
        rgb = _image_rgb(x, model.input_format)
        h, w = rgb.shape[:2]
        panels = [Panel(rgb, str(x.get("file_name", f"image {i}")).rsplit("/", 1)[-1])]
        for token_map in maps.values():
            values = token_map.values.numpy()
            gh, gw = values.shape
            patch = images.shape[-2] // gh
            # the grid covers the padded input: cut it to the image's cells
            values = values[: -(-h // patch), : -(-w // patch)]
            legend = [GridLabel(v, text, color) for v, text, color in token_map_legend(token_map.labels, np.unique(values))]
            panels.append(label_grid_panel(values, legend, image=rgb, title=token_map.title))
        path = os.path.join(out_dir, f"{prefix}_{i:03d}.png")
        save_picture(path, render_figure([panels]).image)
        paths.append(path)
    return paths
