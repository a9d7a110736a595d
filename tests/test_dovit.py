"""DoViT in the Segmenter: xi = 1.0 is the dense model, the stop rule on constructed logits in a
ragged batch, stopped stays stopped, stopped features pass through unchanged, the class-token
merge (Eq. 8), what the auxiliary heads see, exact cost records, the losses (auxiliary heads,
distillation from a frozen teacher) and their gradients, the threshold ramp, clear errors."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

from token_reducers import LINEAR, SETR, images, tiny_segmenter  # noqa: E402
from eco_m2f.evaluation.flops import count_flops  # noqa: E402
from eco_m2f.modeling.token_reduction import TokenSet  # noqa: E402
from eco_m2f.modeling.token_reduction.distillation import pixel_kl  # noqa: E402
from eco_m2f.modeling.token_reduction.dovit_rules import confidence  # noqa: E402
from eco_m2f.modeling.token_reduction.plugin import ReductionState  # noqa: E402

DOVIT = ["MODEL.TOKEN_REDUCTION.NAME", "DoViT", "MODEL.TOKEN_REDUCTION.DOVIT.DECISION_LAYERS", "[1, 2]",
         "MODEL.TOKEN_REDUCTION.DOVIT.AUX_HIDDEN", "8", "MODEL.TOKEN_REDUCTION.DOVIT.DISTILL_WEIGHT", "0.0"]
SETR_NAIVE = ["MODEL.SEM_SEG_HEAD.NAME", "SETRNaiveHead", "MODEL.SEM_SEG_HEAD.SETR.CHANNELS", "8"]


def _dovit(threshold: float, *opts: str, seed: int = 0):
    return tiny_segmenter(*DOVIT, "MODEL.TOKEN_REDUCTION.DOVIT.THRESHOLD", str(threshold), *opts, seed=seed)


def _pair(threshold: float, *opts: str):
    """The dense tiny Segmenter and DoViT with the same weights (its auxiliary heads new)."""
    dense = tiny_segmenter(*opts)
    model = _dovit(threshold, *opts)
    report = model.load_state_dict(dense.state_dict(), strict=False)
    assert not report.unexpected_keys and all(k.startswith("token_reducer.aux_heads.") for k in report.missing_keys)
    return dense, model


def _batch(n: int, size=(64, 64), seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return [{"image": torch.randint(0, 256, (3, *size), generator=g, dtype=torch.uint8), "height": size[0],
             "width": size[1], "sem_seg": torch.randint(0, 4, size, generator=g)} for _ in range(n)]


def _first_confidences(model, x: torch.Tensor) -> torch.Tensor:
    """B x G confidences of the first auxiliary head on block 0's output (nothing stopped yet)."""
    with torch.no_grad():
        tokens, _ = model.backbone.prepare_tokens(x)
        after = model.backbone.blocks[0](tokens)[:, 1:]  # B x G x C
        b, g, c = after.shape
        return confidence(model.token_reducer.aux_heads[0](after.reshape(b * g, c))).view(b, g)


# ---------------------------------------------------------------------- the dense model
@pytest.mark.parametrize("opts", [[], LINEAR, SETR, SETR_NAIVE])
def test_xi_one_is_the_dense_segmenter(opts):
    dense, model = _pair(1.0, *opts)
    x = images((48, 64), (48, 64), seed=1)
    with torch.no_grad():
        saturate = model.token_reducer.aux_heads[0].cls
        saturate.weight.zero_(), saturate.bias.copy_(torch.tensor([60.0, 0.0, 0.0, 0.0]))  # confidence exactly 1.0
        assert torch.equal(dense.network(x), model.network(x))
        for a, b in zip(dense(_batch(2)), model(_batch(2))):
            assert torch.equal(a["sem_seg"], b["sem_seg"])
            assert b["cost"]["stopped"] == [0, 0] and b["cost"]["token_fraction"] == 1.0
            # nothing can stop, so no auxiliary head runs: the dense model's cost
            assert b["cost"]["gflops_token_reducer"] == 0 and b["cost"]["gflops"] == a["cost"]["gflops"]
    dense.train(), model.train()
    torch.manual_seed(0)
    expected = dense(_batch(2))
    torch.manual_seed(0)
    losses = model(_batch(2))
    assert set(losses) == set(expected) | {"loss_dovit_aux1", "loss_dovit_aux2"}
    assert all(torch.equal(expected[k], losses[k]) for k in expected)


