"""Step A helpers: alpha schedules, depth sampling, Eq. 3 combination."""
from __future__ import annotations

import pytest
import torch

from eco_m2f.eco.exits import exit_set as validate_exits
from eco_m2f.eco.stochastic_depth import alpha_weights, combine_exit_losses, sample_depths


def test_linear_alpha_is_proportional_to_k_and_sums_to_one():
    a = alpha_weights([2, 3, 4, 5, 6], "linear")
    assert a[2] == pytest.approx(2 / 20) and a[6] == pytest.approx(6 / 20)
    assert sum(a.values()) == pytest.approx(1.0)
    assert all(a[k] < a[k + 1] for k in range(2, 6))


def test_uniform_alpha_is_the_usd_ablation():
    a = alpha_weights([2, 4, 6], "uniform")
    assert list(a.values()) == pytest.approx([1 / 3] * 3)


def test_explicit_alpha_must_increase_and_match_exits():
    assert alpha_weights([2, 6], [1.0, 3.0]) == pytest.approx({2: 0.25, 6: 0.75})
    with pytest.raises(ValueError, match="strictly increasing"):
        alpha_weights([2, 6], [3.0, 1.0])
    with pytest.raises(ValueError, match="2 exits"):
        alpha_weights([2, 6], [1.0])
    with pytest.raises(ValueError, match="'cubic'"):
        alpha_weights([2, 6], "cubic")


def test_validate_exits_names_bad_values():
    assert validate_exits([6, 2, 4, 4], 6) == [2, 4, 6]
    with pytest.raises(ValueError, match=r"\[7\]"):
        validate_exits([2, 7], 6)
    with pytest.raises(ValueError, match="empty"):
        validate_exits([], 6)


def test_sample_depths_deterministic_and_in_exit_set():
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    d1, d2 = sample_depths(100, [2, 4, 6], g1), sample_depths(100, [2, 4, 6], g2)
    assert torch.equal(d1, d2)
    assert set(d1.tolist()) == {2, 4, 6}


def test_combine_exit_losses_is_eq3():
    # N = 4 images with depths K = [2, 4, 4, 6], exits {2, 4, 6}, alpha linear = {2: 1/6, 4: 2/6, 6: 3/6}.
    # n_2 = 4, n_4 = 3, n_6 = 1. Per-exit batch losses (averaged over their images): L2 = 1+2, L4 = 5, L6 = 7.
    alpha = alpha_weights([2, 4, 6])
    losses = {2: {"loss_ce": torch.tensor(1.0), "loss_mask": torch.tensor(2.0)}, 4: {"loss_ce": torch.tensor(5.0)}, 6: {"loss_ce": torch.tensor(7.0)}}
    out = combine_exit_losses(losses, {2: 4, 4: 3, 6: 1}, 4, alpha)
    assert out["loss_exit2"].item() == pytest.approx(1 / 6 * 4 / 4 * 3)
    assert out["loss_exit4"].item() == pytest.approx(2 / 6 * 3 / 4 * 5)
    assert out["loss_exit6"].item() == pytest.approx(3 / 6 * 1 / 4 * 7)
    # an exit no image reached contributes nothing
    out = combine_exit_losses(losses, {2: 4, 4: 3, 6: 0}, 4, alpha)
    assert "loss_exit6" not in out
