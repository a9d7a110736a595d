"""PAUMER (papers/000): tau = 0 is the dense Segmenter, paused tokens keep their features, the
kept set is the top-k of the entropies per image, the auxiliary classifiers train, the early
exit uses their predictions, and the cost records are exact."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from test_token_reduction_framework import _fvcore_gflops  # noqa: E402
from token_reducers import K, SETR, TINY, images, tiny_segmenter  # noqa: E402
from eco_m2f.checkpoint import load_weights  # noqa: E402
from eco_m2f.config import setup_cfg  # noqa: E402
from eco_m2f.architectures import build_model  # noqa: E402
from eco_m2f.modeling.token_reduction import ReductionState, TokenSet  # noqa: E402
from eco_m2f.modeling.token_reduction.methods.paumer import kept_counts, token_entropy  # noqa: E402

PAUMER = ["MODEL.TOKEN_REDUCTION.NAME", "PAUMER", "MODEL.TOKEN_REDUCTION.PAUMER.PAUSE_LAYERS", "[1, 2]",
          "MODEL.TOKEN_REDUCTION.PAUMER.PAUSE_RATIOS", "[0.5]"]


def _paumer(*opts: str, ratios: str = "[0.5]"):
    """A tiny PAUMER pausing after layers 1 and 2 of 3, and the dense model with its weights."""
    dense = tiny_segmenter(*[o for o in opts])
    model = tiny_segmenter(*PAUMER, "MODEL.TOKEN_REDUCTION.PAUMER.PAUSE_RATIOS", ratios, *opts, seed=1)
    report = load_weights(model, dense.state_dict(), allow_missing=True)
    assert set(report.missing_keys) == {f"token_reducer.classifiers.layer{v}.{p}" for v in (1, 2) for p in ("weight", "bias")}
    return dense, model


def _batch(n: int = 2, size: int = 64):
    g = torch.Generator().manual_seed(11)
    return [{"image": torch.randint(0, 256, (3, size, size), generator=g, dtype=torch.uint8), "height": size, "width": size,
             "sem_seg": torch.randint(0, K, (size, size), generator=g)} for _ in range(n)]


def test_layers_are_numbered_as_in_the_paper():
    model = tiny_segmenter(*PAUMER)
    assert model.token_reducer.pause_layers == (1, 2) and model.token_reducer.decision_layers == (0, 1)
    assert model.token_reducer.pause_ratios == (0.5, 0.5)
    for bad in ("[0, 2]", "[2, 1]", "[3]"):
        with pytest.raises(ValueError, match="PAUSE_LAYERS"):
            tiny_segmenter(*PAUMER[:2], "MODEL.TOKEN_REDUCTION.PAUMER.PAUSE_LAYERS", bad)
    with pytest.raises(ValueError, match="PAUSE_RATIOS"):
        tiny_segmenter(*PAUMER, "MODEL.TOKEN_REDUCTION.PAUMER.PAUSE_RATIOS", "[0.2, 0.3, 0.4]")
    assert kept_counts([16, 10, 7], 0.4) == [10, 6, 5]  # N - int(tau * N)


@pytest.mark.parametrize("opts", [[], SETR])
def test_tau_zero_equals_the_dense_segmenter(opts):
    dense, model = _paumer(*opts, ratios="[0.0]")
    x = images((64, 48), (64, 48), seed=2)
    with torch.no_grad():
        assert (model.network(x) - dense.network(x)).abs().max().item() <= 1e-6
        _, reduced = model.reduced_network(x)
    assert reduced.tokens.history == ((13, 13),) * 3 and reduced.state.flops.get("token_reducer") is None
    with torch.no_grad():
        for a, b in zip(dense(_batch()), model(_batch())):
            assert (a["sem_seg"] - b["sem_seg"]).abs().max().item() <= 1e-6
            assert b["cost"]["paused"] == [0, 0] and b["cost"]["gflops_token_reducer"] == 0
    # training with tau = 0: the dense losses, plus the classifiers' own
    dense.train(), model.train()
    torch.manual_seed(0)
    la = dense(_batch())
    torch.manual_seed(0)
    lb = tiny_segmenter(*PAUMER, "MODEL.TOKEN_REDUCTION.PAUMER.TRAIN_RATIO_RANGE", "[0.0, 0.0]", *opts, seed=1)
    lb.load_state_dict(model.state_dict())
    lb = lb.train()(_batch())
    assert set(lb) == set(la) | {"loss_paumer_aux1", "loss_paumer_aux2"}
    assert all(torch.allclose(la[k], lb[k], atol=1e-5) for k in la)


def test_paused_tokens_final_features_equal_their_features_at_the_pause_layer():
    """OUT_INDICES keeps the dense map after blocks 0, 1 and 2: live features plus those paused."""
    _, model = _paumer("MODEL.VIT.OUT_INDICES", "[0, 1, 2]")
    x = images((64, 64), (64, 64), seed=3)
    with torch.no_grad():
        _, reduced = model.reduced_network(x, record_maps=True)
        layers = reduced.features.layers
        dense_block0 = model.backbone.blocks[0](model.backbone.prepare_tokens(x)[0])[:, 1:]
    paused_at = reduced.state.token_maps["blocks"]  # B x G: 1 or 2 = paused after that layer, 3 = never
    assert [(paused_at[b] == v).sum().item() for b in range(2) for v in (1, 2, 3)] == [8, 4, 4] * 2
    final = layers[2]  # the assembled map before the final norm
    for layer in (1, 2):
        cells = paused_at == layer
        assert torch.equal(final[cells], layers[layer - 1][cells])
    first = paused_at == 1
    assert (final[first] - dense_block0[first]).abs().max().item() <= 1e-6  # no pause before the first layer
    assert torch.allclose(reduced.features.tokens, model.backbone.norm(torch.cat([reduced.tokens.prefix(), final], 1))[:, 1:])


def test_kept_tokens_are_the_top_k_entropies_of_each_image_in_a_ragged_batch():
    """Constructed logits (the classifier reads the first K feature channels) in a batch whose
    images hold 12, 7 and 3 live tokens: each keeps its N - int(tau N) most uncertain."""
    model = tiny_segmenter(*PAUMER)
    reducer = model.token_reducer
    with torch.no_grad():
        w = reducer.classifiers["layer2"].weight
        w.zero_()
        w[:, :K] = torch.eye(K)
        reducer.classifiers["layer2"].bias.zero_()
    g = torch.Generator().manual_seed(4)
    dense = torch.randn(3, 1 + 16, 32, generator=g) * 3
    mask = torch.zeros(3, 16, dtype=torch.bool)
    mask[0, :12], mask[1, 3:10], mask[2, [1, 5, 14]] = True, True, True
    tokens = TokenSet.from_dense(dense, (4, 4)).keep(mask.view(-1))
    state = ReductionState(images=torch.zeros(3, 3, 64, 64), grid=(4, 4))
    state.cost = [{"paused": [0, 0]} for _ in range(3)]
    out = reducer.reduce(1, tokens, state)
    entropy = token_entropy(dense[:, 1:, :K])  # 3 x 16 by hand, one per cell
    for b, (cells, n) in enumerate(zip(mask, (12, 7, 3))):
        live = torch.nonzero(cells).view(-1)
        k = n - int(0.5 * n)
        expected = set(live[entropy[b, live].argsort(descending=True)[:k]].tolist())
        assert set(torch.nonzero(out.live_cells()[b]).view(-1).tolist()) == expected
        assert state.cost[b]["paused"] == [0, n - k]
    assert out.live_counts == (6, 4, 2)
    assert torch.equal(out.to_dense()[mask], dense[:, 1:][mask])  # paused and kept features in place


def test_gradients_reach_the_auxiliary_classifiers_and_the_encoder():
    _, model = _paumer()
    model.train()
    losses = model(_batch())
    assert {"loss_ce", "loss_paumer_aux1", "loss_paumer_aux2"} == set(losses)
    assert all(0.0 < v.item() < 10 for v in losses.values())
    sum(losses.values()).backward()
    for name in ("layer1", "layer2"):
        assert model.token_reducer.classifiers[name].weight.grad.abs().sum() > 0
    assert model.backbone.blocks[2].mlp.fc1.weight.grad.abs().sum() > 0


def test_training_draws_tau_per_layer_and_step():
    _, model = _paumer()
    model.train()
    seen = set()
    for step in range(4):
        with torch.no_grad():
            state = model._reduction.encode(images((64, 64), seed=step), targets=torch.zeros(1, 64, 64, dtype=torch.long)).state
        seen.add(tuple(state.cost[0]["paused"]))
    # tau ~ U(0.2, 0.8): between int(0.2 * 16) = 3 and 12 of 16 pause at layer 1
    assert len(seen) > 1 and all(3 <= p[0] <= 12 for p in seen)


@pytest.mark.parametrize("opts", [[], SETR])
def test_early_exit_paused_tokens_take_the_auxiliary_prediction(opts):
    _, model = _paumer("MODEL.TOKEN_REDUCTION.PAUMER.EARLY_EXIT", "True", *opts)
    assert model.token_reducer.output_kind == ("dense" if opts else "tokens")
    x = images((64, 64), seed=5)
    with torch.no_grad():
        _, reduced = model.reduced_network(x, record_maps=True)
        outputs = model.head_outputs(model.sem_seg_head, reduced.features, reduced)
        dense_block0 = model.backbone.blocks[0](model.backbone.prepare_tokens(x)[0])[:, 1:]
        aux = model.token_reducer.classifiers["layer1"](dense_block0)[0]  # G x K, the first classifier
    first = reduced.state.token_maps["blocks"][0] == 1
    if "pred_tokens" in outputs:
        got = outputs["pred_tokens"][0][first]
    else:  # SETR: each cell an s x s block of the class map
        maps = outputs["pred_maps"][0]
        s = maps.shape[-1] // 4
        got = maps[:, ::s, ::s].reshape(K, 16).t()[first]
    assert (got - aux[first]).abs().max().item() <= 1e-5


@pytest.mark.parametrize("opts", [[], ["MODEL.TOKEN_REDUCTION.PAUMER.EARLY_EXIT", "True"], SETR])
def test_cost_records_equal_fvcore(opts):
    _, model = _paumer(*opts)
    x = images((64, 80), (64, 80), seed=6)
    with torch.no_grad():
        records = model.cost_records(model.reduced_network(x)[1], (64, 80))
    for b, record in enumerate(records):
        assert record["tokens"] == [20, 10, 5] and record["paused"] == [10, 5]
        assert record["token_fraction"] == pytest.approx(35 / 60)
        assert record["gflops"] == pytest.approx(_fvcore_gflops(model, x[b : b + 1]), rel=1e-9)
    assert not model.dynamic_cost  # top-k: one count per input size


def test_setr_pup_base_trains_and_evaluates():
    model = build_model(setup_cfg(None, TINY + SETR + PAUMER + ["MODEL.VIT.OUT_INDICES", "[0, 2]",
                                                                 "MODEL.SEM_SEG_HEAD.AUX_LAYERS", "[0]"]))
    losses = model.train()(_batch())
    assert {"loss_ce", "loss_ce_aux0", "loss_paumer_aux1", "loss_paumer_aux2"} == set(losses)
    out = model.eval()(_batch(1))[0]
    assert out["sem_seg"].shape == (K, 64, 64) and out["cost"]["tokens"] == [16, 8, 4]
