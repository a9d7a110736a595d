"""The token-reduction framework of the Segmenter: the dense model untouched without a method, a
method that removes nothing equal to the dense model, per-image cost records equal to fvcore,
extra losses, token maps, copied-back outputs and overlaid logits, and clear errors."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

from token_reducers import LINEAR, SETR, TINY, images, per_image_counts, tiny_segmenter  # noqa: E402
from token_reducers import fvcore_gflops as _fvcore_gflops  # noqa: E402
from eco_m2f.config import setup_cfg  # noqa: E402
from eco_m2f.architectures import build_model  # noqa: E402
from eco_m2f.modeling.token_reduction import TokenSet  # noqa: E402
from eco_m2f.modeling.token_reduction.cost import merge_cost_records  # noqa: E402
from eco_m2f.modeling.token_reduction.token_targets import cell_class_counts, live_token_cross_entropy  # noqa: E402

pytest.importorskip("fvcore.nn")  # the cost records are checked against its counts


def _pair(name: str, *opts: str):
    """The dense tiny Segmenter and the same weights under reducer ``name``."""
    dense = tiny_segmenter(*opts)
    reduced = tiny_segmenter("MODEL.TOKEN_REDUCTION.NAME", name, *opts)
    report = reduced.load_state_dict(dense.state_dict(), strict=False)
    assert not report.unexpected_keys and all(k.startswith("token_reducer.") for k in report.missing_keys)
    return dense, reduced


def _inputs(n: int, h: int = 64, w: int = 64):
    g = torch.Generator().manual_seed(n)
    return [{"image": torch.randint(0, 256, (3, h, w), generator=g, dtype=torch.uint8), "height": h, "width": w}
            for _ in range(n)]


def test_without_a_method_the_segmenter_is_the_dense_model():
    model = tiny_segmenter()
    assert model.token_reducer is None and not model.dynamic_cost
    assert not any(k.startswith("token_reducer") for k in model.state_dict())
    x = images((64, 64), (64, 64))
    with torch.no_grad():
        features = model.backbone(x)
        expected = model.sem_seg_head.semantic_logits(model.sem_seg_head(features.tokens), features.grid, (64, 64))
        assert torch.equal(model.network(x), expected)
        out = model(_inputs(2))
    assert all(set(o) == {"sem_seg", "cost"} for o in out)


@pytest.mark.parametrize("opts", [[], LINEAR, SETR])
def test_the_dense_segmenter_records_its_cost_exactly(opts):
    model = tiny_segmenter(*opts)
    with torch.no_grad():
        record = model(_inputs(1, 48, 80))[0]["cost"]
    assert record["tokens"] == [15, 15, 15] and record["cells"] == 15 and record["token_fraction"] == 1.0
    x = (_inputs(1, 48, 80)[0]["image"][None].float() - 127.5) / 127.5
    assert record["gflops"] == pytest.approx(_fvcore_gflops(model, x), rel=1e-9)
    assert record["gflops_token_reducer"] == 0


def test_a_head_without_a_flop_count_leaves_the_dense_gflops_to_a_counter(monkeypatch):
    model = tiny_segmenter(*LINEAR)

    def uncounted(*args):
        raise NotImplementedError("no FLOP count")

    monkeypatch.setattr(model.sem_seg_head, "flops", uncounted)
    with torch.no_grad():
        record = model(_inputs(1))[0]["cost"]
    assert record["tokens"] == [16, 16, 16] and not any(k.startswith("gflops") for k in record)


def test_the_atm_head_counts_its_flops_as_fvcore():
    """ATM: its decoder on the tokens, the mask upsampling and the class x mask product; the
    final norm, which nothing reads, is not charged."""
    model = tiny_segmenter("MODEL.SEM_SEG_HEAD.NAME", "ATMHead", "MODEL.SEM_SEG_HEAD.ATM.HIDDEN_DIM", "16",
                           "MODEL.SEM_SEG_HEAD.ATM.NUM_HEADS", "2", "MODEL.SEM_SEG_HEAD.ATM.NUM_LAYERS", "2",
                           "MODEL.VIT.OUT_INDICES", "[0, 2]")
    with torch.no_grad():
        record = model(_inputs(1, 48, 80))[0]["cost"]
    x = (_inputs(1, 48, 80)[0]["image"][None].float() - 127.5) / 127.5
    assert record["gflops"] == pytest.approx(_fvcore_gflops(model, x), abs=1e-7)  # fvcore's einsum count is rounded


@pytest.mark.parametrize("name,opts", [
    ("KeepAllForTests", []), ("KeepAllForTests", SETR), ("KeepAllTokensKindForTests", []),
    ("KeepAllTokensKindForTests", LINEAR),
])
def test_a_method_that_removes_nothing_equals_the_dense_segmenter(name, opts):
    dense, reduced = _pair(name, *opts)
    x = images((48, 64), (48, 64), (48, 64))  # another grid than the stored 4 x 4: the position embedding is resized
    with torch.no_grad():
        assert (reduced.network(x) - dense.network(x)).abs().max().item() <= 1e-5
        outs_dense, outs = dense(_inputs(2)), reduced(_inputs(2))
    for a, b in zip(outs_dense, outs):
        assert (a["sem_seg"] - b["sem_seg"]).abs().max().item() <= 1e-6
        assert b["cost"]["tokens"] == [16, 16, 16] and b["cost"]["token_fraction"] == 1.0
    dense.train(), reduced.train()
    batch = [dict(x, sem_seg=torch.randint(0, 4, (64, 64), generator=torch.Generator().manual_seed(i)))
             for i, x in enumerate(_inputs(2))]
    la, lb = dense(batch), reduced(batch)
    assert set(la) == set(lb) and all(torch.allclose(la[k], lb[k], atol=1e-5) for k in la)


@pytest.mark.parametrize("name,opts,size", [
    ("ThresholdForTests", [], (64, 64)),
    ("ThresholdForTests", LINEAR, (48, 80)),
    ("ThresholdForTests", SETR, (64, 48)),
    ("ThresholdLogitsForTests", [], (64, 64)),
    ("ThresholdLogitsForTests", LINEAR, (80, 48)),
    ("ThresholdDenseLogitsForTests", SETR, (64, 64)),
])
def test_cost_records_of_a_batch_equal_fvcore_on_each_image_alone(name, opts, size):
    """Images of one batch keep different numbers of tokens; each one's record from the batch
    pass equals fvcore's count of the network on that image alone (and its token counts)."""
    model = tiny_segmenter("MODEL.TOKEN_REDUCTION.NAME", name, *opts)
    with torch.no_grad():
        model.token_reducer.scorer.bias.fill_(0.05)
    batch = images(*[size] * 3, seed=3)
    with torch.no_grad():
        _, reduced = model.reduced_network(batch)
        records = model.cost_records(reduced, size)
    counts = per_image_counts(model, batch)
    cells = (size[0] // 16) * (size[1] // 16)
    assert len(set(counts)) > 1 and all(0 < n < cells for n in counts), counts  # a ragged batch
    for b, record in enumerate(records):
        assert record["tokens"] == [cells, counts[b], counts[b]] and record["final_tokens"] == counts[b]
        assert record["scored"] == cells
        fv = _fvcore_gflops(model, batch[b : b + 1])
        assert record["gflops"] == pytest.approx(fv, rel=1e-9, abs=1e-12), (b, record["gflops"], fv)
        parts = record["gflops_backbone"] + record["gflops_decode_head"] + record["gflops_token_reducer"]
        assert parts == pytest.approx(record["gflops"], rel=1e-12)
        assert record["gflops_token_reducer"] > 0


def test_copied_back_outputs_and_overlaid_logits():
    """Live tokens' head outputs land on their cells; removed cells show their saved logits."""
    model = tiny_segmenter("MODEL.TOKEN_REDUCTION.NAME", "ThresholdLogitsForTests", *LINEAR)
    batch = images((64, 64), (64, 64), seed=5)
    with torch.no_grad():
        logits, reduced = model.reduced_network(batch)
        tokens = reduced.tokens
        live = model.sem_seg_head(reduced.features.tokens)["pred_tokens"]  # B x L_max x K on the live tokens
        # the same classifier on the features right after block 0 gives the saved logits
        x, grid = model.backbone.prepare_tokens(batch)
        early = model.backbone.blocks[0](x)[:, 1:]
        saved = model.token_reducer.classifier(early)  # B x G x K
    expected = torch.where(tokens.live_cells().unsqueeze(-1), tokens.to_dense(tokens.unpad(live), final=None), saved)
    maps = expected.transpose(1, 2).reshape(2, -1, *grid)
    expected = nn.functional.interpolate(maps, size=(64, 64), mode="bilinear", align_corners=False)
    assert (logits - expected).abs().max().item() <= 1e-5


def test_grid_heads_get_the_paused_cells_logits_in_whole_blocks():
    model = tiny_segmenter("MODEL.TOKEN_REDUCTION.NAME", "ThresholdDenseLogitsForTests", *SETR)
    batch = images((64, 64), seed=6)
    with torch.no_grad():
        _, reduced = model.reduced_network(batch)
        outputs = model.head_outputs(model.sem_seg_head, reduced.features, reduced)
        raw = model.sem_seg_head(model.backbone.norm(torch.cat(
            [reduced.tokens.prefix(), reduced.tokens.to_dense()], 1))[:, 1:].transpose(1, 2).reshape(1, 32, 4, 4))
    final = ~reduced.tokens.live_cells()[0].view(4, 4)
    assert final.any() and not final.all()
    maps = outputs["pred_maps"][0]  # K x 16 x 16: each cell a 4 x 4 block
    for i, j in zip(*torch.nonzero(final, as_tuple=True)):
        block = maps[:, 4 * i : 4 * i + 4, 4 * j : 4 * j + 4]
        assert torch.equal(block, block[:, :1, :1].expand_as(block))  # one saved logit vector per cell
    assert torch.allclose(maps[:, ~final.repeat_interleave(4, 0).repeat_interleave(4, 1)],
                          raw["pred_maps"][0][:, ~final.repeat_interleave(4, 0).repeat_interleave(4, 1)])


def test_sliding_windows_and_flips_sum_the_records_of_their_passes():
    opts = ["MODEL.TOKEN_REDUCTION.NAME", "ThresholdForTests", "TEST.SLIDE.ENABLED", "True",
            "TEST.SLIDE.CROP_SIZE", "[64, 64]", "TEST.SLIDE.STRIDE", "[32, 32]"]
    model = tiny_segmenter(*opts)
    x = _inputs(1, 64, 96)[0]
    with torch.no_grad():
        out = model([x])[0]
        image = (x["image"].float() - model.pixel_mean) / model.pixel_std
        windows = [image[None, :, :, 0:64], image[None, :, :, 32:96]]
        passes = [model.cost_records(model.reduced_network(w)[1], (64, 64))[0] for w in windows]
    record = out["cost"]
    assert record["tokens"] == [a + b for a, b in zip(passes[0]["tokens"], passes[1]["tokens"])]
    assert record["gflops"] == pytest.approx(passes[0]["gflops"] + passes[1]["gflops"])
    assert record["cells"] == 32 and record["token_fraction"] == pytest.approx(sum(record["tokens"]) / (3 * 32))
    assert merge_cost_records(passes) == record


def test_losses_of_the_method_join_the_loss_dict_and_reach_its_parameters():
    model = tiny_segmenter("MODEL.TOKEN_REDUCTION.NAME", "ThresholdForTests").train()
    batch = [dict(x, sem_seg=torch.zeros(64, 64, dtype=torch.long)) for x in _inputs(2)]
    losses = model(batch)
    assert set(losses) == {"loss_ce", "loss_test_scorer"}
    sum(losses.values()).backward()
    assert model.token_reducer.scorer.weight.grad.abs().sum() > 0


def test_token_maps_say_after_which_block_each_token_left():
    model = tiny_segmenter("MODEL.TOKEN_REDUCTION.NAME", "ThresholdForTests")
    batch = images((48, 64), (48, 64), seed=7)
    maps = model.token_maps(batch)
    with torch.no_grad():
        live = model.reduced_network(batch)[1].tokens.live_cells()
    for b, per_image in enumerate(maps):
        blocks = per_image["blocks"]
        assert blocks.values.shape == (3, 4)
        assert torch.equal(blocks.values.view(-1), torch.where(live[b], 3, 1))
        assert blocks.labels[1] == "left after block 1" and blocks.labels[3] == "all 3 blocks"


def test_token_targets_weigh_each_live_token_by_its_pixels():
    targets = torch.tensor([[[0, 0, 1, 1], [0, 255, 1, 1], [2, 2, 3, 3], [2, 2, 3, 0]]])  # 1 x 4 x 4, patch 2
    counts = cell_class_counts(targets, (2, 2), 2, 4, 255)
    assert counts[0].tolist() == [[3, 0, 0, 0], [0, 4, 0, 0], [0, 0, 4, 0], [1, 0, 0, 3]]
    ts = TokenSet.from_dense(torch.zeros(1, 5, 2), (2, 2)).keep(torch.tensor([True, False, True, True]))
    logits = torch.randn(3, 4)
    log_p = logits.log_softmax(-1)
    expected = -(3 * log_p[0, 0] + 4 * log_p[1, 2] + log_p[2, 0] + 3 * log_p[2, 3]) / 11
    assert torch.allclose(live_token_cross_entropy(logits, ts, counts), expected)


def test_bad_settings_fail_by_name():
    with pytest.raises(KeyError, match="MODEL.TOKEN_REDUCTION.NAME 'NoSuchMethod' is not a registered"):
        build_model(setup_cfg(None, TINY + ["MODEL.TOKEN_REDUCTION.NAME", "NoSuchMethod"]))
    with pytest.raises(ValueError, match="needs the dense grid"):
        build_model(setup_cfg(None, TINY + SETR + ["MODEL.TOKEN_REDUCTION.NAME", "KeepAllTokensKindForTests"]))
    with pytest.raises(ValueError, match="MODEL.TOKEN_REDUCTION.ATTENTION 'fast'"):
        build_model(setup_cfg(None, TINY + ["MODEL.TOKEN_REDUCTION.NAME", "KeepAllForTests",
                                            "MODEL.TOKEN_REDUCTION.ATTENTION", "fast"]))
