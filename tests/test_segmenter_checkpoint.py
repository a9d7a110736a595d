"""Official Segmenter checkpoints load unchanged; timm ViT weights load into the backbone.

For the four official models of ../shared/reference/segmenter_state_dict_keys.json, a model
built from our equivalent config must accept a state dict with exactly the official keys and
shapes (``{"model": ...}`` through ``MODEL.WEIGHTS``' loader, strictly), hold the same number of
parameters (the unused ImageNet classifier ``encoder.head`` aside), and give the tensors back
under the official names.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from eco_m2f.checkpoint import CheckpointMismatchError, load_weights, save_checkpoint
from eco_m2f.config import setup_cfg
from eco_m2f.architectures import build_model
from eco_m2f.modeling.meta_arch.segmenter_keys import ours_to_official_segmenter

REPO = Path(__file__).resolve().parents[1]
ADE = "configs/ade20k/semantic-segmentation/segmenter"
CONFIGS = {
    "seg_tiny_mask_ade20k": f"{ADE}/segmenter_vit_tiny_mask_bs8_160k.yaml",
    "seg_small_mask_ade20k": f"{ADE}/segmenter_vit_small_mask_bs8_160k.yaml",
    "seg_base_mask_ade20k": f"{ADE}/segmenter_vit_base_mask_bs8_160k.yaml",
    "seg_small_linear_cityscapes": "configs/cityscapes/semantic-segmentation/segmenter/segmenter_vit_small_linear_bs8_80k.yaml",
}
CLASSIFIER = ("encoder.head.weight", "encoder.head.bias")

TINY = [
    "MODEL.DEVICE", "cpu", "MODEL.META_ARCHITECTURE", "Segmenter", "MODEL.BACKBONE.NAME", "build_vit_backbone",
    "MODEL.VIT.IMG_SIZE", "64", "MODEL.VIT.EMBED_DIM", "32", "MODEL.VIT.DEPTH", "2", "MODEL.VIT.NUM_HEADS", "2",
    "MODEL.SEM_SEG_HEAD.NAME", "SegmenterMaskTransformerHead", "MODEL.SEM_SEG_HEAD.NUM_CLASSES", "5",
    "MODEL.SEM_SEG_HEAD.MASK_TRANSFORMER.NUM_HEADS", "2",
]


@pytest.fixture(scope="module")
def reference(shared_dir):
    return json.loads((shared_dir / "reference" / "segmenter_state_dict_keys.json").read_text())["models"]


def _random_state_dict(shapes: dict, seed: int = 0) -> dict:
    gen = torch.Generator().manual_seed(seed)
    return {k: torch.randn(tuple(s), generator=gen) for k, s in shapes.items()}


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_official_segmenter_state_dict_loads_strictly(name, reference):
    ref = reference[name]
    cfg = setup_cfg(str(REPO / CONFIGS[name]), ["MODEL.DEVICE", "cpu"])
    model = build_model(cfg)

    # every official key has our tensor of the same shape, and nothing else exists
    ours = {k: tuple(v.shape) for k, v in ours_to_official_segmenter(model.state_dict()).items()}
    official = {k: tuple(s) for k, s in ref["keys"].items() if k not in CLASSIFIER}
    assert ours == official
    assert sum(p.numel() for p in model.parameters()) == ref["num_params_excluding_encoder_head"]
    assert ref["num_params"] - ref["num_params_excluding_encoder_head"] == sum(
        torch.Size(ref["keys"][k]).numel() for k in CLASSIFIER
    )

    # the release layout ({"model": state_dict}, classifier included) loads with nothing left out
    sd = _random_state_dict(ref["keys"])
    report = load_weights(model, {"model": sd})
    assert report.clean and not report.backbone_only and len(report.loaded) == len(official)
    loaded = model.state_dict()
    assert torch.equal(loaded["backbone.pos_embed"], sd["encoder.pos_embed"])
    assert torch.equal(loaded["sem_seg_head.head.weight" if "linear" in name else "sem_seg_head.cls_emb"],
                       sd["decoder.head.weight" if "linear" in name else "decoder.cls_emb"])

    # round trip: our state dict under the official names is the checkpoint, tensor for tensor
    back = ours_to_official_segmenter(loaded)
    assert set(back) == set(official)
    assert all(torch.equal(back[k], sd[k]) for k in back)


def test_checkpoint_of_another_vit_size_lists_the_mismatched_keys(reference):
    model = build_model(setup_cfg(str(REPO / CONFIGS["seg_tiny_mask_ade20k"]), ["MODEL.DEVICE", "cpu"]))
    sd = {k: torch.zeros(tuple(s)) for k, s in reference["seg_small_mask_ade20k"]["keys"].items()}
    with pytest.raises(CheckpointMismatchError) as err:
        load_weights(model, sd)
    msg = str(err.value)
    assert "Shape mismatch" in msg
    for key in ("backbone.pos_embed: [1, 1025, 384] vs [1, 1025, 192]", "backbone.blocks.11.attn.qkv.weight",
                "sem_seg_head.proj_patch"):
        assert key in msg
    assert model.state_dict()["backbone.cls_token"].abs().sum() > 0  # nothing was loaded


def test_official_checkpoint_file_of_another_grid_loads_resized(tmp_path):
    model = build_model(setup_cfg(None, TINY))  # stored grid 4 x 4
    sd = {f"encoder.{k}": v for k, v in model.backbone.state_dict().items()}
    sd.update({f"decoder.{k}": v for k, v in model.sem_seg_head.state_dict().items()})
    sd.update({k: torch.zeros(1000 if k.endswith("bias") else (1000, 32)) for k in CLASSIFIER})
    pos = torch.randn(1, 1 + 8 * 8, 32)  # a checkpoint trained at 128: 8 x 8 grid
    sd["encoder.pos_embed"] = pos
    report = load_weights(model, save_checkpoint(tmp_path / "checkpoint.pth", sd))
    assert report.clean
    grid = pos[:, 1:].reshape(1, 8, 8, 32).permute(0, 3, 1, 2)
    expected = F.interpolate(grid, size=(4, 4), mode="bilinear", align_corners=False).flatten(2).transpose(1, 2)
    assert torch.allclose(model.backbone.pos_embed[:, 1:], expected, atol=1e-6)
    assert torch.equal(model.backbone.pos_embed[:, :1], pos[:, :1])


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_timm_imagenet_weights_load_into_the_backbone(tmp_path, suffix):
    import timm
    from safetensors.torch import save_file

    model = build_model(setup_cfg(None, TINY + ["MODEL.VIT.LN_EPS", "1e-6"]))
    # timm's own format: classifier included, position embedding for 32 x 32 inputs (2 x 2 grid)
    net = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, embed_dim=32, depth=2,
                            num_heads=2, num_classes=10)
    sd = {k: v.contiguous() for k, v in net.state_dict().items()}
    path = tmp_path / f"vit{suffix}"
    if suffix == ".pth":
        torch.save(sd, path)
    else:
        save_file(sd, str(path))
    head_before = model.sem_seg_head.cls_emb.detach().clone()
    report = load_weights(model, path)
    assert report.backbone_only and report.clean
    assert not any(k.startswith("backbone.") for k in report.untouched)
    assert torch.equal(model.backbone.blocks[1].mlp.fc2.weight, sd["blocks.1.mlp.fc2.weight"])
    grid = sd["pos_embed"][:, 1:].reshape(1, 2, 2, 32).permute(0, 3, 1, 2)
    expected = F.interpolate(grid, size=(4, 4), mode="bilinear", align_corners=False).flatten(2).transpose(1, 2)
    assert torch.allclose(model.backbone.pos_embed[:, 1:], expected, atol=1e-6)  # resized to our 4 x 4 grid
    assert torch.equal(model.sem_seg_head.cls_emb, head_before)  # the head is left as initialised
