"""The token set's bookkeeping on constructed cases: removal, finalised values, superpatches,
dense reassembly, padded views, per-image means."""
from __future__ import annotations

import pytest
import torch

from eco_m2f.modeling.token_reduction import TokenSet, mean_per_group
from eco_m2f.modeling.token_reduction.packing import PackedLayout, true_indices

GRID = (2, 3)  # 6 cells per image


def _cells(batch: int, dim: int = 4) -> torch.Tensor:
    """(B, 1 + 6, C) tokens whose value names image and cell: 100 * b + cell (cls: -1 - b)."""
    values = torch.arange(6).float().view(1, 6) + 100 * torch.arange(batch).float().view(batch, 1)
    cls = -1.0 - torch.arange(batch).float().view(batch, 1)
    return torch.cat([cls, values], 1).unsqueeze(-1).expand(batch, 7, dim).clone()


def test_true_indices_equals_nonzero():
    mask = torch.rand(50, generator=torch.Generator().manual_seed(0)) > 0.4
    assert torch.equal(true_indices(mask, int(mask.sum())), mask.nonzero().view(-1))


def test_dense_round_trip_and_layout():
    tokens = _cells(3)
    ts = TokenSet.from_dense(tokens, GRID)
    assert ts.layout.lengths == (7, 7, 7) and ts.live_counts == (6, 6, 6)
    assert torch.equal(ts.to_dense(), tokens[:, 1:])
    assert torch.equal(ts.prefix(), tokens[:, :1])
    assert torch.equal(ts.token_area(), torch.ones(18, dtype=torch.long))


def test_keep_by_mask_and_finalised_features_put_back_in_place():
    tokens = _cells(2)
    ts = TokenSet.from_dense(tokens, GRID)
    # image 0 keeps cells 1, 4; image 1 keeps cells 0, 2, 3, 5
    mask = torch.tensor([0, 1, 0, 0, 1, 0, 1, 0, 1, 1, 0, 1], dtype=torch.bool)
    kept = ts.keep(mask, save_features=True)
    assert kept.live_counts == (2, 4) and kept.layout.lengths == (3, 5)
    assert kept.patches()[:, 0].tolist() == [1, 4, 100, 102, 103, 105]
    assert kept.owner.tolist() == [[-1, 0, -1, -1, 1, -1], [2, -1, 3, 4, -1, 5]]
    # blocks change the live tokens; the paused ones keep their features from the removal
    later = kept.with_patches(kept.patches() + 1000)
    dense = later.to_dense()[..., 0]
    assert dense.tolist() == [[0, 1001, 2, 3, 1004, 5], [1100, 101, 1102, 1103, 104, 1105]]
    assert later.final_cells("features").tolist() == (~mask).view(2, 6).tolist()
    # a second removal appends to the store; both generations go back in place
    second = later.keep(torch.tensor([1, 0, 1, 1, 0, 1], dtype=torch.bool), save_features=True)
    assert second.live_counts == (1, 3)
    assert second.to_dense()[..., 0].tolist() == [[0, 1001, 2, 3, 1004, 5], [1100, 101, 1102, 1103, 104, 1105]]
    assert second.to_dense(final=None, fill=-7.0)[..., 0].tolist() == [[-7, 1001, -7, -7, -7, -7], [1100, -7, 1102, -7, -7, 1105]]


def test_keep_topk_is_a_hand_computed_topk_per_image_in_original_order():
    ts = TokenSet.from_dense(_cells(3), GRID)
    scores = torch.tensor([0.1, 0.9, 0.5, 0.3, 0.8, 0.2,  # image 0: top-2 -> cells 1, 4
                           0.7, 0.6, 0.5, 0.4, 0.3, 0.2,  # image 1: top-5 -> cells 0..4
                           0.0, 0.1, 0.2, 0.3, 0.4, 0.5])  # image 2: top-0
    kept = ts.keep_topk(scores, [2, 5, 0])
    assert kept.live_counts == (2, 5, 0)
    assert kept.patches()[:, 0].tolist() == [1, 4, 100, 101, 102, 103, 104]
    lowest = ts.keep_topk(scores, 1, largest=False)
    assert lowest.patches()[:, 0].tolist() == [0, 105, 200]
    with pytest.raises(ValueError, match="0 <= k <= live tokens"):
        ts.keep_topk(scores, [2, 7, 0])


