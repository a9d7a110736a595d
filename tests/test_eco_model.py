"""ECO-M2F inside the model: exits, the step-A loss, gated inference, step B records."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from eco_m2f.config import setup_cfg
from eco_m2f.eco import stochastic_depth
from eco_m2f.eco.stochastic_depth import alpha_weights
from eco_m2f.architectures import build_model

from conftest import TINY_OPTS

REPO = Path(__file__).resolve().parents[1]
TINY = str(REPO / "configs/synthetic/maskformer2_tiny_cpu.yaml")


def _batch(n: int = 3, size: int = 64, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        masks = torch.zeros(2, size, size, dtype=torch.bool)
        masks[0, : size // 2] = True
        masks[1, size // 2 :] = True
        out.append({
            "image": torch.randint(0, 256, (3, size, size), dtype=torch.uint8, generator=g),
            "height": size, "width": size,
            "instances": {"gt_classes": torch.tensor([0, 5]), "gt_masks": masks},
        })
    return out


def _model(extra=()):
    torch.manual_seed(0)
    return build_model(setup_cfg(TINY, TINY_OPTS + ["MODEL.META_ARCHITECTURE", "ECOMaskFormer"] + list(extra)))


def test_every_exit_gives_outputs_of_the_right_shape():
    model = _model().eval()
    batch = _batch(2)
    images = model.preprocess_image(batch)
    features = model.backbone(images.tensor)
    for k in range(1, 7):
        out = model.sem_seg_head(features, exit_layer=k)
        assert out["pred_logits"].shape == (2, 8, 9)  # 8 queries, 8 classes + no-object
        assert out["pred_masks"].shape == (2, 8, 16, 16)  # stride 4 of 64x64
        assert len(out["aux_outputs"]) == 3
        results = model(batch, exit_layer=k)
        assert results[0]["sem_seg"].shape == (8, 64, 64)
        assert results[0]["panoptic_seg"][0].shape == (64, 64)
        assert results[0]["cost"]["exit"] == k


def test_weighted_stochastic_depth_loss_equals_hand_computed_sum(monkeypatch, same_points_per_item):
    model = _model(["MODEL.ECO.ENABLED", "True"]).train()
    batch = _batch(4)
    depths = torch.tensor([2, 4, 4, 6])
    monkeypatch.setattr(stochastic_depth, "sample_depths", lambda n, exits, generator=None: depths)

    torch.manual_seed(123)
    losses = model(batch)
    total = sum(losses.values())

    # By hand: the plain M2F path at a fixed exit k, on the images whose depth reaches k,
    # weighted alpha_k * n_k / N (Eq. 3); the model decodes all exits in one batch, the points
    # sampled for a mask are the same in both (same_points_per_item).
    alpha = alpha_weights([2, 3, 4, 5, 6], "linear")
    torch.manual_seed(123)
    images = model.preprocess_image(batch)
    targets = model.prepare_targets(batch, images)
    features = model.backbone(images.tensor)
    expected = 0.0
    for k in [2, 3, 4, 5, 6]:
        keep = [i for i in range(4) if depths[i] >= k]
        sub = {name: f[keep] for name, f in features.items()}
        out = model.sem_seg_head(sub, exit_layer=k)
        l_k = sum(model.weighted_losses(out, [targets[i] for i in keep]).values())
        expected = expected + alpha[k] * len(keep) / 4 * l_k
    assert set(losses) == {f"loss_exit{k}" for k in [2, 3, 4, 5, 6]}
    assert total.item() == pytest.approx(expected.item(), rel=1e-5)
    for k in [2, 4, 6]:  # each exit's term alone, too
        keep = [i for i in range(4) if depths[i] >= k]
        sub = {name: f[keep] for name, f in features.items()}
        l_k = sum(model.weighted_losses(model.sem_seg_head(sub, exit_layer=k), [targets[i] for i in keep]).values())
        assert losses[f"loss_exit{k}"].item() == pytest.approx((alpha[k] * len(keep) / 4 * l_k).item(), rel=1e-5)

    # encoder layers past the deepest sampled depth get no gradient; DDP is told to expect that
    monkeypatch.setattr(stochastic_depth, "sample_depths", lambda n, exits, generator=None: torch.tensor([2, 3, 3, 2]))
    model.zero_grad()
    sum(model(batch).values()).backward()
    layers = model.sem_seg_head.pixel_decoder.transformer.encoder.layers
    assert all(p.grad is not None for p in layers[2].parameters())
    assert all(p.grad is None for p in layers[3].parameters())
    assert model.find_unused_parameters is True


@pytest.mark.parametrize("k", [2, 5])
def test_gate_forced_to_exit_k_equals_fixed_exit_k(k):
    model = _model(["MODEL.ECO.GATE.ENABLED", "True"]).eval()
    exits = model.gate.exit_list
    with torch.no_grad():
        model.gate.linear.weight.zero_()
        model.gate.linear.bias.copy_(torch.tensor([10.0 if e == k else 0.0 for e in exits]))
    batch = _batch(3)
    gated = model(batch)
    fixed = model(batch, exit_layer=k)
    for g, f in zip(gated, fixed):
        assert g["cost"]["exit"] == k
        torch.testing.assert_close(g["sem_seg"], f["sem_seg"], atol=1e-5, rtol=1e-5)
        assert torch.equal(g["panoptic_seg"][0], f["panoptic_seg"][0])
        assert g["panoptic_seg"][1] == f["panoptic_seg"][1]


def test_gated_batch_with_mixed_exits_matches_per_image_fixed_exits():
    model = _model(["MODEL.ECO.GATE.ENABLED", "True"]).eval()
    batch = _batch(3)
    with torch.no_grad():
        z = model.gate_input(batch)
        chosen = model.gate.choose(z)
    gated = model(batch)
    for i, x in enumerate(batch):
        single = model([x], exit_layer=int(chosen[i]))[0]
        assert gated[i]["cost"]["exit"] == int(chosen[i])
        torch.testing.assert_close(gated[i]["sem_seg"], single["sem_seg"], atol=1e-4, rtol=1e-4)


def _records(out_dir: Path):
    rows = []
    for shard in sorted((out_dir / "records").glob("*.jsonl")):
        rows += [json.loads(line) for line in shard.read_text().splitlines() if line.strip()]
    return sorted(rows, key=lambda r: r["image_id"])


def test_step_b_resumes_after_interruption_with_identical_records(tiny_datasets, tmp_path):
    from eco_m2f.checkpoint import save_checkpoint
    from eco_m2f.eco import derive, records

    model = _model()
    weights = tmp_path / "model.pth"
    save_checkpoint(weights, model)
    cfg = setup_cfg(TINY, TINY_OPTS + ["MODEL.MASK_FORMER.TEST.PANOPTIC_ON", "True"])

    # uninterrupted, as two shards
    full = tmp_path / "full"
    for rank in range(2):
        derive.derive_shard(cfg, str(weights), str(full), rank=rank, world_size=2, device="cpu", progress=False)
    reference = _records(full)
    assert len(reference) == 8
    rec = reference[0]
    assert rec["exits"] == [2, 3, 4, 5, 6]
    for key in ("pq", "sq", "rq", "pq_th", "pq_st", "miou"):
        assert len(rec[key]) == 5
    assert all(0.0 <= q <= 1.0 for r in reference for q in r["pq"])
    assert len(rec["feature"]) == 64  # z(s1) has CONVS_DIM channels

    # interrupted after 3 images (a crash inside the run), then resumed by the same call
    part = tmp_path / "part"
    real_append = records.RecordWriter.append
    calls = {"n": 0}

    def crashing_append(self, record):
        if calls["n"] == 3:
            raise KeyboardInterrupt("killed")
        calls["n"] += 1
        real_append(self, record)

    records.RecordWriter.append = crashing_append
    try:
        with pytest.raises(KeyboardInterrupt):
            derive.derive_shard(cfg, str(weights), str(part), device="cpu", progress=False)
    finally:
        records.RecordWriter.append = real_append
    assert len(_records(part)) == 3
    # a torn last line (killed mid-write) is repaired on resume
    shard = next((part / "records").glob("*.jsonl"))
    with open(shard, "a") as f:
        f.write('{"image_id": 99, "fil')
    new = derive.derive_shard(cfg, str(weights), str(part), device="cpu", progress=False)
    assert new == 5  # only the unfinished images were run
    resumed = _records(part)
    assert [r["image_id"] for r in resumed] == [r["image_id"] for r in reference]
    for a, b in zip(resumed, reference):
        assert a["pq"] == pytest.approx(b["pq"], abs=1e-6)
        assert a["miou"] == pytest.approx(b["miou"], abs=1e-6)
        assert a["feature"] == pytest.approx(b["feature"], abs=1e-5)

