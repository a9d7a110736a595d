"""DoViT's pure parts on constructed tensors: the stop rule, the class-token merge (Eq. 8), the
threshold ramp, the distillation losses (Eq. 11) and the auxiliary head's FLOPs."""
from __future__ import annotations

import math

import pytest
import torch

from eco_m2f.modeling.token_reduction import TokenSet
from eco_m2f.modeling.token_reduction.distillation import feature_mse, pixel_kl
from eco_m2f.modeling.token_reduction.dovit_aux_head import PointwiseAuxHead
from eco_m2f.modeling.token_reduction.dovit_rules import (
    StoppedSum, confidence, merge_stopped_into_cls, ramped_threshold, stop_mask,
)


def _logits_with_confidence(q: list[float], k: int = 3) -> torch.Tensor:
    """(T, K) logits whose softmax has max probability q[t] (the rest shared evenly)."""
    rows = []
    for value in q:
        rest = (1 - value) / (k - 1)
        rows.append([math.log(value)] + [math.log(rest)] * (k - 1))
    return torch.tensor(rows)


def test_confidence_is_the_max_softmax_probability():
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.0, 0.0, 0.0]])
    e = [math.exp(2), 1.0, math.exp(-1)]
    assert confidence(logits).tolist() == pytest.approx([e[0] / sum(e), 1 / 3])


def test_stop_mask_is_a_strict_threshold_and_xi_one_stops_nothing():
    logits = _logits_with_confidence([0.5, 0.96, 0.99, 0.951, 0.949])
    assert stop_mask(logits, 0.95).tolist() == [False, True, True, True, False]
    assert stop_mask(logits, 0.98).tolist() == [False, False, True, False, False]
    saturated = torch.tensor([[1e4, -1e4, -1e4], [50.0, 0.0, 0.0]])  # softmax rounds to exactly 1
    assert confidence(saturated)[0].item() == 1.0
    assert not stop_mask(saturated, 1.0).any()
    with pytest.raises(ValueError, match="xi must lie in"):
        stop_mask(logits, 1.5)


def test_threshold_ramp_falls_linearly_from_one_to_the_target():
    assert ramped_threshold(0, 1000, 0.98, 0.0) == 0.98  # no ramp: the paper
    assert ramped_threshold(0, 1000, 0.98, 0.5) == 1.0
    assert ramped_threshold(250, 1000, 0.98, 0.5) == pytest.approx(0.99)
    assert ramped_threshold(500, 1000, 0.98, 0.5) == pytest.approx(0.98)
    assert ramped_threshold(900, 1000, 0.98, 0.5) == pytest.approx(0.98)
    with pytest.raises(ValueError):
        ramped_threshold(0, 10, 0.98, -1.0)