# ---------------------------------------------------------------------- the rules on constructed logits
class _TableHead(nn.Module):
    """Auxiliary head stub: the logits of row ``table[cell]``, the cell read from channel 0."""

    def __init__(self, table: torch.Tensor) -> None:
        super().__init__()
        self.table = table
        self.rows_seen = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.rows_seen.append(x.shape[0])
        return self.table[x[:, 0].round().long()]

    def flops_per_token(self) -> int:
        return 7


def _logits(confidences) -> torch.Tensor:
    """One row of 4-class logits per value, whose max softmax probability is that value."""
    q = torch.tensor(confidences, dtype=torch.float64)
    rest = ((1 - q) / 3).log()
    return torch.stack([q.log(), rest, rest, rest], 1).float()


def test_stop_rule_stopped_stays_stopped_and_the_merge_on_a_ragged_batch():
    model = _dovit(0.9)
    reducer = model.token_reducer.eval()
    # 2 images x 6 cells; channel 0 names the cell (0..11 over the batch), the class token -1
    torch.manual_seed(0)
    tokens = torch.randn(2, 7, 32)
    tokens[:, 1:, 0] = torch.arange(12, dtype=torch.float32).view(2, 6)
    tokens[:, 0, 0] = -1.0
    ts = TokenSet.from_dense(tokens, (2, 3))
    q1 = [0.95, 0.5, 0.91, 0.2, 0.3, 0.4,   0.99, 0.97, 0.93, 0.92, 0.1, 0.89]  # image 0 stops 2, image 1 stops 4
    q2 = [0.5, 0.99, 0.2, 0.95, 0.2, 0.2,   0.1, 0.1, 0.1, 0.1, 0.1, 0.99]  # cell 0, 2 of image 0 were stopped already
    reducer.aux_heads[0], reducer.aux_heads[1] = _TableHead(_logits(q1)), _TableHead(_logits(q2))
    state = ReductionState(images=torch.zeros(2, 3, 32, 48), grid=(2, 3))
    state.cost = [{"stopped": [0, 0]}, {"stopped": [0, 0]}]  # as DoViT.embed leaves them
    after1 = reducer.reduce(0, ts, state)
    stop1 = torch.tensor(q1).view(2, 6) > 0.9
    assert torch.equal(after1.live_cells(), ~stop1) and after1.live_counts == (4, 2)
    cls = tokens[:, 0].clone()
    cls[0] = 0.5 * (cls[0] + tokens[0, 1:][stop1[0]].mean(0))
    cls[1] = 0.5 * (cls[1] + tokens[1, 1:][stop1[1]].mean(0))
    assert torch.allclose(after1.prefix()[:, 0], cls, atol=1e-6)  # Eq. 8 by hand
    # blocks change the live tokens (cell ids kept); the stopped ones keep what they had
    moved = after1.with_patches(after1.patches() + torch.cat([torch.zeros(6, 1), torch.ones(6, 31)], 1))
    after2 = reducer.reduce(1, moved, state)
    assert reducer.aux_heads[1].rows_seen == [6]  # the second head saw the 6 live tokens only
    stop2 = (torch.tensor(q2).view(2, 6) > 0.9) & ~stop1
    assert torch.equal(after2.live_cells(), ~stop1 & ~stop2) and after2.live_counts == (2, 1)
    assert not (after2.live_cells() & stop1).any()  # stopped stays stopped: cell 0 of image 0 (q2 = 0.5) too
    dense = after2.to_dense()
    assert torch.equal(dense[stop1], tokens[:, 1:][stop1])  # features of the first stop, unchanged
    assert torch.equal(dense[stop2], (tokens[:, 1:] + torch.cat([torch.zeros(1), torch.ones(31)]))[stop2])
    every = stop1 | stop2
    moved_cls = moved.prefix()[:, 0]
    later = tokens[:, 1:] + torch.cat([torch.zeros(1), torch.ones(31)])
    stopped_values = torch.where(stop1.unsqueeze(-1), tokens[:, 1:], later)
    expected = torch.stack([0.5 * (moved_cls[b] + stopped_values[b][every[b]].mean(0)) for b in range(2)])
    assert torch.allclose(after2.prefix()[:, 0], expected, atol=1e-6)  # Eq. 8 over all stopped so far
    assert [r["stopped"] for r in state.cost] == [[2, 2], [4, 1]]
    assert state.flops["token_reducer"] == [7 * (6 + 4), 7 * (6 + 2)]
    reducer.merge = False  # MODEL.TOKEN_REDUCTION.DOVIT.MERGE False: the class token is left alone
    state.scratch.clear()
    assert torch.equal(reducer.reduce(0, ts, state).prefix(), ts.prefix())


