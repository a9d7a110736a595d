"""Official Mask2Former checkpoints load unchanged: keys, shapes and parameter counts.

For the three official configs in ../shared/reference/m2f_state_dict_keys.json, a model built
from our equivalent config (no weights) must accept a state dict with exactly the official keys
and shapes: strict loading through the documented backbone key map, nothing missing, nothing
unexpected, and the same number of parameters.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from eco_m2f.checkpoint import CheckpointMismatchError, load_weights
from eco_m2f.config import setup_cfg
from eco_m2f.architectures import build_model

REPO = Path(__file__).resolve().parents[1]
CONFIGS = {
    "coco_panoptic_R50": "configs/coco/panoptic-segmentation/maskformer2_R50_bs16_50ep.yaml",
    "coco_panoptic_swin_tiny": "configs/coco/panoptic-segmentation/swin/maskformer2_swin_tiny_bs16_50ep.yaml",
    "cityscapes_panoptic_R50": "configs/cityscapes/panoptic-segmentation/maskformer2_R50_bs16_90k.yaml",
}
BUFFER_SUFFIXES = ("running_mean", "running_var", "num_batches_tracked", "relative_position_index")


@pytest.fixture(scope="module")
def reference(shared_dir):
    return json.loads((shared_dir / "reference" / "m2f_state_dict_keys.json").read_text())


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_official_state_dict_loads_strictly(name, reference):
    ref = reference[name]
    cfg = setup_cfg(str(REPO / CONFIGS[name]), ["MODEL.DEVICE", "cpu"])
    model = build_model(cfg)

    # Parameter count of the whole model equals the official one.
    assert sum(p.numel() for p in model.parameters()) == ref["num_params"]

    # The head's keys need no map at all: exactly the official names and shapes.
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    for key, shape in ref["state_dict"].items():
        if not key.startswith("backbone."):
            assert key in ours, f"{name}: official key {key} missing from our model"
            assert ours[key] == tuple(shape), f"{name}: {key} has shape {ours[key]}, official {shape}"
    assert {k for k in ours if not k.startswith("backbone.")} == {
        k for k in ref["state_dict"] if not k.startswith("backbone.")
    }

    # A state dict with the official keys and shapes loads strictly (backbone through its key map).
    generator = torch.Generator().manual_seed(0)
    official = {k: torch.randn(tuple(s), generator=generator) if s else torch.tensor(0) for k, s in ref["state_dict"].items()}
    report = load_weights(model, official)
    assert not report.missing and not report.unexpected and not report.shape_mismatch
    # every official tensor with a value landed somewhere (the rest are recomputed buffers)
    valued = [k for k in official if not k.endswith(BUFFER_SUFFIXES)]
    assert len([k for k in report.loaded]) >= len(valued)
    # and the values are really those of the checkpoint (head key, no map involved)
    key = "sem_seg_head.predictor.query_feat.weight"
    assert torch.equal(model.state_dict()[key], official[key])


def test_checkpoint_with_wrong_keys_fails_with_the_key_lists(reference):
    cfg = setup_cfg(str(REPO / CONFIGS["coco_panoptic_R50"]), ["MODEL.DEVICE", "cpu"])
    model = build_model(cfg)
    sd = {k: torch.zeros(tuple(s)) for k, s in reference["coco_panoptic_R50"]["state_dict"].items()}
    sd.pop("sem_seg_head.predictor.query_embed.weight")
    sd["sem_seg_head.predictor.not_a_layer.weight"] = torch.zeros(3)
    sd["sem_seg_head.predictor.class_embed.weight"] = torch.zeros(81, 256)
    with pytest.raises(CheckpointMismatchError) as err:
        load_weights(model, sd)
    msg = str(err.value)
    assert "sem_seg_head.predictor.query_embed.weight" in msg  # missing
    assert "sem_seg_head.predictor.not_a_layer.weight" in msg  # unexpected
    assert "sem_seg_head.predictor.class_embed.weight" in msg  # shape mismatch
