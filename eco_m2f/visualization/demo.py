"""Run a model on image files and write, per image, the drawn result (PNG) and its segments (JSON).

What ``demo/demo.py`` does, as a function: the inputs are expanded to files (see
:mod:`.inputs`), read lazily and mapped as the test loader maps dataset images, run in
batches, drawn over the original image with the dataset's class colours and the image's
cost record (for ECO-M2F: the encoder exit and its encoder GFLOPs; for a token-reduction
Segmenter: its live tokens per block and GFLOPs; the CTS policy network's superpatches that it
would share, and their probabilities, instead of segments), and written as ``OUTPUT/<name>.png`` +
``OUTPUT/<name>.json``. With ``show_tokens`` a model that records token maps (any
token-reduction Segmenter) gets, beside the result, one panel per map of what became of each
patch token (:mod:`.token_maps`), from a second encoder pass over the same padded batch; the
JSON then counts the image's cells of each label. An input that cannot be read is reported and
skipped; the others are still written.
"""
from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Optional, Sequence

import torch
import torch.nn as nn
from torch.utils.data import DataLoader

from ..data.build import trivial_batch_collator
from ..data.io import png_bytes, read_image
from ..data.mappers import build_test_mapper
from .classes import ClassPalette
from .cost import GFLOPS, ImageGflops, cost_notes, cost_record
from .drawing import prediction_panel
from .inference import dataset_palette
from .inputs import ImageFiles, InputFailure, expand_inputs
from .panels import Panel, render_figure
from .policy import policy_panel, policy_record
from .segments import TASK_ORDER, prediction_layers
from .token_maps import model_token_maps, token_map_counts, token_map_panels

__all__ = ["DemoReport", "output_names", "run_demo"]

logger = logging.getLogger(__name__)

#: ``extra_panels(mapped_input, output) -> panels`` drawn beside the result (e.g. token maps).
ExtraPanels = Callable[[Mapping[str, Any], Mapping[str, Any]], Sequence[Panel]]


@dataclass
class DemoReport:
    """The files written (PNG paths, in input order) and the inputs that failed."""

    written: list[str] = field(default_factory=list)
    failures: list[InputFailure] = field(default_factory=list)


def output_names(paths: Sequence[str]) -> list[str]:
    """A distinct output name per input: its file stem, ``_2``, ``_3``... appended on a clash."""
    used: set[str] = set()
    names = []
    for path in paths:
        stem = os.path.splitext(os.path.basename(path))[0] or "image"
        name, k = stem, 1
        while name in used:
            k += 1
            name = f"{stem}_{k}"
        used.add(name)
        names.append(name)
    return names


def _write_atomically(path: str, data: bytes) -> None:
    """A killed run leaves whole files or none."""
    tmp = f"{path}.tmp"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def _result_record(mapped: Mapping[str, Any], layers: Mapping[str, Any], cost: Optional[dict],
                   token_maps: Optional[dict] = None, policy: Optional[dict] = None) -> dict[str, Any]:
    record: dict[str, Any] = {
        "file_name": mapped["file_name"],
        "height": int(mapped["height"]),
        "width": int(mapped["width"]),
        "drawn": next((t for t in TASK_ORDER if t in layers), "policy"),
    }
    for task, layer in layers.items():
        record[task] = [s.to_json() for s in layer.segments]
    if policy is not None:
        record["policy"] = policy
    if cost is not None:
        record["cost"] = cost
    if token_maps is not None:
        record["token_maps"] = token_maps
    return record


def _token_maps_wanted(cfg: Any, model: nn.Module, show_tokens: bool) -> bool:
    """``show_tokens`` where the model can: else one warning line, and the results without maps."""
    if not show_tokens:
        return False
    if not getattr(model, "records_token_maps", False):
        logger.warning("Token maps asked for, but %s records none (only a token-reduction Segmenter does, "
                       "MODEL.TOKEN_REDUCTION.NAME): writing the results without them", type(model).__name__)
        return False
    test = getattr(cfg, "TEST", None)
    several = [k for k, on in (("TEST.SLIDE", test is not None and "SLIDE" in test and test.SLIDE.ENABLED),
                               ("TEST.AUG", test is not None and "AUG" in test and test.AUG.ENABLED)) if on]
    if several:
        logger.warning("%s: the prediction comes from several passes, the token maps from one whole-image pass "
                       "of each batch", " and ".join(several))
    return True