def _set(batch: int = 2, cells: int = 6, dim: int = 3) -> tuple[TokenSet, torch.Tensor]:
    torch.manual_seed(0)
    tokens = torch.randn(batch, 1 + cells, dim)
    return TokenSet.from_dense(tokens, (2, cells // 2)), tokens


def test_cls_merge_is_eq8_over_every_token_stopped_so_far():
    ts, tokens = _set()
    stopped = StoppedSum.empty(ts)
    # decision 1: image 0 stops cells 1, 2; image 1 stops nothing
    stop1 = torch.tensor([0, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0], dtype=torch.bool)
    stopped = stopped.add(ts, stop1)
    merged = merge_stopped_into_cls(ts, stopped)
    cls0 = 0.5 * (tokens[0, 0] + (tokens[0, 2] + tokens[0, 3]) / 2)  # cells 1, 2 are rows 2, 3
    assert torch.allclose(merged.prefix()[0, 0], cls0)
    assert torch.equal(merged.prefix()[1, 0], tokens[1, 0])  # nothing stopped: unchanged
    ts = merged.keep(~stop1, save_features=True)
    # the blocks change live tokens; decision 2 averages the old stops (stop-time features) with the new
    ts = ts.with_patches(ts.patches() * 2.0)
    stop2 = torch.tensor([1, 0, 0, 0,  0, 0, 1, 1, 0, 0], dtype=torch.bool)  # image 0 cell 0; image 1 cells 2, 3
    stopped = stopped.add(ts, stop2)
    merged = merge_stopped_into_cls(ts, stopped)
    cls0 = 0.5 * (ts.prefix()[0, 0] + (tokens[0, 2] + tokens[0, 3] + 2 * tokens[0, 1]) / 3)
    cls1 = 0.5 * (ts.prefix()[1, 0] + (2 * tokens[1, 3] + 2 * tokens[1, 4]) / 2)
    assert torch.allclose(merged.prefix()[0, 0], cls0, atol=1e-6)
    assert torch.allclose(merged.prefix()[1, 0], cls1, atol=1e-6)
    assert torch.equal(merged.patches(), ts.patches())  # only the class token changes
    assert stopped.count.tolist() == [3, 2]


def test_cls_merge_threshold_on_the_stopped_share_as_the_official_code():
    ts, tokens = _set(cells=8, batch=2)
    # image 0 stops 1 of 8 + 1 tokens (11%), image 1 stops 2 (22%)
    stop = torch.zeros(16, dtype=torch.bool)
    stop[0] = True
    stop[8:10] = True
    stopped = StoppedSum.empty(ts).add(ts, stop)
    merged = merge_stopped_into_cls(ts, stopped, min_fraction=0.2)
    assert torch.equal(merged.prefix()[0, 0], tokens[0, 0])
    assert torch.allclose(merged.prefix()[1, 0], 0.5 * (tokens[1, 0] + (tokens[1, 1] + tokens[1, 2]) / 2))


def test_pixel_kl_equals_the_hand_computed_divergence():
    # B=1, K=2, a 1 x 2 image: student pixel logits (1, 0) and (0.5, -0.5), teacher (0, 2) and (0, 0)
    s = torch.tensor([[[[1.0, 0.5]], [[0.0, -0.5]]]])
    t = torch.tensor([[[[0.0, 0.0]], [[2.0, 0.0]]]])

    def probs(a, b):
        z = math.exp(a) + math.exp(b)
        return [math.exp(a) / z, math.exp(b) / z]

    ps = [probs(1.0, 0.0), probs(0.5, -0.5)]
    pt = [probs(0.0, 2.0), probs(0.0, 0.0)]
    kl_st = sum(sum(p * math.log(p / q) for p, q in zip(a, b)) for a, b in zip(ps, pt)) / 2
    kl_ts = sum(sum(q * math.log(q / p) for p, q in zip(a, b)) for a, b in zip(ps, pt)) / 2
    assert pixel_kl(s, t).item() == pytest.approx(kl_st, rel=1e-6)
    assert pixel_kl(s, t, "teacher_student").item() == pytest.approx(kl_ts, rel=1e-6)
    assert pixel_kl(t, t).item() == pytest.approx(0.0, abs=1e-7)
    student = s.clone().requires_grad_(True)
    teacher = t.clone().requires_grad_(True)
    pixel_kl(student, teacher).backward()
    assert student.grad.abs().sum() > 0 and teacher.grad is None
    with pytest.raises(ValueError, match="unknown KL direction"):
        pixel_kl(s, t, "both")


def test_feature_mse():
    a, b = torch.tensor([[1.0, 2.0]]), torch.tensor([[0.0, 4.0]])
    assert feature_mse(a, b).item() == pytest.approx((1 + 4) / 2)


def test_aux_head_flops_match_fvcore_and_gradients_reach_it():
    from fvcore.nn import FlopCountAnalysis

    for hidden in (16, 0):
        head = PointwiseAuxHead(8, 5, hidden=hidden).eval()
        x = torch.randn(7, 8)
        analysis = FlopCountAnalysis(head, (x,)).set_op_handle("aten::batch_norm", lambda inputs, outputs: 0)
        counted = analysis.unsupported_ops_warnings(False).total()  # the project's convention: BatchNorm 0
        assert counted == 7 * head.flops_per_token()
        head.train()
        head(x).sum().backward()
        assert head.cls.weight.grad.abs().sum() > 0
    head = PointwiseAuxHead(8, 5, hidden=16).train()
    assert head(torch.randn(1, 8)).shape == (1, 5)  # one row: BatchNorm falls back to running statistics
