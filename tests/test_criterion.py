"""Mask2Former's set criterion: hand-checkable losses, edge cases, gradients, config wiring."""
from __future__ import annotations

import math

import pytest
import torch
import torch.multiprocessing as mp

import eco_m2f.modeling.criterion as criterion_mod
from eco_m2f.config import get_cfg
from eco_m2f.modeling.criterion import (
    SetCriterion,
    apply_loss_weights,
    build_criterion,
    build_weight_dict,
    dice_loss,
    sigmoid_ce_loss,
)
from eco_m2f.modeling.matcher import HungarianMatcher

NUM_CLASSES = 5
BIG = 30.0


def _targets():
    """Two images at 32x32 (padded input resolution), block-aligned to the 8x8 predictions."""
    m0 = torch.zeros(3, 32, 32, dtype=torch.bool)
    m0[0, :16, :16] = True
    m0[1, :16, 16:] = True
    m0[2, 16:, :] = True
    m1 = torch.zeros(1, 32, 32, dtype=torch.bool)
    m1[0, 8:24, 8:24] = True
    return [{"labels": torch.tensor([1, 4, 2]), "masks": m0}, {"labels": torch.tensor([3]), "masks": m1}]


QUERY_OF_TARGET = [[3, 0, 4], [2]]


def _outputs(targets, wrong: bool = False, num_queries: int = 5, big: float = BIG):
    """Predictions that copy the targets into fixed queries (``wrong``: every class shifted by
    one and every mask inverted; shuffling masks between queries would not do, the matcher
    would undo the shuffle)."""
    bs = len(targets)
    logits = torch.full((bs, num_queries, NUM_CLASSES + 1), -big)
    logits[:, :, NUM_CLASSES] = big
    masks = torch.full((bs, num_queries, 8, 8), -big)
    for b, t in enumerate(targets):
        for j, q in enumerate(QUERY_OF_TARGET[b][: len(t["labels"])]):
            label = (t["labels"][j] + 1) % NUM_CLASSES if wrong else t["labels"][j]
            mask = t["masks"][j, ::4, ::4].float()
            if wrong:
                mask = 1 - mask
            logits[b, q] = -big
            logits[b, q, label] = big
            masks[b, q] = big * (2 * mask - 1)
    return {"pred_logits": logits, "pred_masks": masks}


def _criterion(num_points: int = 200, **kw) -> SetCriterion:
    matcher = HungarianMatcher(2.0, 5.0, 5.0, num_points=num_points)
    weight_dict = build_weight_dict(2.0, 5.0, 5.0, dec_layers=3, deep_supervision=True)
    kw = {"oversample_ratio": 3.0, "importance_sample_ratio": 0.75, **kw}
    return SetCriterion(NUM_CLASSES, matcher, weight_dict, eos_coef=0.1, losses=["labels", "masks"],
                        num_points=num_points, **kw)


def _pixel_centre_points(coarse_logits: torch.Tensor, *_args, **_kw) -> torch.Tensor:
    """The 8x8 prediction's pixel centres; there both the prediction and the block-aligned
    target are exactly binary, so a perfect prediction must cost ~0."""
    c = (torch.arange(8, dtype=torch.float32, device=coarse_logits.device) + 0.5) / 8
    grid = torch.stack(torch.meshgrid(c, c, indexing="xy"), dim=-1).reshape(1, 64, 2)
    return grid.expand(coarse_logits.shape[0], 64, 2).clone()


# ---------------------------------------------------------------------------------------------


def test_empty_weight_buffer_is_persistent():
    crit = _criterion()
    assert crit.empty_weight.tolist() == pytest.approx([1.0] * NUM_CLASSES + [0.1])
    assert "empty_weight" in crit.state_dict()