def test_finalised_logits_combine_with_the_last_head():
    """DToP: tokens leave with their auxiliary logits; the final map takes the last head's
    logits where tokens stayed live and the stored ones elsewhere."""
    ts = TokenSet.from_dense(_cells(2), GRID)
    aux = torch.arange(12).float().view(12, 1).expand(12, 3) + 0.5  # (Tp, K=3)
    mask = torch.tensor([1, 1, 0, 1, 0, 1, 0, 0, 0, 1, 1, 1], dtype=torch.bool)
    ts = ts.keep(mask, save_logits=aux)
    last = -torch.ones(ts.layout.num_patches, 3)
    combined = ts.to_dense(last, final="logits")
    expected = torch.where(mask.view(2, 6), -1.0, torch.arange(12).float().view(2, 6) + 0.5)
    assert torch.equal(combined[..., 0], expected)
    # the same with a dense last head over every cell
    assert torch.equal(ts.overlay_final(-torch.ones(2, 6, 3), "logits"), combined)
    assert ts.final_cells("features").sum().item() == 0  # nothing saved as features
    with pytest.raises(ValueError, match="unknown finalised kind 'logit'"):
        ts.to_dense(last, final="logit")
    with pytest.raises(ValueError, match="one row per live patch token"):
        ts.keep(torch.ones(12, dtype=torch.bool))


def test_superpatches_copy_back_to_every_cell_and_pool_their_cells():
    """CTS / dCTS: a token that stands for several cells owns all of them."""
    grid = (2, 4)  # 8 cells: row-major 0..7
    # image 0: one 2x2 superpatch over cells {0, 1, 4, 5} plus 4 single cells; image 1: two 2x2
    group = torch.tensor([[0, 0, 1, 2, 0, 0, 3, 4], [0, 0, 1, 1, 0, 0, 1, 1]])
    counts = [5, 2]
    dense_values = torch.arange(16).float().view(2, 8, 1)
    pooled = mean_per_group(dense_values, group, counts)
    assert pooled[:, 0].tolist() == [(0 + 1 + 4 + 5) / 4, 2, 3, 6, 7, (8 + 9 + 12 + 13) / 4, (10 + 11 + 14 + 15) / 4]
    prefix = torch.full((2, 1, 1), -1.0)
    patches = torch.arange(7).float().view(7, 1) * 10
    ts = TokenSet.from_groups(prefix, patches, group, counts, grid)
    assert ts.layout.lengths == (6, 3)
    assert ts.token_area().tolist() == [4, 1, 1, 1, 1, 4, 4]
    assert torch.equal(ts.pool_cells(dense_values), pooled)
    assert ts.to_dense()[..., 0].tolist() == [[0, 0, 10, 20, 0, 0, 30, 40], [50, 50, 60, 60, 50, 50, 60, 60]]
    # a shared token finalised with its logits: every cell it covers gets them
    gone = ts.keep(torch.tensor([0, 1, 1, 1, 1, 1, 0], dtype=torch.bool), save_logits=patches + 1)
    assert gone.to_dense(torch.zeros(5, 1), final="logits")[..., 0].tolist() == [[1, 1, 0, 0, 1, 1, 0, 0], [0, 0, 61, 61, 0, 0, 61, 61]]
    with pytest.raises(ValueError, match="outside 0..counts"):
        TokenSet.from_groups(prefix, patches, group.clamp(max=4) + torch.tensor([[0], [1]]), counts, grid)
    with pytest.raises(ValueError, match="own no grid cell"):
        TokenSet.from_groups(prefix, torch.zeros(8, 1), group, [6, 2], grid)


def test_padded_view_and_back():
    ts = TokenSet.from_dense(_cells(3), GRID).keep_topk(torch.arange(18).float(), [3, 6, 1])
    padded, mask = ts.padded()
    assert padded.shape == (3, 6, 4) and mask.sum(1).tolist() == [3, 6, 1]
    assert padded[0, :, 0].tolist() == [3, 4, 5, 0, 0, 0]
    assert torch.equal(ts.unpad(padded), ts.patches())
    with_cls, mask = ts.padded(with_prefix=True, fill=9.0)
    assert with_cls[2, :, 0].tolist() == [-3, 205, 9, 9, 9, 9, 9] and mask[2].tolist() == [True, True] + [False] * 5
    assert torch.equal(ts.unpad(with_cls, with_prefix=True), ts.x)


def test_segment_mean_and_merge_into_cls():
    """DoViT Eq. 8: cls <- (cls + mean of the tokens that stop) / 2, per image."""
    ts = TokenSet.from_dense(_cells(2), GRID)
    stop = torch.tensor([1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0], dtype=torch.bool)
    mean, counts = ts.segment_mean(ts.patches(), stop)
    assert counts.tolist() == [2, 0] and mean[:, 0].tolist() == [0.5, 0.0]
    merged = ts.merge_into_prefix(stop)
    assert merged.prefix()[:, 0, 0].tolist() == [(-1 + 0.5) / 2, -2]
    assert torch.equal(merged.patches(), ts.patches())


