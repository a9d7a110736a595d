"""The CTS policy network: training through train_net, its evaluator, and its use frozen inside another model."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from eco_m2f.config import get_cfg, setup_cfg
from eco_m2f.data.io import write_png
from eco_m2f.evaluation.policy import PolicyEvaluator

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs/synthetic/cts_policy_tiny_cpu.yaml"
IGN = 255


def _policy_cfg(*opts: str):
    cfg = get_cfg()
    cfg.merge_from_file(str(TINY))
    cfg.merge_from_list(["MODEL.BACKBONE.PRETRAINED", "False", *opts])
    return cfg


def _random_batch(sizes, seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    return [{"image": torch.randint(0, 256, (3, h, w), generator=g, dtype=torch.uint8)} for h, w in sizes]


# ----------------------------------------------------------------------------- the model's interface


def test_eval_output_covers_each_images_grid_and_scores_are_the_logits_softmax() -> None:
    from eco_m2f.architectures import build_model

    model = build_model(_policy_cfg()).eval()
    assert model.tasks == frozenset({"policy"})
    batch = _random_batch([(64, 96), (40, 50)])
    with torch.no_grad():
        out = model(batch)
        assert [tuple(o["policy"].shape) for o in out] == [(2, 3), (2, 2)]
        images = model.preprocess_image(batch).tensor  # padded to 64 x 96
        logits = model.superpatch_logits(images)
        scores = model.superpatch_scores(images)
    assert logits.shape == (2, 2, 2, 3)
    assert torch.allclose(scores, torch.sigmoid(logits[:, 1] - logits[:, 0]), atol=1e-6)
    assert torch.allclose(out[1]["policy"], scores[1, :2, :2])
    assert ((scores >= 0) & (scores <= 1)).all()


def test_superpatch_logits_convert_the_callers_normalisation() -> None:
    """A ViT normalises with 127.5 / 127.5: the policy converts that batch to its own 127 / 128."""
    from eco_m2f.architectures import build_model

    model = build_model(_policy_cfg()).eval()
    raw = torch.stack([b["image"] for b in _random_batch([(64, 64)] * 2)]).float()
    own = (raw - 127.0) / 128.0
    vit = (raw - 127.5) / 127.5
    with torch.no_grad():
        expected = model.superpatch_logits(own)
        converted = model.superpatch_logits(vit, pixel_mean=[127.5] * 3, pixel_std=[127.5] * 3)
        assert not torch.allclose(model.superpatch_logits(vit), expected, atol=1e-3)
    assert torch.allclose(converted, expected, atol=1e-4)
    with pytest.raises(ValueError, match="both"):
        model.superpatch_logits(vit, pixel_mean=[127.5] * 3)


# ----------------------------------------------------------------------------- the evaluator


def test_evaluator_metrics_on_constructed_ground_truth(tmp_path) -> None:
    # image A, 64 x 64 at its own size: targets [[1, 0], [1, 1]] (bottom-left: class 4 and ignore)
    a = np.zeros((64, 64), dtype=np.uint8)
    a[:32, 32:] = 1
    a[0, 40] = 2
    a[32:, :32] = 4
    a[32:40, :32] = IGN
    # image B, 128 x 64, fed at 64 x 32: targets [[1], [0]] after the nearest resize
    b = np.ones((128, 64), dtype=np.uint8)
    b[64:, :32] = 2
    b[64:, 32:] = 3
    write_png(tmp_path / "a.png", a)
    write_png(tmp_path / "b.png", b)
    inputs = [
        {"file_name": "a.jpg", "sem_seg_file_name": str(tmp_path / "a.png"), "image": torch.zeros(3, 64, 64)},
        {"file_name": "b.jpg", "sem_seg_file_name": str(tmp_path / "b.png"), "image": torch.zeros(3, 64, 32)},
    ]
    outputs = [{"policy": torch.tensor([[0.9, 0.8], [0.2, 0.7]])}, {"policy": torch.tensor([[0.6], [0.3]])}]

    evaluator = PolicyEvaluator("policy_constructed", tmp_path / "out", share_ratio=0.5, ignore_label=IGN)
    evaluator.reset()
    evaluator.process(inputs, outputs)
    res = evaluator.evaluate()["policy"]
    # predictions > 0.5 vs targets over 6 superpatches: 3 uniform hits, 1 mixed hit, one error each way
    assert res["pACC"] == pytest.approx(100 * 4 / 6)
    assert res["IoU-uniform"] == pytest.approx(100 * 3 / 5)
    assert res["IoU-mixed"] == pytest.approx(100 * 1 / 3)
    assert res["mIoU"] == pytest.approx(100 * (3 / 5 + 1 / 3) / 2)
    assert res["uniform_fraction"] == pytest.approx(100 * 4 / 6)
    # top S: A keeps 2 of 4 (0.9 uniform, 0.8 mixed), B 1 of 2 (0.6 uniform): 2 of 3
    assert res["precision_at_S"] == pytest.approx(100 * 2 / 3)
    assert res["S_mean"] == pytest.approx(1.5)
    saved = json.loads((tmp_path / "out" / "policy_evaluation.json").read_text())
    assert saved["precision_at_S"] == pytest.approx(res["precision_at_S"])

    # the ignore label as a class turns A's bottom-left superpatch mixed
    strict = PolicyEvaluator("policy_constructed", share_ratio=0.5, ignore_label=IGN, ignore_as_class=True)
    assert strict.targets_for(inputs[0]).tolist() == [[1, 0], [0, 1]]
    with pytest.raises(ValueError, match="superpatch grid"):
        evaluator.process(inputs[:1], [{"policy": torch.zeros(3, 3)}])
    with pytest.raises(ValueError, match="SHARE_RATIO"):
        PolicyEvaluator("policy_constructed", share_ratio=0.0)
    from_cfg = PolicyEvaluator.from_config(_policy_cfg(), "policy_constructed")
    assert from_cfg._share_ratio == pytest.approx(336 / 576)


# ----------------------------------------------------------------------------- training and frozen use


@pytest.fixture(scope="module")
def trained(tiny_synthetic_root, tmp_path_factory):
    """The tiny config trained by train_net for 16 iterations on the 64x64 synthetic images."""
    from eco_m2f.engine import default_argument_parser, main

    out = tmp_path_factory.mktemp("policy_run")
    mp = pytest.MonkeyPatch()
    mp.setenv("DETECTRON2_DATASETS", str(tiny_synthetic_root))
    opts = [
        "--config-file", str(TINY),
        "MODEL.BACKBONE.PRETRAINED", "False",
        "DATASETS.TRAIN", "('synthetic_panoptic_train',)", "DATASETS.TEST", "()",
        "INPUT.DATASET_MAPPER_NAME", "mask_former_semantic",
        "INPUT.MIN_SIZE_TRAIN", "(64,)", "INPUT.MAX_SIZE_TRAIN", "128", "INPUT.CROP.SIZE", "(64, 64)",
        "INPUT.MIN_SIZE_TEST", "64", "INPUT.MAX_SIZE_TEST", "128",
        "SOLVER.MAX_ITER", "16", "SOLVER.IMS_PER_BATCH", "4", "SOLVER.BASE_LR", "0.002",
        "SOLVER.CHECKPOINT_PERIOD", "8", "LOG_PERIOD", "1", "SEED", "0", "OUTPUT_DIR", str(out),
    ]
    main(default_argument_parser().parse_args(opts))
    yield out
    mp.undo()


def test_train_net_trains_the_policy(trained, tiny_datasets) -> None:
    rows = [json.loads(line) for line in (trained / "metrics.json").read_text().splitlines() if line.strip()]
    losses = [r["loss_policy"] for r in rows if "loss_policy" in r]
    assert len(losses) == 16 and all(np.isfinite(losses))
    assert rows[0]["lr"] == pytest.approx(0.002)  # AdamW at BASE_LR, no warm-up
    assert np.mean(losses[-5:]) < np.mean(losses[:5]), losses
    assert (trained / "model_final.pth").is_file()

    # the trained weights evaluated through the evaluator on the validation images
    from eco_m2f.checkpoint import load_weights
    from eco_m2f.data import build_detection_test_loader
    from eco_m2f.evaluation import inference_on_dataset
    from eco_m2f.architectures import build_model

    cfg = setup_cfg(str(trained / "config.yaml"))
    model = build_model(cfg)
    assert load_weights(model, str(trained / "model_final.pth")).clean
    loader = build_detection_test_loader(cfg, "synthetic_panoptic_val")
    res = inference_on_dataset(model, loader, PolicyEvaluator.from_config(cfg, "synthetic_panoptic_val"))["policy"]
    assert 0.0 <= res["pACC"] <= 100.0 and 0.0 <= res["precision_at_S"] <= 100.0
    assert res["S_mean"] == pytest.approx(round(336 / 576 * 4))  # 4 superpatches per 64x64 image


def test_frozen_policy_inside_another_model(trained) -> None:
    from eco_m2f.checkpoint import load_weights
    from eco_m2f.architectures import build_model
    from eco_m2f.modeling.policy import build_frozen_policy

    parent_cfg = get_cfg()
    with pytest.raises(ValueError, match="POLICY_CONFIG is empty"):
        build_frozen_policy(parent_cfg)
    parent_cfg.merge_from_list(["MODEL.TOKEN_SHARING.POLICY_CONFIG", str(trained / "config.yaml"),
                                "MODEL.TOKEN_SHARING.POLICY_WEIGHTS", str(trained / "model_final.pth")])

    class Parent(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.policy = build_frozen_policy(parent_cfg)
            self.head = nn.Linear(2, 2)

    parent = Parent().train()
    policy = parent.policy
    assert not policy.training and all(not m.training for m in policy.modules())
    assert not any(p.requires_grad for p in policy.parameters()) and parent.head.weight.requires_grad

    reference = build_model(setup_cfg(str(trained / "config.yaml"))).eval()
    load_weights(reference, str(trained / "model_final.pth"))
    images = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        assert torch.equal(policy.superpatch_logits(images), reference.superpatch_logits(images))

    wrong = get_cfg()
    wrong.merge_from_list(["MODEL.TOKEN_SHARING.POLICY_CONFIG", str(REPO / "configs/synthetic/maskformer2_tiny_cpu.yaml"),
                           "MODEL.TOKEN_SHARING.POLICY_WEIGHTS", str(trained / "model_final.pth")])
    with pytest.raises(ValueError, match="TokenSharingPolicy"):
        build_frozen_policy(wrong)


# ----------------------------------------------------------------------------- larger windows (dCTS)


def test_window_sizes_add_a_head_per_size_and_keep_the_2x2_names() -> None:
    from eco_m2f.architectures import build_model
    from eco_m2f.modeling.meta_arch.token_sharing_policy import pool_windows

    torch.manual_seed(0)
    base = build_model(_policy_cfg()).eval()
    multi = build_model(_policy_cfg("MODEL.POLICY.WINDOW_SIZES", "[2, 4, 8]")).eval()
    extra = set(multi.state_dict()) - set(base.state_dict())
    assert extra == {f"window_predictors.{n}.{p}" for n in ("4", "8") for p in ("weight", "bias")}
    assert set(base.state_dict()) <= set(multi.state_dict())  # a [2] checkpoint's names are unchanged
    multi.load_state_dict(base.state_dict(), strict=False)
    batch = _random_batch([(128, 192), (96, 64)])
    with torch.no_grad():
        images = multi.preprocess_image(batch).tensor  # 128 x 192
        logits = multi.window_logits(images)
        assert torch.equal(logits[2], base.superpatch_logits(images))
        assert {n: tuple(v.shape) for n, v in logits.items()} == {2: (2, 2, 4, 6), 4: (2, 2, 2, 3), 8: (2, 2, 1, 1)}
        features = multi.backbone(images)["res5"]
        by_hand = multi.window_predictors["4"](F.avg_pool2d(features, 2))
        assert torch.allclose(logits[4], by_hand, atol=1e-6)
        assert torch.allclose(pool_windows(features, 8), features[..., :4, :4].mean((-2, -1), keepdim=True), atol=1e-6)
        out = multi(batch)
    assert tuple(out[0]["policy"].shape) == (4, 6) and {n: tuple(v.shape) for n, v in out[0]["policy_windows"].items()} == {
        4: (2, 3), 8: (1, 1)}
    assert {n: tuple(v.shape) for n, v in out[1]["policy_windows"].items()} == {4: (1, 1), 8: (0, 0)}
    multi.train()
    batch = [dict(b, sem_seg=torch.zeros(b["image"].shape[-2:], dtype=torch.int64)) for b in batch]
    losses = multi(batch)
    assert set(losses) == {"loss_policy", "loss_policy_w4", "loss_policy_w8"} and all(torch.isfinite(v) for v in losses.values())
    with pytest.raises(ValueError, match="WINDOW_SIZES"):
        build_model(_policy_cfg("MODEL.POLICY.WINDOW_SIZES", "[2, 6]"))


def test_evaluator_reports_every_window_size(tmp_path) -> None:
    gt = np.zeros((128, 128), dtype=np.uint8)
    gt[:64, 64:] = 1
    gt[5, 100] = 2  # window (0, 1) of 4 x 4 is mixed; the others are uniform
    write_png(tmp_path / "gt.png", gt)
    inputs = [{"file_name": "x.jpg", "sem_seg_file_name": str(tmp_path / "gt.png"), "image": torch.zeros(3, 128, 128)}]
    outputs = [{"policy": torch.full((4, 4), 0.9),
                "policy_windows": {4: torch.tensor([[0.9, 0.9], [0.2, 0.9]]), 8: torch.tensor([[0.1]])}}]
    evaluator = PolicyEvaluator("policy_windows", share_ratio=0.5, ignore_label=IGN)
    evaluator.reset()
    evaluator.process(inputs, outputs)
    res = evaluator.evaluate()["policy"]
    assert res["pACC_w4"] == pytest.approx(100 * 2 / 4)  # (0, 1) predicted uniform but mixed, (1, 0) the reverse
    assert res["uniform_fraction_w4"] == pytest.approx(75.0)
    assert res["pACC_w8"] == pytest.approx(100.0)  # the one 8 x 8 window is mixed, predicted mixed
    with pytest.raises(ValueError, match="4x4 windows"):
        evaluator.process(inputs, [{"policy": torch.zeros(4, 4), "policy_windows": {4: torch.zeros(3, 3)}}])