def test_loss_ce_equals_weighted_cross_entropy_by_hand():
    crit = _criterion()
    # One image, three queries, C = 2 (logit index 2 = "no object").
    logits = torch.tensor([[[2.0, 0.5, -1.0], [0.0, 1.0, 0.3], [0.2, -0.4, 1.5]]])
    targets = [{"labels": torch.tensor([1]), "masks": torch.zeros(1, 4, 4)}]
    crit.num_classes = 2
    crit.empty_weight = torch.tensor([1.0, 1.0, 0.1])
    indices = [(torch.tensor([0]), torch.tensor([0]))]  # query 0 <- class 1; queries 1, 2 <- no object
    got = crit.loss_labels({"pred_logits": logits}, targets, indices, num_masks=1.0)["loss_ce"]

    def nll(row, cls):
        return -(row[cls] - math.log(sum(math.exp(v) for v in row)))

    rows = logits[0].tolist()
    expect = (1.0 * nll(rows[0], 1) + 0.1 * nll(rows[1], 2) + 0.1 * nll(rows[2], 2)) / (1.0 + 0.1 + 0.1)
    assert got.item() == pytest.approx(expect, rel=1e-6)


def test_mask_losses_by_hand():
    logits = torch.tensor([[0.0, 2.0], [-1.0, 3.0]])
    labels = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    s = torch.sigmoid(logits)
    bce = -(labels * s.log() + (1 - labels) * (1 - s).log()).mean(1).sum() / 4.0
    dice = (1 - (2 * (s * labels).sum(1) + 1) / (s.sum(1) + labels.sum(1) + 1)).sum() / 4.0
    assert sigmoid_ce_loss(logits, labels, 4.0).item() == pytest.approx(bce.item(), rel=1e-6)
    assert dice_loss(logits, labels, 4.0).item() == pytest.approx(dice.item(), rel=1e-6)


def test_perfect_predictions_cost_about_zero(monkeypatch):
    monkeypatch.setattr(criterion_mod, "get_uncertain_point_coords_with_randomness", _pixel_centre_points)
    targets = _targets()
    outputs = _outputs(targets)
    outputs["aux_outputs"] = [_outputs(targets), _outputs(targets)]
    torch.manual_seed(0)
    losses = _criterion()(outputs, targets)
    assert set(losses) == {f"loss_{n}{s}" for n in ("ce", "mask", "dice") for s in ("", "_0", "_1")}
    for k, v in losses.items():
        assert v.item() < 1e-6, (k, v.item())


def test_wrong_predictions_cost_more_than_perfect_ones():
    targets = _targets()
    crit = _criterion()
    torch.manual_seed(0)
    good = crit(_outputs(targets), targets)
    torch.manual_seed(0)
    bad = crit(_outputs(targets, wrong=True), targets)
    assert good["loss_ce"] < 1e-6 < 1.0 < bad["loss_ce"]
    # With importance sampling most points sit on mask boundaries, where bilinear sampling of the
    # 1/4-resolution prediction and the full-resolution target disagree: "perfect" is small, not 0.
    for k in ("loss_mask", "loss_dice"):
        assert good[k] < 0.2 * bad[k], (k, good[k].item(), bad[k].item())
    assert bad["loss_dice"] > 0.5


def test_images_without_targets():
    targets = _targets()
    empty = {"labels": torch.zeros(0, dtype=torch.int64), "masks": torch.zeros(0, 32, 32, dtype=torch.bool)}
    crit = _criterion()
    # One image with targets and one without.
    outputs = _outputs([targets[0], empty])
    torch.manual_seed(0)
    losses = crit(outputs, [targets[0], empty])
    assert all(torch.isfinite(v) for v in losses.values())
    assert losses["loss_ce"] < 1e-6  # image 1's queries all predict "no object"
    # No target in the whole batch: mask losses are exact zeros that still reach the graph.
    outputs = _outputs([empty, empty])
    outputs["pred_masks"].requires_grad_(True)
    losses = crit(outputs, [empty, empty])
    assert losses["loss_mask"].item() == 0.0 and losses["loss_dice"].item() == 0.0
    assert losses["loss_ce"] < 1e-6
    losses["loss_mask"].backward()
    assert outputs["pred_masks"].grad is not None