# ---------------------------------------------------------------------- through the Segmenter
def _ragged_threshold(model, x: torch.Tensor) -> float:
    """A xi that stops some of the first head's tokens, a different number in each image."""
    q = _first_confidences(model, x)
    for quantile in (0.5, 0.4, 0.6, 0.3, 0.7):
        xi = float(q.flatten().quantile(quantile))
        counts = (q > xi).sum(1).tolist()
        if len(set(counts)) > 1 and all(0 < n < q.shape[1] for n in counts):
            return xi
    raise AssertionError(f"no quantile of the confidences stops a different number of tokens per image: {q}")


@pytest.mark.parametrize("opts", [[], SETR])
def test_stopped_tokens_reach_the_decoder_with_their_stop_layer_features_and_costs_are_exact(opts):
    model = _dovit(0.5, *opts)
    x = images((64, 64), (64, 64), (64, 64), seed=2)
    xi = _ragged_threshold(model, x)
    model.token_reducer.threshold = xi
    with torch.no_grad():
        _, reduced = model.reduced_network(x)
        tokens, _ = model.backbone.prepare_tokens(x)
        after0 = model.backbone.blocks[0](tokens)[:, 1:]
    first = _first_confidences(model, x) > xi  # B x G: the tokens that stop after layer 1
    final = reduced.features.tokens  # B x G x C, after the final norm
    assert torch.allclose(final[first], model.backbone.norm(after0[first]), atol=1e-6)
    assert not (reduced.tokens.live_cells() & first).any()
    maps = model.token_maps(x)
    for b in range(3):
        assert torch.equal(maps[b]["blocks"].values.view(-1)[first[b]], torch.ones(int(first[b].sum()), dtype=torch.long))
        assert maps[b]["blocks"].labels[1] == "stopped after layer 1"
    with torch.no_grad():
        records = model.cost_records(reduced, (64, 64))
    for b, record in enumerate(records):
        assert record["stopped"][0] == int(first[b].sum())
        live = 16 - sum(record["stopped"])
        assert record["tokens"] == [16, 16 - record["stopped"][0], live]
        # fvcore on the image alone; its trace drops a head whose logits only decide that nothing
        # stops (they feed no tensor then), so the heads are checked by hand below
        fv = count_flops(model, x[b : b + 1])
        assert record["gflops"] - record["gflops_token_reducer"] == pytest.approx(fv["total"] - fv["token_reducer"], rel=1e-9)
        heads = model.token_reducer.aux_heads  # the second runs on the tokens that block 1 saw
        aux = heads[0].flops_per_token() * 16 + heads[1].flops_per_token() * record["tokens"][1]
        assert record["gflops_token_reducer"] == pytest.approx(aux / 1e9, rel=1e-12)


@pytest.mark.parametrize("aux_tokens", ["all", "live"])
def test_training_losses_reach_the_auxiliary_heads_which_see_what_the_paper_says(aux_tokens):
    model = _dovit(0.5, "MODEL.TOKEN_REDUCTION.DOVIT.AUX_LOSS_TOKENS", aux_tokens)
    batch = _batch(3, seed=4)
    x = torch.stack([(b["image"].float() - 127.5) / 127.5 for b in batch])
    model.token_reducer.threshold = _ragged_threshold(model, x)
    model.train()
    model.on_train_iteration(0, 10)
    seen, stopped = [], []
    heads = model.token_reducer.aux_heads
    heads[0].register_forward_hook(lambda m, args, out: stopped.append(int((confidence(out) > model.token_reducer.threshold).sum())))
    heads[1].register_forward_hook(lambda m, args, out: seen.append(args[0].shape[0]))
    losses = model(batch)
    assert set(losses) == {"loss_ce", "loss_dovit_aux1", "loss_dovit_aux2"}
    assert 0 < stopped[0] < 3 * 16
    # "all": the reconstructed map, stopped tokens included; "live": the live tokens only
    assert seen == ([3 * 16] if aux_tokens == "all" else [3 * 16 - stopped[0]])
    sum(losses.values()).backward()
    for head in model.token_reducer.aux_heads:
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in head.parameters())