def test_gradients_reach_finalised_and_live_tokens():
    tokens = _cells(2).requires_grad_()
    ts = TokenSet.from_dense(tokens, GRID).keep(torch.arange(12) % 2 == 0, save_features=True)
    ts = ts.with_patches(ts.patches() * 3)
    ts.to_dense().sum().backward()
    grad = tokens.grad[:, 1:, 0]
    assert grad.tolist() == [[3, 1, 3, 1, 3, 1]] * 2
    assert tokens.grad[:, 0].abs().sum().item() == 0


def test_layout_rejects_lengths_below_the_prefix():
    with pytest.raises(ValueError, match="prefix tokens"):
        PackedLayout([3, 0], num_prefix=1, device=torch.device("cpu"))


def test_removal_from_a_set_without_live_patches_is_a_no_op():
    tokens = _cells(2)
    empty = TokenSet.from_dense(tokens, GRID).keep(torch.zeros(12, dtype=torch.bool), save_features=True)
    assert empty.live_counts == (0, 0)
    for again in (empty.keep(torch.zeros(0, dtype=torch.bool), save_features=True), empty.keep_topk(torch.zeros(0), 0)):
        assert again.live_counts == (0, 0)
        assert torch.equal(again.to_dense(), tokens[:, 1:]) and torch.equal(again.prefix(), tokens[:, :1])
    assert empty.pool_cells(tokens[:, 1:]).shape == (0, 4)


def test_keep_with_counts_the_caller_knows():
    ts = TokenSet.from_dense(_cells(2), GRID)
    mask = torch.tensor([0, 1, 0, 0, 1, 0, 1, 0, 1, 1, 0, 1], dtype=torch.bool)
    assert ts.count_per_image(mask).tolist() == [2, 4]
    known = ts.keep(mask, save_features=True, kept=[2, 4])
    counted = ts.keep(mask, save_features=True)
    assert known.live_counts == counted.live_counts == (2, 4)
    assert torch.equal(known.to_dense(), counted.to_dense()) and torch.equal(known.owner, counted.owner)
    with pytest.raises(ValueError, match="one count per image"):
        ts.keep(mask, kept=[2])


def test_stable_partition_puts_the_selected_first_each_in_order():
    from eco_m2f.modeling.token_reduction.token_set import _stable_partition

    select = torch.rand(40, generator=torch.Generator().manual_seed(1)) > 0.6
    order = _stable_partition(select)
    expected = torch.cat([select.nonzero().view(-1), (~select).nonzero().view(-1)])
    assert torch.equal(order, expected)
    assert torch.equal(_stable_partition(torch.ones(3, dtype=torch.bool)), torch.arange(3))
    assert torch.equal(_stable_partition(torch.zeros(3, dtype=torch.bool)), torch.arange(3))


def test_a_removal_with_counts_on_their_way_equals_one_with_known_counts():
    from eco_m2f.modeling.token_reduction.packing import HostCopy

    ts = TokenSet.from_dense(_cells(3), GRID)
    mask = torch.tensor([1, 0, 0, 1, 1, 0,  0, 0, 0, 0, 0, 0,  1, 1, 1, 1, 1, 0], dtype=torch.bool)
    logits = torch.arange(18).float().view(18, 1) * 10
    pending = HostCopy(ts.count_per_image(mask))
    assert pending.wait() == [3, 0, 5]
    a = ts._keep(mask, pending, True, logits)
    b = ts.keep(mask, save_features=True, save_logits=logits, kept=[3, 0, 5])
    assert a.live_counts == b.live_counts == (3, 0, 5)
    assert torch.equal(a.x, b.x) and torch.equal(a.owner, b.owner)
    for kind in ("features", "logits"):
        assert torch.equal(a.finals[kind].index, b.finals[kind].index)
        assert torch.equal(a.finals[kind].values(), b.finals[kind].values())
    # the removed tokens' logits, in order, with each cell's row
    assert a.finals["logits"].values().view(-1).tolist() == [10, 20, 50, 60, 70, 80, 90, 100, 110, 170]
    assert torch.equal(a.to_dense(logits[mask], final="logits")[..., 0].view(-1), logits.view(-1))


@pytest.mark.gpu
def test_on_the_gpu_a_removal_waits_for_its_counts_and_equals_the_cpu():
    ts = TokenSet.from_dense(_cells(3), GRID)
    mask = torch.tensor([1, 0, 0, 1, 1, 0,  0, 0, 0, 0, 0, 0,  1, 1, 1, 1, 1, 0], dtype=torch.bool)
    cpu = ts.keep(mask, save_features=True)
    gpu = TokenSet.from_dense(_cells(3).cuda(), GRID).keep(mask.cuda(), save_features=True)
    assert gpu.live_counts == cpu.live_counts == (3, 0, 5)
    assert torch.equal(gpu.to_dense().cpu(), cpu.to_dense()) and torch.equal(gpu.owner.cpu(), cpu.owner)