def test_num_masks_normaliser():
    crit = _criterion()
    targets = _targets()
    assert crit.get_num_masks(targets, torch.device("cpu")) == 4.0
    empty = {"labels": torch.zeros(0, dtype=torch.int64), "masks": torch.zeros(0, 4, 4)}
    assert crit.get_num_masks([empty], torch.device("cpu")) == 1.0  # clamped


def test_mask_loss_is_divided_by_num_masks():
    targets = _targets()
    crit = _criterion()
    outputs = _outputs(targets, wrong=True)
    torch.manual_seed(1)
    indices = crit.matcher(outputs, targets)
    torch.manual_seed(2)
    a = crit.loss_masks(outputs, targets, indices, num_masks=1.0)
    torch.manual_seed(2)
    b = crit.loss_masks(outputs, targets, indices, num_masks=4.0)
    for k in a:
        assert a[k].item() == pytest.approx(4 * b[k].item(), rel=1e-6)


def test_targets_smaller_than_batch_are_padded_bottom_right():
    # A 16x16 target mask beside a 32x32 one is the top-left quarter of the padded frame.
    targets = _targets()
    crit = _criterion()
    small = {"labels": torch.tensor([3]), "masks": torch.ones(1, 16, 16, dtype=torch.bool)}
    quarter = {"labels": torch.tensor([3]), "masks": torch.zeros(1, 32, 32, dtype=torch.bool)}
    quarter["masks"][0, :16, :16] = True
    outputs = _outputs([targets[0], quarter])
    torch.manual_seed(3)
    ref = crit(outputs, [targets[0], quarter])
    torch.manual_seed(3)
    got = crit(outputs, [targets[0], small])
    for k in ref:
        torch.testing.assert_close(got[k], ref[k])


def test_gradients_flow_to_logits_and_masks_of_every_layer():
    torch.manual_seed(4)
    targets = _targets()

    def rand_out():
        return {"pred_logits": torch.randn(2, 5, NUM_CLASSES + 1, requires_grad=True),
                "pred_masks": torch.randn(2, 5, 8, 8, requires_grad=True)}

    outputs = rand_out()
    outputs["aux_outputs"] = [rand_out(), rand_out()]
    crit = _criterion()
    losses = apply_loss_weights(crit(outputs, targets), crit.weight_dict)
    assert len(losses) == 9
    sum(losses.values()).backward()
    for o in [outputs, *outputs["aux_outputs"]]:
        for key in ("pred_logits", "pred_masks"):
            g = o[key].grad
            assert g is not None and torch.isfinite(g).all() and g.abs().sum() > 0, key


def test_deterministic_under_seed():
    targets = _targets()
    torch.manual_seed(5)
    outputs = {"pred_logits": torch.randn(2, 5, NUM_CLASSES + 1), "pred_masks": torch.randn(2, 5, 8, 8)}
    crit = _criterion()
    runs = []
    for _ in range(2):
        torch.manual_seed(6)
        runs.append(crit(outputs, targets))
    for k in runs[0]:
        assert torch.equal(runs[0][k], runs[1][k]), k
    torch.manual_seed(7)
    other = crit(outputs, targets)
    assert not torch.equal(other["loss_mask"], runs[0]["loss_mask"])  # points are random


def test_bf16_predictions_under_autocast():
    targets = _targets()
    torch.manual_seed(8)
    outputs = {"pred_logits": torch.randn(2, 5, NUM_CLASSES + 1).bfloat16().requires_grad_(True),
               "pred_masks": torch.randn(2, 5, 8, 8).bfloat16().requires_grad_(True)}
    with torch.autocast("cpu", dtype=torch.bfloat16):
        losses = _criterion()(outputs, targets)
    for k, v in losses.items():
        assert v.dtype == torch.float32 and torch.isfinite(v), k
    sum(losses.values()).backward()
    assert outputs["pred_masks"].grad.dtype == torch.bfloat16


