"""The Segmenter meta-architecture: padding and cropping, sliding window, test-time augmentation,
the model contract, and clear errors for bad settings and labels."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from eco_m2f.config import setup_cfg
from eco_m2f.architectures import build_model
from eco_m2f.modeling.meta_arch.base import SegmentationModel
from eco_m2f.modeling.meta_arch.dense_inference import predict_sliding, predict_whole, window_boxes

REPO = Path(__file__).resolve().parents[1]
K = 4
TINY = [
    "MODEL.DEVICE", "cpu", "MODEL.META_ARCHITECTURE", "Segmenter", "MODEL.BACKBONE.NAME", "build_vit_backbone",
    "MODEL.PIXEL_MEAN", "[127.5, 127.5, 127.5]", "MODEL.PIXEL_STD", "[127.5, 127.5, 127.5]",
    "MODEL.VIT.IMG_SIZE", "64", "MODEL.VIT.EMBED_DIM", "32", "MODEL.VIT.DEPTH", "2", "MODEL.VIT.NUM_HEADS", "2",
    "MODEL.SEM_SEG_HEAD.NAME", "SegmenterMaskTransformerHead", "MODEL.SEM_SEG_HEAD.NUM_CLASSES", str(K),
    "MODEL.SEM_SEG_HEAD.MASK_TRANSFORMER.NUM_HEADS", "2",
]


def _model(*opts: str):
    torch.manual_seed(0)
    return build_model(setup_cfg(None, TINY + list(opts))).eval()


def _input(h: int, w: int, height: int | None = None, width: int | None = None, seed: int = 0) -> dict:
    gen = torch.Generator().manual_seed(seed)
    return {"image": torch.randint(0, 256, (3, h, w), generator=gen, dtype=torch.uint8),
            "height": height or h, "width": width or w}


def _normalised(model, x: dict) -> torch.Tensor:
    return (x["image"].float() - model.pixel_mean) / model.pixel_std


def test_contract_of_the_base_class():
    model = _model()
    assert isinstance(model, SegmentationModel)
    assert model.tasks == frozenset({"sem_seg"}) and model.size_divisibility == 16
    modules = dict(model.named_modules())
    assert all(path in modules for path in model.flop_scopes().values())
    for module, method in model.benchmark_stages().values():
        assert callable(getattr(module, method))
    images = torch.randn(2, 3, 48, 64)
    assert model.network(images).shape == (2, K, 48, 64)


def test_sizes_not_divisible_by_the_patch_are_padded_then_cropped():
    """A 50 x 70 image (resized from 100 x 140) is padded to 64 x 80; the scores are those of the
    padded image cropped to 50 x 70, then resized to the original 100 x 140."""
    model = _model()
    x = _input(50, 70, height=100, width=140)
    out = model([x])[0]["sem_seg"]
    assert out.shape == (K, 100, 140)
    padded = F.pad(_normalised(model, x), (0, 10, 0, 14))[None]  # 1 x 3 x 64 x 80
    logits = model.network(padded)[:, :, :50, :70]
    expected = F.interpolate(logits, size=(100, 140), mode="bilinear", align_corners=False)[0].softmax(0)
    assert torch.allclose(out, expected, atol=1e-5)
    assert torch.allclose(out.sum(0), torch.ones(100, 140), atol=1e-5)


def test_sliding_window_equals_whole_image_when_one_window_covers_it():
    whole = _model()
    slide = _model("TEST.SLIDE.ENABLED", "True", "TEST.SLIDE.CROP_SIZE", "[64, 64]", "TEST.SLIDE.STRIDE", "[48, 48]")
    slide.load_state_dict(whole.state_dict())
    batch = [_input(64, 64, seed=1), _input(64, 64, seed=2), _input(40, 56, seed=3)]  # the last smaller than the crop
    with torch.no_grad():
        for a, b in zip(whole(batch[:2]), slide(batch[:2])):
            assert torch.allclose(a["sem_seg"], b["sem_seg"], atol=1e-6)
        assert torch.allclose(whole(batch[2:])[0]["sem_seg"], slide(batch)[2]["sem_seg"], atol=1e-6)


def test_sliding_windows_cover_the_image_and_average_overlaps():
    boxes = window_boxes(100, 70, (48, 48), (32, 32))
    assert boxes[0] == (0, 48, 0, 48) and boxes[-1] == (52, 100, 22, 70)
    assert {(b[1] - b[0], b[3] - b[2]) for b in boxes} == {(48, 48)}
    cover = torch.zeros(100, 70)
    for y0, y1, x0, x1 in boxes:
        cover[y0:y1, x0:x1] += 1
    assert cover.min() >= 1 and cover.max() == 4
    # a per-pixel network: averaging overlapping windows gives the whole-image scores back
    conv = torch.nn.Conv2d(3, K, 1)
    images = [torch.randn(3, 100, 70), torch.randn(3, 30, 90)]
    calls = []

    def network(x):
        calls.append(x.shape[0])
        return conv(x)

    with torch.no_grad():
        slid = predict_sliding(network, images, (48, 48), (32, 32), size_divisibility=16, batch_size=5)
        whole = [predict_whole(conv, [im], 16)[0] for im in images]
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(slid, whole))
    assert max(calls) <= 5 and sum(calls) == len(boxes) + len(window_boxes(30, 90, (48, 48), (32, 32)))


def test_flip_and_multi_scale_average_the_probabilities():
    plain = _model()
    tta = _model("TEST.AUG.ENABLED", "True", "TEST.AUG.MIN_SIZES", "(32, 64)", "TEST.AUG.FLIP", "True")
    tta.load_state_dict(plain.state_dict())
    x = _input(64, 96)
    img = _normalised(plain, x)
    with torch.no_grad():
        expected = 0
        for size in ((32, 48), (64, 96)):
            scaled = F.interpolate(img[None], size=size, mode="bilinear", align_corners=False)
            for flip in (False, True):
                logits = plain.network(scaled.flip(-1) if flip else scaled)
                logits = logits.flip(-1) if flip else logits
                expected = expected + F.interpolate(logits, size=(64, 96), mode="bilinear", align_corners=False)[0].softmax(0)
        out = tta([x])[0]["sem_seg"]
    assert len(tta.test_variants) == 4
    assert torch.allclose(out, expected / 4, atol=1e-5)


def test_training_targets_are_padded_with_the_ignore_label_and_auxiliary_losses_named():
    model = _model("MODEL.VIT.OUT_INDICES", "[0, 1]", "MODEL.SEM_SEG_HEAD.AUX_LAYERS", "[0]",
                   "MODEL.SEM_SEG_HEAD.AUX_NAME", "SegmenterLinearHead").train()
    batch = [dict(_input(50, 70), sem_seg=torch.randint(0, K, (50, 70))),
             dict(_input(64, 48), sem_seg=torch.full((64, 48), 255))]
    targets = model.prepare_targets(batch, (64, 80))
    assert targets.shape == (2, 64, 80) and (targets[0, 50:] == 255).all() and (targets[1] == 255).all()
    losses = model(batch)
    assert set(losses) == {"loss_ce", "loss_ce_aux0"}
    assert all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    assert model.auxiliary_heads[0].head.weight.grad is not None


def test_bad_settings_and_labels_are_clear_errors():
    with pytest.raises(ValueError, match=r"TEST.SLIDE.CROP_SIZE \[500, 500\] is not a multiple of the patch size 16"):
        _model("TEST.SLIDE.ENABLED", "True", "TEST.SLIDE.CROP_SIZE", "[500, 500]")
    with pytest.raises(ValueError, match="TEST.SLIDE.STRIDE"):
        _model("TEST.SLIDE.ENABLED", "True", "TEST.SLIDE.CROP_SIZE", "[64, 64]", "TEST.SLIDE.STRIDE", "[80, 80]")
    with pytest.raises(ValueError, match=r"INPUT.CROP.SIZE \[500, 500\] is not a multiple of the patch size 16"):
        _model("INPUT.CROP.ENABLED", "True", "INPUT.CROP.TYPE", "absolute", "INPUT.CROP.SIZE", "(500, 500)")
    with pytest.raises(ValueError, match=r"AUX_LAYERS \[0\]: blocks \[0\] are not in MODEL.VIT.OUT_INDICES"):
        _model("MODEL.SEM_SEG_HEAD.AUX_LAYERS", "[0]")
    with pytest.raises(ValueError, match="MODEL.TOKEN_REDUCTION.NAME 'paumer'"):
        _model("MODEL.TOKEN_REDUCTION.NAME", "paumer")
    with pytest.raises(TypeError, match="needs a ViT backbone"):
        _model("MODEL.BACKBONE.NAME", "build_resnet_backbone", "MODEL.RESNETS.STEM_TYPE", "basic",
               "MODEL.RESNETS.RES5_MULTI_GRID", "[1, 1, 1]")
    model = _model().train()
    bad = dict(_input(32, 32), sem_seg=torch.full((32, 32), 7), file_name="a.png")
    with pytest.raises(ValueError, match=r"a.png: sem_seg holds labels \[7\] outside 0..3"):
        model([bad])


def test_every_shipped_vit_config_loads():
    files = sorted(f for f in (REPO / "configs").glob("*/semantic-segmentation/**/*.yaml") if "cts_policy" not in f.parts)
    files += sorted((REPO / "configs/synthetic").glob("segmenter_*.yaml"))
    assert len(files) >= 15
    for f in files:
        cfg = setup_cfg(str(f))
        assert cfg.MODEL.META_ARCHITECTURE == "Segmenter", f
    tiny = build_model(setup_cfg(str(REPO / "configs/synthetic/segmenter_tiny_cpu.yaml")))
    assert sum(p.numel() for p in tiny.parameters()) < 1_000_000


@pytest.mark.parametrize("head, unused", [("SegmenterLinearHead", False), ("ATMHead", True)])
def test_unused_parameters_are_declared_for_ddp(head, unused):
    model = _model("MODEL.SEM_SEG_HEAD.NAME", head, "MODEL.VIT.OUT_INDICES", "[0, 1, -1]", "MODEL.SEM_SEG_HEAD.ATM.HIDDEN_DIM",
                   "16", "MODEL.SEM_SEG_HEAD.ATM.NUM_HEADS", "2", "MODEL.SEM_SEG_HEAD.ATM.NUM_LAYERS", "1").train()
    batch = [dict(_input(32, 48, seed=i), sem_seg=torch.randint(0, K, (32, 48))) for i in range(2)]
    sum(model(batch).values()).backward()
    without_grad = [n for n, p in model.named_parameters() if p.grad is None]
    assert model.find_unused_parameters is unused
    assert model.backbone.out_indices == (0, 1) and getattr(model.sem_seg_head, "num_levels", 2) == 2
    assert (without_grad == ["backbone.norm.weight", "backbone.norm.bias"]) if unused else not without_grad
