"""Point sampling and Hungarian matching: hand-checkable cases on CPU."""
from __future__ import annotations

import itertools
import math

import pytest
import torch

from eco_m2f.modeling.matcher import HungarianMatcher, batch_dice_loss, batch_sigmoid_ce_loss
from eco_m2f.modeling.point_sampling import (
    calculate_uncertainty,
    get_uncertain_point_coords_with_randomness,
    point_sample,
)

# ---------------------------------------------------------------------------------------------
# point sampling


def test_point_sample_constant_mask_returns_constant_inside():
    x = torch.full((2, 3, 5, 7), 0.37)
    # Points at least half a pixel from the border (zero padding only acts outside that).
    coords = torch.rand(2, 50, 2) * (1 - 1 / 5) + 0.5 / 5
    out = point_sample(x, coords)
    assert out.shape == (2, 3, 50)
    torch.testing.assert_close(out, torch.full_like(out, 0.37))


def test_point_sample_corner_uses_zero_padding():
    # (0, 0) is the outer corner of the top-left pixel: bilinear with zero padding gives v/4.
    x = torch.full((1, 1, 4, 4), 2.0)
    out = point_sample(x, torch.tensor([[[0.0, 0.0], [1.0, 1.0]]]))
    torch.testing.assert_close(out, torch.tensor([[[0.5, 0.5]]]))


def test_point_sample_linear_ramp_is_bilinear():
    h, w = 6, 8
    cols = torch.arange(w, dtype=torch.float32).expand(h, w)
    rows = torch.arange(h, dtype=torch.float32)[:, None].expand(h, w)
    x = torch.stack([cols, 10 * rows])[None]  # [1, 2, H, W]; pixel (i, j) has centre ((j+.5)/W, (i+.5)/H)
    pts = torch.tensor([[[0.5, 0.5], [1.5 / w, 0.75], [0.3, 2.2 / h], [(w - 0.5) / w, (h - 0.5) / h]]])
    out = point_sample(x, pts)  # [1, 2, 4]
    # Inside the pixel-centre hull bilinear interpolation of a linear ramp is exact:
    # value(x) = x * W - 0.5 for columns, 10 * (y * H - 0.5) for rows.
    expect_cols = pts[0, :, 0] * w - 0.5
    expect_rows = 10 * (pts[0, :, 1] * h - 0.5)
    torch.testing.assert_close(out[0, 0], expect_cols)
    torch.testing.assert_close(out[0, 1], expect_rows)
    # Hand-checked values: centre of the image is between columns 3 and 4 / rows 2 and 3.
    torch.testing.assert_close(out[0, :, 0], torch.tensor([3.5, 25.0]))


def test_point_sample_grid_form_and_errors():
    x = torch.randn(2, 1, 4, 4)
    grid = torch.rand(2, 3, 5, 2)
    assert point_sample(x, grid).shape == (2, 1, 3, 5)
    with pytest.raises(ValueError, match="batch sizes differ"):
        point_sample(x, torch.rand(3, 5, 2))
    with pytest.raises(ValueError, match=r"\[N, C, H, W\]"):
        point_sample(x[0], torch.rand(2, 5, 2))


def test_calculate_uncertainty():
    logits = torch.tensor([[[-3.0, 0.0, 2.0]]])
    torch.testing.assert_close(calculate_uncertainty(logits), torch.tensor([[[-3.0, 0.0, -2.0]]]))
    with pytest.raises(ValueError):
        calculate_uncertainty(torch.zeros(1, 2, 3))


def test_uncertain_points_pick_the_most_uncertain_candidates():
    # Logits grow linearly with x: uncertainty is highest near the vertical centre line.
    w = 16
    ramp = torch.linspace(-8, 8, w).expand(4, w)[None, None].repeat(3, 1, 1, 1)  # [3, 1, 4, 16]
    num_points, over, imp = 20, 3.0, 0.75
    torch.manual_seed(0)
    cands = torch.rand(3, int(num_points * over), 2)
    torch.manual_seed(0)
    pts = get_uncertain_point_coords_with_randomness(ramp, calculate_uncertainty, num_points, over, imp)
    assert pts.shape == (3, num_points, 2)
    assert pts.min() >= 0 and pts.max() <= 1
    num_unc = int(imp * num_points)
    for n in range(3):
        unc = calculate_uncertainty(point_sample(ramp[n : n + 1], cands[n : n + 1]))[0, 0]
        best = cands[n][unc.topk(num_unc).indices]
        torch.testing.assert_close(pts[n, :num_unc], best)
    # The importance-sampled points are closer to the zero crossing than the candidates on average.
    assert (pts[:, :num_unc, 0] - 0.5).abs().mean() < (cands[..., 0] - 0.5).abs().mean()