def test_weight_dict_and_apply_weights():
    wd = build_weight_dict(2.0, 5.0, 5.0, dec_layers=10, deep_supervision=True)
    assert len(wd) == 3 * 10
    assert wd["loss_ce"] == 2.0 and wd["loss_mask"] == 5.0 and wd["loss_dice"] == 5.0
    assert wd["loss_ce_8"] == 2.0 and wd["loss_dice_0"] == 5.0 and "loss_ce_9" not in wd
    assert build_weight_dict(2.0, 5.0, 5.0, 10, False) == {"loss_ce": 2.0, "loss_mask": 5.0, "loss_dice": 5.0}
    losses = {"loss_ce": torch.tensor(1.5), "loss_mask": torch.tensor(2.0), "loss_other": torch.tensor(9.0)}
    out = apply_loss_weights(losses, {"loss_ce": 2.0, "loss_mask": 5.0})
    assert set(out) == {"loss_ce", "loss_mask"} and out["loss_ce"].item() == 3.0 and out["loss_mask"].item() == 10.0


def test_build_criterion_from_config():
    cfg = get_cfg()
    cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES = 19
    cfg.MODEL.MASK_FORMER.NO_OBJECT_WEIGHT = 0.2
    mf = cfg.MODEL.MASK_FORMER  # the official Mask2Former configs' values
    mf.CLASS_WEIGHT, mf.MASK_WEIGHT, mf.DICE_WEIGHT, mf.DEC_LAYERS = 2.0, 5.0, 5.0, 10
    crit = build_criterion(cfg)
    assert crit.num_classes == 19 and crit.empty_weight.shape == (20,)
    assert crit.empty_weight[-1].item() == pytest.approx(0.2)
    assert crit.num_points == 12544 and crit.oversample_ratio == 3.0 and crit.importance_sample_ratio == 0.75
    assert crit.losses == ["labels", "masks"]
    assert len(crit.weight_dict) == 30 and crit.weight_dict["loss_ce_8"] == 2.0
    m = crit.matcher
    assert (m.cost_class, m.cost_mask, m.cost_dice, m.num_points) == (2.0, 5.0, 5.0, 12544)


def test_bad_arguments():
    matcher = HungarianMatcher(1.0, 1.0, 1.0, num_points=10)
    with pytest.raises(ValueError, match="unknown losses"):
        SetCriterion(3, matcher, {}, 0.1, losses=["labels", "boxes"], num_points=10)
    crit = SetCriterion(3, matcher, {}, 0.1, num_points=10)
    with pytest.raises(ValueError, match="num_classes \\+ 1 = 4"):
        crit({"pred_logits": torch.randn(1, 2, 6), "pred_masks": torch.randn(1, 2, 4, 4)},
             [{"labels": torch.tensor([0]), "masks": torch.ones(1, 8, 8)}])


# ---------------------------------------------------------------------------------------------
# num_masks is averaged over processes


def _num_masks_job(rank: int):
    n = 3 if rank == 0 else 0  # 3 masks on rank 0, none on rank 1 -> 1.5 each
    targets = [{"labels": torch.zeros(n, dtype=torch.int64), "masks": torch.zeros(n, 4, 4)}]
    return _tiny_criterion().get_num_masks(targets, torch.device("cpu"))


def _num_masks_per_group_job(rank: int):
    # rank 0 decoded exits 2 and 4 (3 + 1 masks at exit 2, 2 at exit 4); rank 1 only exit 6 (4 masks)
    n = [3, 1, 2] if rank == 0 else [4]
    groups = [2, 2, 4] if rank == 0 else [6]
    targets = [{"labels": torch.zeros(k, dtype=torch.int64), "masks": torch.zeros(k, 4, 4)} for k in n]
    return _tiny_criterion().get_num_masks_per_group(targets, groups, [2, 4, 6], torch.device("cpu")).tolist()