def test_distillation_from_a_frozen_teacher_built_from_its_weights(tmp_path):
    dense = tiny_segmenter()
    weights = tmp_path / "dense.pth"
    torch.save({"model": dense.state_dict()}, weights)
    # linear auxiliary heads (no BatchNorm): a training pass then decides as the eval pass does
    model = _dovit(0.3, "MODEL.WEIGHTS", str(weights), "MODEL.TOKEN_REDUCTION.DOVIT.DISTILL_WEIGHT", "0.4",
                   "MODEL.TOKEN_REDUCTION.DOVIT.FEATURE_DISTILL_WEIGHT", "0.5", "MODEL.TOKEN_REDUCTION.DOVIT.AUX_HIDDEN", "0",
                   seed=1)
    batch = _batch(2, seed=5)
    x = torch.stack([(b["image"].float() - 127.5) / 127.5 for b in batch])
    reducer = model.token_reducer
    reducer.threshold = reducer.current_threshold = _ragged_threshold(model, x)
    model.train()
    torch.manual_seed(0)
    losses = model(batch)
    assert {"loss_dovit_distill", "loss_dovit_feature_distill"} <= set(losses)
    teacher = model.token_reducer._teacher.model
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    assert not any("teacher" in k for k in model.state_dict())
    assert all(p is not q for p in model.parameters() for q in teacher.parameters())
    with torch.no_grad():
        assert torch.equal(teacher.network(x), dense.eval().network(x))  # the teacher is the saved model
        model.eval()
        student = model.network(x)
        features = model.encode(x)
    kl = pixel_kl(student, dense.network(x))
    assert 0 < sum(sum(r["stopped"]) for r in model.cost_records(model.reduced_network(x)[1], (64, 64)))
    # the student in eval mode equals the training pass (no dropout, the same xi), so the loss is beta x KL
    assert losses["loss_dovit_distill"].item() == pytest.approx(0.4 * kl.item(), rel=1e-5)
    with torch.no_grad():
        mse = (features.tokens - dense.backbone(x).tokens).square().mean()
    assert losses["loss_dovit_feature_distill"].item() == pytest.approx(0.5 * mse.item(), rel=1e-5)
    sum(losses.values()).backward()
    assert all(p.grad is None for p in teacher.parameters())


def test_threshold_ramp_and_evaluation_threshold():
    model = _dovit(0.9, "MODEL.TOKEN_REDUCTION.DOVIT.THRESHOLD_RAMP", "0.5")
    reducer = model.token_reducer
    model.on_train_iteration(0, 100)
    assert reducer.current_threshold == 1.0
    model.on_train_iteration(25, 100)
    assert reducer.current_threshold == pytest.approx(0.95)
    model.on_train_iteration(80, 100)
    assert reducer.current_threshold == pytest.approx(0.9)


def test_bad_settings_fail_by_name():
    with pytest.raises(ValueError, match="DECISION_LAYERS"):
        tiny_segmenter(*DOVIT, "MODEL.TOKEN_REDUCTION.DOVIT.DECISION_LAYERS", "[1, 3]")
    with pytest.raises(ValueError, match="THRESHOLD must lie"):
        _dovit(1.5)
    with pytest.raises(ValueError, match="AUX_LOSS_TOKENS 'some'"):
        _dovit(0.9, "MODEL.TOKEN_REDUCTION.DOVIT.AUX_LOSS_TOKENS", "some")
    model = _dovit(0.9, "MODEL.TOKEN_REDUCTION.DOVIT.DISTILL_WEIGHT", "0.4").train()
    with pytest.raises(ValueError, match="TEACHER.WEIGHTS and MODEL.WEIGHTS are both empty"):
        model(_batch(1))


def test_the_shipped_vit_s_config_maps_the_paper_layers_and_adds_the_paper_parameters():
    from eco_m2f.config import setup_cfg
    from eco_m2f.architectures import build_model

    repo = Path(__file__).resolve().parents[1]
    cfg = setup_cfg(str(repo / "configs/cityscapes/semantic-segmentation/dovit/dovit_vit_small_mask_bs8_80k.yaml"),
                    ["MODEL.DEVICE", "cpu", "MODEL.BACKBONE.PRETRAINED", "False"])
    reducer = build_model(cfg).token_reducer
    assert reducer.decision_layers == (2, 5, 8)  # after layers 3, 6, 9: the outputs of 0-based blocks 2, 5, 8
    added = sum(p.numel() for p in reducer.parameters())
    assert 0.30e6 < added < 0.33e6  # papers/001 Table 1: ViT-S 22.57M -> DoViT-S 22.89M
