"""Step-C targets t = argmax_{k <= K_user} (q_k - beta k), ties to the smaller k (papers/004 Eq. 4-5)."""
from __future__ import annotations

import numpy as np
import pytest

from eco_m2f.eco.targets import (
    allowed_exits,
    best_exits,
    exit_histogram,
    format_histogram,
    target_exits,
    targets,
    utility,
)

EXITS = [2, 3, 4, 5, 6]


def test_allowed_exits_and_errors():
    assert allowed_exits(EXITS, 6) == EXITS
    assert allowed_exits(EXITS, 4) == [2, 3, 4]
    assert allowed_exits(EXITS, 10) == EXITS
    with pytest.raises(ValueError, match=r"K_USER=1.*\[2, 3, 4, 5, 6\]"):
        allowed_exits(EXITS, 1)
    with pytest.raises(ValueError, match="strictly increasing"):
        allowed_exits([2, 4, 3], 6)


def test_utility_is_q_minus_beta_k():
    q = np.array([[0.5, 0.6, 0.7]])
    np.testing.assert_allclose(utility(q, [2, 3, 4], 0.1), [[0.3, 0.3, 0.3]])
    with pytest.raises(ValueError, match="columns"):
        utility(q, [2, 3], 0.1)


def test_targets_match_hand_computed_argmax():
    q = np.array([
        [0.10, 0.20, 0.30, 0.40, 0.50],  # increasing: full depth at beta 0
        [0.50, 0.40, 0.30, 0.20, 0.10],  # decreasing: earliest exit
        [0.30, 0.60, 0.20, 0.55, 0.59],  # peak at exit 3
    ])
    np.testing.assert_array_equal(targets(q, EXITS, 0.0, 6), [4, 0, 1])
    np.testing.assert_array_equal(target_exits(q, EXITS, 0.0, 6), [6, 2, 3])


def test_ties_go_to_the_smaller_exit():
    # q = [0.5, 0.5, 0.49] at beta 0: exits 2 and 3 tie -> exit 2.
    q = np.array([[0.5, 0.5, 0.49]])
    assert targets(q, [2, 3, 4], 0.0, 4).tolist() == [0]
    # A tie that is not at the first column: exits 3 and 4 tie above exit 2 -> exit 3.
    q = np.array([[0.1, 0.7, 0.7, 0.2]])
    assert target_exits(q, [2, 3, 4, 5], 0.0, 5).tolist() == [3]
    # A tie created by beta, with binary rounding: 0.5 - 2*0.01 == 0.51 - 3*0.01 mathematically.
    q = np.array([[0.5, 0.51, 0.40]])
    assert target_exits(q, [2, 3, 4], 0.01, 4).tolist() == [2]
    # All equal -> the smallest exit.
    assert target_exits(np.full((1, 5), 0.3), EXITS, 0.0, 6).tolist() == [2]


def test_beta_moves_targets_to_shallower_exits():
    q = np.array([[0.40, 0.45, 0.47, 0.48, 0.485]])
    # u(k) = q_k - beta k, computed by hand:
    # beta 0       -> exit 6 (0.485 largest)
    # beta 0.004   -> [0.392, 0.438, 0.454, 0.460, 0.461] -> exit 6
    # beta 0.01    -> [0.380, 0.420, 0.430, 0.430, 0.425] -> tie 4/5 -> exit 4
    # beta 0.05    -> [0.300, 0.300, 0.270, 0.230, 0.185] -> tie 2/3 -> exit 2
    got = [target_exits(q, EXITS, b, 6).item() for b in (0.0, 0.004, 0.01, 0.05)]
    assert got == [6, 6, 4, 2]
    # Larger beta never picks a deeper exit.
    rng = np.random.default_rng(0)
    qs = np.sort(rng.uniform(size=(200, 5)), axis=1)
    prev = target_exits(qs, EXITS, 0.0, 6)
    for b in (0.01, 0.05, 0.1, 0.5, 1.5):  # q in [0, 1): beta > 1 always picks exit 2
        cur = target_exits(qs, EXITS, b, 6)
        assert np.all(cur <= prev)
        prev = cur
    assert np.all(prev == 2)


def test_k_user_restricts_targets():
    q = np.array([[0.1, 0.2, 0.3, 0.4, 0.5],
                  [0.6, 0.1, 0.1, 0.1, 0.9]])
    assert target_exits(q, EXITS, 0.0, 4).tolist() == [4, 2]
    assert targets(q, EXITS, 0.0, 4).tolist() == [2, 0]  # index into [2, 3, 4]
    assert target_exits(q, EXITS, 0.0, 2).tolist() == [2, 2]
    assert target_exits(q, EXITS, 0.0, 5).tolist() == [5, 2]


def test_bad_q_is_reported():
    with pytest.raises(ValueError, match="rows"):
        targets(np.array([[0.1, np.nan, 0.2]]), [2, 3, 4], 0.0, 4)
    with pytest.raises(ValueError, match="shape"):
        targets(np.zeros((2, 4)), EXITS, 0.0, 6)


def test_histograms():
    q = np.array([[0.5, 0.5, 0.4], [0.1, 0.2, 0.3], [0.1, 0.9, 0.3], [0.0, 0.0, 0.0]])
    best = best_exits(q, [2, 3, 4])
    assert best.tolist() == [2, 4, 3, 2]
    assert exit_histogram(best, [2, 3, 4]) == {2: 2, 3: 1, 4: 1}
    assert exit_histogram([0, 0, 2], [2, 3, 4], as_index=True) == {2: 2, 3: 0, 4: 1}
    with pytest.raises(ValueError, match="exit 7"):
        exit_histogram([7], [2, 3, 4])
    text = format_histogram({2: 2, 3: 1, 4: 0}, width=10)
    lines = text.splitlines()
    assert len(lines) == 3
    assert "##########" in lines[0] and "|#####     |" in lines[1] and "|" + " " * 10 + "|" in lines[2]
    assert "( 66.7%)" in lines[0]