def _tiny_criterion() -> SetCriterion:
    return SetCriterion(2, HungarianMatcher(1.0, 1.0, 1.0, num_points=4), {}, 0.1, num_points=4)


def _dist_worker(rank: int, world_size: int, init_file: str, results, job) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        results[rank] = job(rank)
    finally:
        dist.destroy_process_group()


def _on_two_processes(tmp_path, job) -> dict:
    ctx = mp.get_context("spawn")
    with ctx.Manager() as manager:
        results = manager.dict()
        mp.start_processes(_dist_worker, args=(2, str(tmp_path / "init"), results, job), nprocs=2, join=True,
                           start_method="spawn")
        return dict(results)


def test_num_masks_is_averaged_across_processes(tmp_path):
    assert _on_two_processes(tmp_path, _num_masks_job) == {0: 1.5, 1: 1.5}


def test_num_masks_per_group_is_one_reduction_when_processes_hold_different_groups(tmp_path):
    # per group: masks over both processes / 2, at least 1
    assert _on_two_processes(tmp_path, _num_masks_per_group_job) == {0: [2.0, 1.0, 2.0], 1: [2.0, 1.0, 2.0]}


# ---------------------------------------------------------------------------------------------
# GPU


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_equals_cpu_and_runs_under_bf16_autocast(monkeypatch):
    # Fixed points for the loss; the matcher's random points differ per device, so predictions
    # are made unambiguous (small logits plus noise: matching is obvious, losses are not ~0).
    monkeypatch.setattr(criterion_mod, "get_uncertain_point_coords_with_randomness", _pixel_centre_points)
    targets = _targets()
    torch.manual_seed(11)
    outputs = _outputs(targets, big=3.0)
    outputs = {k: v + 0.5 * torch.randn_like(v) for k, v in outputs.items()}
    outputs["aux_outputs"] = [{k: v.clone() for k, v in outputs.items()}]
    crit = _criterion()
    cpu = crit(outputs, targets)
    assert cpu["loss_mask"] > 1e-3 and cpu["loss_ce"] > 1e-3

    dev = torch.device("cuda")
    crit_gpu = _criterion().to(dev)
    t_gpu = [{k: v.to(dev) for k, v in t.items()} for t in targets]

    def to_dev(o):
        out = {k: v.to(dev).requires_grad_(True) for k, v in o.items() if k != "aux_outputs"}
        if "aux_outputs" in o:
            out["aux_outputs"] = [to_dev(a) for a in o["aux_outputs"]]
        return out

    gpu_out = to_dev(outputs)
    gpu = crit_gpu(gpu_out, t_gpu)
    for k in cpu:
        assert gpu[k].device.type == "cuda"
        assert gpu[k].item() == pytest.approx(cpu[k].item(), rel=1e-4, abs=1e-5), k
    sum(gpu.values()).backward()
    assert gpu_out["pred_masks"].grad.abs().sum() > 0

    bf16 = {k: v.detach().bfloat16().requires_grad_(True) for k, v in gpu_out.items() if k != "aux_outputs"}
    with torch.autocast("cuda", dtype=torch.bfloat16):
        losses = crit_gpu(bf16, t_gpu)
    for k, v in losses.items():
        assert v.dtype == torch.float32 and torch.isfinite(v), k
        assert v.item() == pytest.approx(cpu[k].item(), rel=0.05, abs=0.02), k
    sum(losses.values()).backward()
    assert torch.isfinite(bf16["pred_logits"].grad.float()).all()