def test_uncertain_points_bad_ratios():
    x = torch.zeros(1, 1, 4, 4)
    with pytest.raises(ValueError, match="oversample_ratio"):
        get_uncertain_point_coords_with_randomness(x, calculate_uncertainty, 8, 0.5, 0.5)
    with pytest.raises(ValueError, match="importance_sample_ratio"):
        get_uncertain_point_coords_with_randomness(x, calculate_uncertainty, 8, 2.0, 1.5)


# ---------------------------------------------------------------------------------------------
# pairwise costs


def test_pairwise_costs_equal_direct_per_pair_computation():
    torch.manual_seed(1)
    logits = torch.randn(4, 9) * 3
    targets = (torch.rand(3, 9) > 0.5).float()
    targets[1, 4] = 0.3  # soft values are allowed (bilinear samples of binary masks)
    dice = batch_dice_loss(logits, targets)
    ce = batch_sigmoid_ce_loss(logits, targets)
    assert dice.shape == ce.shape == (4, 3)
    for q in range(4):
        for n in range(3):
            s = [1 / (1 + math.exp(-v)) for v in logits[q].tolist()]
            t = targets[n].tolist()
            d = 1 - (2 * sum(a * b for a, b in zip(s, t)) + 1) / (sum(s) + sum(t) + 1)
            b = -sum(tt * math.log(ss) + (1 - tt) * math.log(1 - ss) for ss, tt in zip(s, t)) / len(s)
            assert dice[q, n].item() == pytest.approx(d, rel=1e-5, abs=1e-6)
            assert ce[q, n].item() == pytest.approx(b, rel=1e-5, abs=1e-6)


def test_cost_matrix_equals_direct_computation_on_shared_points():
    torch.manual_seed(2)
    q, c, n = 4, 3, 2
    logits = torch.randn(q, c + 1)
    pred = torch.randn(q, 6, 5)
    labels = torch.tensor([2, 0])
    masks = torch.rand(n, 24, 20) > 0.5
    matcher = HungarianMatcher(cost_class=2.0, cost_mask=5.0, cost_dice=5.0, num_points=7)
    torch.manual_seed(3)
    cost = matcher.cost_matrix(logits, pred, labels, masks)
    torch.manual_seed(3)
    pts = torch.rand(1, 7, 2)  # the matcher draws exactly this
    prob = logits.softmax(-1)
    for i in range(q):
        p = point_sample(pred[i][None, None], pts)[0, 0]
        s = p.sigmoid()
        for j in range(n):
            t = point_sample(masks[j].float()[None, None], pts)[0, 0]
            bce = torch.nn.functional.binary_cross_entropy_with_logits(p, t)
            dice = 1 - (2 * (s * t).sum() + 1) / (s.sum() + t.sum() + 1)
            expect = 2.0 * -prob[i, labels[j]] + 5.0 * bce + 5.0 * dice
            assert cost[i, j].item() == pytest.approx(expect.item(), rel=1e-5, abs=1e-5)


# ---------------------------------------------------------------------------------------------
# matching


def _blocks_case(big: float = 20.0):
    """Targets at 32x32 (block-aligned) and predictions at 8x8 = shuffled copies of them."""
    m = torch.zeros(3, 32, 32, dtype=torch.bool)
    m[0, :16, :16] = True
    m[1, :16, 16:] = True
    m[2, 16:, :] = True
    labels = torch.tensor([1, 4, 2])
    num_classes, num_queries = 5, 5
    query_of_target = [3, 0, 4]
    logits = torch.full((1, num_queries, num_classes + 1), -big)
    logits[0, :, num_classes] = big  # unmatched queries: "no object"
    masks = torch.full((1, num_queries, 8, 8), -big)
    for t, qi in enumerate(query_of_target):
        logits[0, qi] = -big
        logits[0, qi, labels[t]] = big
        masks[0, qi] = big * (2 * m[t, ::4, ::4].float() - 1)
    return {"pred_logits": logits, "pred_masks": masks}, [{"labels": labels, "masks": m}], query_of_target


def test_matcher_recovers_obvious_permutation():
    outputs, targets, query_of_target = _blocks_case()
    torch.manual_seed(0)
    (rows, cols), = HungarianMatcher(2.0, 5.0, 5.0, num_points=500)(outputs, targets)
    assert rows.dtype == cols.dtype == torch.int64
    got = {int(c): int(r) for r, c in zip(rows, cols)}
    assert got == {0: 3, 1: 0, 2: 4}