def _json_text(record: Mapping[str, Any]) -> str:
    """The record as JSON with one segment per line (valid JSON, easy to read and to grep)."""
    parts = []
    for key, value in record.items():
        if isinstance(value, list):
            text = "[\n  " + ",\n  ".join(json.dumps(v) for v in value) + "\n ]" if value else "[]"
        else:
            text = json.dumps(value)
        parts.append(f" {json.dumps(key)}: {text}")
    return "{\n" + ",\n".join(parts) + "\n}\n"


def run_demo(cfg: Any, model: nn.Module, inputs: Sequence[str], output_dir: str, *,
             confidence_threshold: float = 0.5, batch_size: int = 1, count_gflops: bool = True,
             classes: Optional[ClassPalette] = None, extra_panels: Optional[ExtraPanels] = None,
             show_tokens: bool = False, progress: bool = True) -> DemoReport:
    """Write ``<name>.png`` and ``<name>.json`` into ``output_dir`` for every readable image of ``inputs``.

    ``confidence_threshold`` drops instances scoring less (panoptic and semantic segments
    have no score); ``count_gflops`` adds the encoder GFLOPs of an output whose cost record
    names an exit; ``show_tokens`` draws the token maps of a model that records them (see the
    module docstring; a warning for one that does not). ``model`` is in eval mode on its device
    (:func:`.inference.build_inference_model`).
    """
    from tqdm import tqdm

    if batch_size < 1:
        raise ValueError(f"batch size must be at least 1, got {batch_size}")
    paths, failures = expand_inputs(inputs)
    for f in failures:
        logger.error("%s: %s", f.path, f.reason)
    report = DemoReport(failures=list(failures))
    if not paths:
        return report
    os.makedirs(output_dir, exist_ok=True)
    classes = classes or dataset_palette(cfg)
    names = output_names(paths)
    gflops = ImageGflops(model) if count_gflops else None
    with_maps = _token_maps_wanted(cfg, model, show_tokens)
    workers = min(int(cfg.DATALOADER.NUM_WORKERS), len(paths))
    loader = DataLoader(ImageFiles(paths, build_test_mapper(cfg)), batch_size=batch_size, shuffle=False,
                        num_workers=workers, collate_fn=trivial_batch_collator)
    logger.info("Running on %d images, writing to %s", len(paths), output_dir)
    with torch.no_grad(), tqdm(total=len(paths), unit="image", disable=not progress) as bar:
        for batch in loader:
            good = []
            for x in batch:
                if "error" in x:
                    logger.error("%s: %s", x["file_name"], x["error"])
                    report.failures.append(InputFailure(x["file_name"], x["error"]))
                else:
                    good.append(x)
            outputs = model(good) if good else []
            maps, padded = model_token_maps(model, good) if with_maps and good else (None, None)
            for k, (x, out) in enumerate(zip(good, outputs)):
                name = names[x["image_id"]]
                image = read_image(x["file_name"], "RGB")  # the original, oriented as the mapper read it
                layers = prediction_layers(out, classes, confidence_threshold, where=x["file_name"])
                cost = cost_record(out)
                if cost is not None and gflops is not None and GFLOPS not in cost:
                    cost.update(gflops(x, cost))
                network_size = tuple(x["image"].shape[-2:])  # the mapped image, before padding
                policy = None
                if not layers and "policy" in out:  # the CTS policy network: superpatches, no segments
                    panels = [policy_panel(out["policy"], image, network_size)]
                    panels[0].notes.extend(cost_notes(cost) if cost else [])
                    policy = policy_record(out["policy"])
                else:
                    panels = [prediction_panel(image, layers, classes, cost=cost)]
                counts = None
                if maps is not None:
                    panels.extend(token_map_panels(maps[k], image, network_size, padded))
                    counts = token_map_counts(maps[k], network_size, padded)
                if extra_panels is not None:
                    panels.extend(extra_panels(x, out))
                png = os.path.join(output_dir, f"{name}.png")
                _write_atomically(png, png_bytes(render_figure([panels]).image))
                record = _json_text(_result_record(x, layers, cost, counts, policy))
                _write_atomically(os.path.join(output_dir, f"{name}.json"), record.encode("utf-8"))
                report.written.append(png)
            bar.update(len(batch))
    return report