def test_forward_equals_its_losses_layer_by_layer_from_cpu_indices():
    """forward moves each layer's matching to the device once; the losses equal those computed
    layer by layer from the matcher's CPU indices, with the same random draws."""
    torch.manual_seed(21)
    b, q = 3, 6

    def layer():
        return {"pred_logits": torch.randn(b, q, NUM_CLASSES + 1), "pred_masks": torch.randn(b, q, 8, 8)}

    outputs = layer()
    outputs["aux_outputs"] = [layer(), layer()]
    targets = [{"labels": torch.tensor([0, 2]), "masks": torch.rand(2, 32, 32) > 0.5},
               {"labels": torch.zeros(0, dtype=torch.int64), "masks": torch.zeros(0, 32, 32, dtype=torch.bool)},
               {"labels": torch.tensor([1, 1, 3]), "masks": torch.rand(3, 28, 30) > 0.5}]
    crit = _criterion(num_points=40)
    torch.manual_seed(22)
    got = crit(outputs, targets)
    torch.manual_seed(22)
    expect = {}
    for suffix, out in [("", outputs)] + [(f"_{i}", o) for i, o in enumerate(outputs["aux_outputs"])]:
        indices = crit.matcher({k: v for k, v in out.items() if k != "aux_outputs"}, targets)
        for loss in (crit.loss_labels(out, targets, indices, 5.0), crit.loss_masks(out, targets, indices, 5.0)):
            expect.update({k + suffix: v for k, v in loss.items()})
    assert sorted(got) == sorted(expect)
    for k in expect:
        torch.testing.assert_close(got[k], expect[k], rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------
# grouped losses (ECO step A decodes all exits in one batch)


def test_forward_groups_equals_forward_on_each_group_alone(same_points_per_item):
    torch.manual_seed(5)
    empty = {"labels": torch.zeros(0, dtype=torch.int64), "masks": torch.zeros(0, 32, 32, dtype=torch.bool)}
    targets = _targets() + [_targets()[1], empty] + _targets()[:1]  # 3, 1, 1, 0, 3 targets
    groups = [4, 2, 4, 6, 2]  # interleaved; group 6 holds only the image without targets
    noisy = lambda o: {k: v + 2.0 * torch.randn_like(v) for k, v in o.items()}  # noqa: E731
    base = {"pred_logits": torch.randn(5, 5, NUM_CLASSES + 1), "pred_masks": torch.randn(5, 5, 8, 8)}
    outputs = {**base, "aux_outputs": [noisy(base), noisy(base)]}
    crit = _criterion()

    grouped = crit.forward_groups(outputs, targets, groups, all_groups=[2, 3, 4, 5, 6])
    assert set(grouped) == {2, 4, 6}
    for g, terms in grouped.items():
        idx = [b for b, gb in enumerate(groups) if gb == g]

        def sub(o):
            return {k: v[idx] for k, v in o.items() if k != "aux_outputs"}

        alone = crit({**sub(outputs), "aux_outputs": [sub(a) for a in outputs["aux_outputs"]]},
                     [targets[b] for b in idx])
        assert set(terms) == set(alone)
        for name, value in alone.items():
            assert terms[name].item() == pytest.approx(value.item(), rel=1e-5, abs=1e-7), (g, name)
    assert grouped[6]["loss_mask"].item() == 0.0 and grouped[6]["loss_ce"].item() > 0
    # one backward reaches every layer's predictions
    leaves = [outputs["pred_masks"].requires_grad_(), outputs["aux_outputs"][1]["pred_logits"].requires_grad_()]
    sum(v for terms in crit.forward_groups(outputs, targets, groups).values() for v in terms.values()).backward()
    assert all(t.grad is not None and t.grad.abs().sum() > 0 for t in leaves)


def test_forward_groups_names_bad_groups():
    crit = _criterion()
    outputs = _outputs(_targets())
    with pytest.raises(ValueError, match="1 group ids for 2 images"):
        crit.forward_groups(outputs, _targets(), [2])
    with pytest.raises(ValueError, match=r"groups \[7\] are not in all_groups \[2, 6\]"):
        crit.forward_groups(outputs, _targets(), [2, 7], all_groups=[2, 6])