@pytest.mark.parametrize("which", ["class", "masks"])
def test_matcher_each_cost_alone_recovers_permutation(which):
    outputs, targets, _ = _blocks_case()
    if which == "class":  # masks carry no information: only the class cost can decide
        outputs["pred_masks"] = torch.zeros_like(outputs["pred_masks"])
        matcher = HungarianMatcher(1.0, 0.0, 0.0, num_points=100)
    else:  # classes carry no information
        outputs["pred_logits"] = torch.zeros_like(outputs["pred_logits"])
        matcher = HungarianMatcher(0.0, 1.0, 1.0, num_points=500)
    torch.manual_seed(0)
    (rows, cols), = matcher(outputs, targets)
    assert {int(c): int(r) for r, c in zip(rows, cols)} == {0: 3, 1: 0, 2: 4}


def test_matcher_assignment_is_optimal_by_brute_force():
    torch.manual_seed(4)
    q, n = 5, 3
    outputs = {"pred_logits": torch.randn(1, q, 4), "pred_masks": torch.randn(1, q, 4, 4)}
    targets = [{"labels": torch.tensor([0, 2, 1]), "masks": torch.rand(n, 16, 16) > 0.5}]
    matcher = HungarianMatcher(2.0, 5.0, 5.0, num_points=30)
    torch.manual_seed(5)
    cost = matcher.cost_matrix(outputs["pred_logits"][0], outputs["pred_masks"][0], targets[0]["labels"],
                               targets[0]["masks"])
    torch.manual_seed(5)
    (rows, cols), = matcher(outputs, targets)
    got = cost[rows, cols].sum().item()
    best = min(sum(cost[p[j], j].item() for j in range(n)) for p in itertools.permutations(range(q), n))
    assert got == pytest.approx(best, abs=1e-6)
    assert len(set(rows.tolist())) == n and sorted(cols.tolist()) == list(range(n))


def test_matcher_more_targets_than_queries():
    torch.manual_seed(6)
    outputs = {"pred_logits": torch.randn(1, 2, 4), "pred_masks": torch.randn(1, 2, 4, 4)}
    targets = [{"labels": torch.tensor([0, 1, 2]), "masks": torch.rand(3, 16, 16) > 0.5}]
    (rows, cols), = HungarianMatcher(1.0, 1.0, 1.0, num_points=20)(outputs, targets)
    assert len(rows) == len(cols) == 2 and len(set(cols.tolist())) == 2


def test_matcher_handles_images_without_targets():
    outputs, targets, _ = _blocks_case()
    outputs = {k: torch.cat([v, v]) for k, v in outputs.items()}
    targets = [{"labels": torch.zeros(0, dtype=torch.int64), "masks": torch.zeros(0, 32, 32, dtype=torch.bool)},
               targets[0]]
    torch.manual_seed(0)
    (r0, c0), (r1, c1) = HungarianMatcher(2.0, 5.0, 5.0, num_points=500)(outputs, targets)
    assert r0.numel() == c0.numel() == 0 and r0.dtype == c0.dtype == torch.int64
    assert {int(c): int(r) for r, c in zip(r1, c1)} == {0: 3, 1: 0, 2: 4}


def test_matcher_computes_in_fp32_under_autocast_and_needs_no_grad():
    torch.manual_seed(7)
    logits = torch.randn(6, 5, requires_grad=True)
    pred = torch.randn(6, 8, 8, requires_grad=True)
    labels = torch.tensor([0, 3])
    masks = torch.rand(2, 32, 32) > 0.5
    matcher = HungarianMatcher(2.0, 5.0, 5.0, num_points=64)
    torch.manual_seed(8)
    ref = matcher.cost_matrix(logits.detach(), pred.detach(), labels, masks)
    torch.manual_seed(8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        amp = matcher.cost_matrix(logits.detach().bfloat16(), pred.detach().bfloat16(), labels, masks)
    assert amp.dtype == torch.float32
    # Only the bf16 rounding of the inputs differs; the arithmetic itself is fp32.
    torch.testing.assert_close(amp, ref, rtol=0.05, atol=0.05)
    out = matcher({"pred_logits": logits[None], "pred_masks": pred[None]}, [{"labels": labels, "masks": masks}])
    assert not out[0][0].requires_grad


def test_matcher_deterministic_under_seed():
    torch.manual_seed(9)
    outputs = {"pred_logits": torch.randn(2, 6, 4), "pred_masks": torch.randn(2, 6, 4, 4)}
    targets = [{"labels": torch.tensor([0, 2, 1]), "masks": torch.rand(3, 16, 16) > 0.5},
               {"labels": torch.tensor([2]), "masks": torch.rand(1, 16, 16) > 0.5}]
    matcher = HungarianMatcher(2.0, 5.0, 5.0, num_points=10)
    results = []
    for _ in range(2):
        torch.manual_seed(10)
        results.append(matcher(outputs, targets))
    for (a, b), (c, d) in zip(*results):
        assert torch.equal(a, c) and torch.equal(b, d)


def test_matcher_input_errors():
    outputs, targets, _ = _blocks_case()
    m = HungarianMatcher(1.0, 1.0, 1.0, num_points=10)
    with pytest.raises(ValueError, match="2 targets for a batch of 1"):
        m(outputs, targets * 2)
    with pytest.raises(KeyError, match="'masks'"):
        m(outputs, [{"labels": targets[0]["labels"]}])
    with pytest.raises(ValueError, match="len\\(labels\\)"):
        m(outputs, [{"labels": targets[0]["labels"][:2], "masks": targets[0]["masks"]}])
    with pytest.raises(ValueError, match="all costs are 0"):
        HungarianMatcher(0.0, 0.0, 0.0, num_points=10)
    with pytest.raises(ValueError, match="num_points"):
        HungarianMatcher(1.0, 1.0, 1.0, num_points=0)


def _three_images():
    torch.manual_seed(11)
    outputs = {"pred_logits": torch.randn(3, 6, 4), "pred_masks": torch.randn(3, 6, 4, 4)}
    targets = [{"labels": torch.tensor([0, 2, 1]), "masks": torch.rand(3, 16, 16) > 0.5},
               {"labels": torch.zeros(0, dtype=torch.int64), "masks": torch.zeros(0, 16, 16, dtype=torch.bool)},
               {"labels": torch.tensor([2, 2]), "masks": torch.rand(2, 16, 16) > 0.5}]
    return outputs, targets


def test_batched_matching_equals_image_by_image_and_copies_once(monkeypatch):
    """The batch's cost matrices are computed together (targets padded to the largest count,
    masks of different sizes) and come to the host in one copy; costs and assignments equal
    cost_matrix + linear_sum_assignment image by image at the same points."""
    from scipy.optimize import linear_sum_assignment

    outputs, targets = _three_images()
    targets[2]["masks"] = torch.rand(2, 12, 20) > 0.5  # another size: sampled at its own extent
    matcher = HungarianMatcher(2.0, 5.0, 5.0, num_points=12)
    torch.manual_seed(12)
    points = torch.rand(3, 12, 2)
    expect_costs = [None if t["labels"].numel() == 0 else
                    matcher.cost_matrix(outputs["pred_logits"][b], outputs["pred_masks"][b], t["labels"], t["masks"], points[b])
                    for b, t in enumerate(targets)]
    got_costs = matcher.batch_costs(outputs["pred_logits"], outputs["pred_masks"], targets, points)
    assert got_costs[1] is None and expect_costs[1] is None
    for b in (0, 2):
        torch.testing.assert_close(got_costs[b], expect_costs[b], rtol=1e-5, atol=1e-6)
    expect = [([], []) if c is None else tuple(x.tolist() for x in linear_sum_assignment(c.numpy())) for c in expect_costs]
    copies = []
    original = torch.Tensor.cpu
    monkeypatch.setattr(torch.Tensor, "cpu", lambda self, *a, **k: copies.append(self.shape) or original(self, *a, **k))
    torch.manual_seed(12)  # forward draws the same points: one [B, P, 2] draw per layer
    got = matcher(outputs, targets)
    assert [(r.tolist(), c.tolist()) for r, c in got] == expect
    assert copies == [torch.Size([6 * 3 + 6 * 2])]


def test_non_finite_cost_names_its_image():
    outputs, targets = _three_images()
    outputs["pred_masks"][2, 1] = float("nan")
    with pytest.raises(FloatingPointError, match="image 2"):
        HungarianMatcher(1.0, 1.0, 1.0, num_points=8)(outputs, targets)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_batched_costs_on_cuda_equal_cpu():
    outputs, targets = _three_images()
    matcher = HungarianMatcher(2.0, 5.0, 5.0, num_points=12)
    points = torch.rand(3, 12, 2)
    cpu = matcher.batch_costs(outputs["pred_logits"], outputs["pred_masks"], targets, points)
    dev = torch.device("cuda")
    gpu = matcher.batch_costs({k: v.to(dev) for k, v in outputs.items()}["pred_logits"], outputs["pred_masks"].to(dev),
                              [{k: v.to(dev) for k, v in t.items()} for t in targets], points.to(dev))
    assert gpu[1] is None
    for b in (0, 2):
        torch.testing.assert_close(gpu[b].cpu(), cpu[b], rtol=1e-4, atol=1e-5)
