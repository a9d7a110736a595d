"""DToP (dynamic token pruning, as in papers/003): theta = 1 is the dense Segmenter, the top-k
per class stay, ragged batches equal single images, finalised cells carry the auxiliary
prediction, the cost records are exact, and the tiny config trains through the trainer."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

from token_reducers import K, LINEAR, SETR, fvcore_gflops, images, tiny_segmenter  # noqa: E402
from eco_m2f.checkpoint import load_weights  # noqa: E402
from eco_m2f.config import setup_cfg  # noqa: E402
from eco_m2f.engine import default_argument_parser, main  # noqa: E402
from eco_m2f.modeling.token_reduction import ReductionState, TokenSet  # noqa: E402
from eco_m2f.modeling.token_reduction.flops import token_wise_flops  # noqa: E402
from eco_m2f.modeling.token_reduction.methods.dtop import PRUNED_MAP, prune_mask, rank_within_class  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
ATM = ["MODEL.SEM_SEG_HEAD.NAME", "ATMHead", "MODEL.SEM_SEG_HEAD.ATM.HIDDEN_DIM", "16", "MODEL.SEM_SEG_HEAD.ATM.NUM_HEADS", "2",
       "MODEL.SEM_SEG_HEAD.ATM.NUM_LAYERS", "1", "MODEL.SEM_SEG_HEAD.ATM.DROPOUT", "0.0", "MODEL.VIT.OUT_INDICES", "[0, 2]"]
ATM_AUX = ["MODEL.TOKEN_REDUCTION.DTOP.AUX_HEAD", "atm", "MODEL.SEM_SEG_HEAD.ATM.HIDDEN_DIM", "16",
           "MODEL.SEM_SEG_HEAD.ATM.NUM_HEADS", "2", "MODEL.SEM_SEG_HEAD.ATM.NUM_LAYERS", "1", "MODEL.SEM_SEG_HEAD.ATM.DROPOUT", "0.0"]
DTOP = ["MODEL.TOKEN_REDUCTION.NAME", "DTOP", "MODEL.TOKEN_REDUCTION.DTOP.PRUNE_LAYERS", "[1, 2]"]
HEADS = {"mask": [], "linear": LINEAR, "setr": SETR, "atm": ATM}


def _dtop(*opts: str, theta: float = 0.5, top_k: int = 1, sharpen: float = 40.0):
    """A tiny DToP pruning after layers 1 and 2 of 3 and the dense model with its weights; the
    auxiliary heads' weights are scaled by ``sharpen`` so that some tokens are confident."""
    dense = tiny_segmenter(*opts)
    model = tiny_segmenter(*DTOP, "MODEL.TOKEN_REDUCTION.DTOP.THETA", str(theta),
                           "MODEL.TOKEN_REDUCTION.DTOP.TOP_K_PER_CLASS", str(top_k), *opts, seed=1)
    report = load_weights(model, dense.state_dict(), allow_missing=True)
    assert report.missing_keys and all(k.startswith("token_reducer.heads.layer") for k in report.missing_keys)
    if model.token_reducer.aux_head == "linear":
        with torch.no_grad():
            for head in model.token_reducer.heads.values():
                head[1].weight.mul_(sharpen)
    return dense, model


def _batch(n: int = 2, size: int = 64, seed: int = 11):
    g = torch.Generator().manual_seed(seed)
    return [{"image": torch.randint(0, 256, (3, size, size), generator=g, dtype=torch.uint8), "height": size, "width": size,
             "sem_seg": torch.randint(0, K, (size, size), generator=g)} for _ in range(n)]


def test_layers_are_numbered_as_in_the_papers():
    model = tiny_segmenter(*DTOP)
    assert model.token_reducer.prune_layers == (1, 2) and model.token_reducer.decision_layers == (0, 1)
    assert model.token_reducer.output_kind == "tokens"
    assert tiny_segmenter(*DTOP, *SETR).token_reducer.output_kind == "dense"
    shipped = {
        "ade20k/semantic-segmentation/dtop/dtop_segvit_vit_base_atm_6_8_bs4_160k.yaml": ([6, 8], 0.9, 12),
        "ade20k/semantic-segmentation/dtop/dtop_segvit_vit_large_atm_640_8_16_bs4_160k.yaml": ([8, 16], 0.9, 24),
        "ade20k/semantic-segmentation/dtop/dtop_segvit_vit_large_atm_640_18_bs4_160k.yaml": ([18], 0.9, 24),
        "coco_stuff/semantic-segmentation/dtop/dtop_segvit_vit_large_atm_512_8_16_bs4_80k.yaml": ([8, 16], 0.95, 24),
        "coco_stuff/semantic-segmentation/dtop/dtop_segvit_vit_large_atm_512_18_bs4_80k.yaml": ([18], 0.95, 24),
    }
    for path, (layers, theta, depth) in shipped.items():
        cfg = setup_cfg(str(REPO / "configs" / path))
        d = cfg.MODEL.TOKEN_REDUCTION.DTOP
        assert (list(d.PRUNE_LAYERS), d.THETA, cfg.MODEL.VIT.DEPTH) == (layers, theta, depth), path
        assert d.TOP_K_PER_CLASS == 5 and d.AUX_HEAD == "atm" and cfg.MODEL.SEM_SEG_HEAD.NAME == "ATMHead"
        assert cfg.MODEL.WEIGHTS.endswith("model_final.pth")  # step 2 starts from the dense step 1


@pytest.mark.parametrize("name,aux", [("mask", []), ("linear", []), ("setr", []), ("atm", []), ("mask", ATM_AUX), ("atm", ATM_AUX)])
def test_theta_one_equals_the_dense_segmenter(name, aux):
    dense, model = _dtop(*HEADS[name], *aux, theta=1.0)
    x = images((64, 48), (64, 48), seed=2)
    with torch.no_grad():
        assert torch.equal(model.network(x), dense.network(x))
        _, reduced = model.reduced_network(x)
    assert reduced.tokens.history == ((13, 13),) * 3 and reduced.state.flops.get("token_reducer") is None
    with torch.no_grad():
        for a, b in zip(dense(_batch()), model(_batch())):
            assert torch.equal(a["sem_seg"], b["sem_seg"])
            assert b["cost"]["pruned"] == [0, 0] and b["cost"]["gflops_token_reducer"] == 0
            assert b["cost"]["gflops"] == pytest.approx(a["cost"]["gflops"], rel=1e-12)
    # training at theta = 1: the dense losses, plus the auxiliary heads' own
    dense.train(), model.train()
    torch.manual_seed(0)
    la = dense(_batch())
    torch.manual_seed(0)
    lb = model(_batch())
    assert set(lb) == set(la) | {"loss_dtop_aux1", "loss_dtop_aux2"}
    assert all(torch.equal(la[k], lb[k]) for k in la)


def test_rank_within_class_is_a_segmented_sort():
    confidence = torch.tensor([0.5, 0.9, 0.7, 0.95, 0.6, 0.8, 0.99])
    label = torch.tensor([1, 1, 2, 1, 2, 1, 2])
    image = torch.tensor([0, 0, 0, 0, 0, 1, 1])
    # image 0: class 1 = (0.5, 0.9, 0.95) -> ranks 2, 1, 0; class 2 = (0.7, 0.6) -> 0, 1; image 1: one each
    assert rank_within_class(confidence, label, image, 3).tolist() == [2, 1, 0, 0, 1, 0, 0]
    assert rank_within_class(confidence[:0], label[:0], image[:0], 3).tolist() == []


def _constructed(reducer, classes_per_image, strengths_per_image):
    """A token set whose auxiliary logits (the head reads the first K channels, no norm) are
    ``strength`` x one-hot(class): tokens of image b with classes ``classes_per_image[b]``."""
    with torch.no_grad():
        linear = nn.Linear(32, K)
        linear.weight.zero_()
        linear.weight[:, :K] = torch.eye(K)
        linear.bias.zero_()
    reducer.heads["layer2"] = nn.Sequential(nn.Identity(), linear)
    n = max(len(c) for c in classes_per_image)
    b = len(classes_per_image)
    dense = torch.zeros(b, 1 + 16, 32)
    mask = torch.zeros(b, 16, dtype=torch.bool)
    for i, (classes, strengths) in enumerate(zip(classes_per_image, strengths_per_image)):
        for j, (c, s) in enumerate(zip(classes, strengths)):
            dense[i, 1 + j, c] = s
            mask[i, j] = True
    assert n <= 16
    return TokenSet.from_dense(dense, (4, 4)).keep(mask.view(-1)), dense


def _state(b: int) -> ReductionState:
    state = ReductionState(images=torch.zeros(b, 3, 64, 64), grid=(4, 4), record_maps=True)
    state.cost = [{"pruned": [0, 0]} for _ in range(b)]
    state.token_maps[PRUNED_MAP] = torch.zeros(b, 16, dtype=torch.long)
    return state


def test_the_k_most_confident_tokens_of_each_class_stay_in_a_ragged_batch():
    """Image 0: 7 confident tokens of class 2 (5 stay, the 2 least confident leave), 3 confident
    of class 1 (all stay), 2 unsure ones (stay); image 1 holds 4 tokens, 6 confident of class 0
    would be needed to prune: its 4 all stay; image 2: 6 confident of class 3 -> 1 leaves."""
    model = tiny_segmenter(*DTOP, "MODEL.TOKEN_REDUCTION.DTOP.THETA", "0.9", "MODEL.TOKEN_REDUCTION.DTOP.TOP_K_PER_CLASS", "5")
    reducer = model.token_reducer
    classes = [[2] * 7 + [1] * 3 + [0, 3], [0] * 4, [3] * 6 + [1]]
    strengths = [[10, 11, 12, 13, 14, 15, 16, 10, 11, 12, 0.5, 0.2], [10, 11, 12, 13], [9, 10, 11, 12, 13, 14, 1.0]]
    tokens, _ = _constructed(reducer, classes, strengths)
    state = _state(3)
    out = reducer.reduce(1, tokens, state)
    assert [r["pruned"] for r in state.cost] == [[0, 2], [0, 0], [0, 1]]
    assert out.live_counts == (10, 4, 6)
    left = [set(torch.nonzero(~out.live_cells()[b] & tokens.live_cells()[b]).view(-1).tolist()) for b in range(3)]
    assert left == [{0, 1}, set(), {0}]  # the least confident of the over-full classes
    assert torch.equal(state.token_maps[PRUNED_MAP] == 2, ~out.live_cells() & tokens.live_cells())
    # each image alone gives the same decision
    for b in range(3):
        alone, _ = _constructed(reducer, classes[b:b + 1], strengths[b:b + 1])
        single = _state(1)
        got = reducer.reduce(1, alone, single)
        assert single.cost[0]["pruned"] == state.cost[b]["pruned"]
        assert torch.equal(got.live_cells()[0], out.live_cells()[b])
    # the finalised tokens keep their auxiliary logits
    final = out.overlay_final(torch.full((3, 16, K), -7.0), "logits")
    assert torch.allclose(final[0, 0], torch.tensor([0.0, 0.0, 10.0, 0.0])) and (final[0, 2] == -7).all()
    # k = 0: every confident token leaves
    assert prune_mask(torch.tensor([0.95, 0.5]), torch.tensor([1, 1]), torch.tensor([0, 0]), K, 0.9, 0).tolist() == [True, False]


def test_a_ragged_batch_gives_each_image_its_result_alone():
    _, model = _dtop(theta=0.6, top_k=1)
    x = torch.cat([images((64, 64), seed=s) for s in (3, 4, 5)])
    with torch.no_grad():
        scores, reduced = model.reduced_network(x)
        pruned = [r["pruned"] for r in reduced.state.cost]
        assert len({tuple(p) for p in pruned}) > 1 and any(sum(p) for p in pruned)  # images prune differently
        for b in range(3):
            alone, single = model.reduced_network(x[b:b + 1])
            assert single.state.cost[0]["pruned"] == pruned[b]
            assert (alone[0] - scores[b]).abs().max().item() <= 1e-5


@pytest.mark.parametrize("name", ["mask", "setr", "atm"])
def test_finalised_cells_carry_the_auxiliary_prediction(name):
    _, model = _dtop(*HEADS[name], theta=0.6, top_k=1)
    x = images((64, 64), seed=5)
    with torch.no_grad():
        logits, reduced = model.reduced_network(x, record_maps=True)
        outputs = model.head_outputs(model.sem_seg_head, reduced.features, reduced)
        block0 = model.backbone.blocks[0](model.backbone.prepare_tokens(x)[0])[:, 1:]
        aux = model.token_reducer.heads["layer1"](block0)[0]  # G x K: the first auxiliary head on the dense tokens
    first = reduced.state.token_maps[PRUNED_MAP][0] == 1
    assert first.any() and torch.equal(first, reduced.state.token_maps["blocks"][0] == 1)
    if name == "mask":
        got = outputs["pred_tokens"][0][first]
        want = aux[first]
    elif name == "setr":  # each cell an s x s block of the class map
        maps = outputs["pred_maps"][0]
        s = maps.shape[-1] // 4
        got, want = maps[:, ::s, ::s].reshape(K, 16).t()[first], aux[first]
    else:  # ATM: the blocks of the score map take the auxiliary probabilities
        got, want = logits[0][:, ::16, ::16].reshape(K, 16).t()[first], aux.softmax(-1)[first]
    assert (got - want).abs().max().item() <= 1e-5


@pytest.mark.parametrize("opts,theta", [([], 0.6), (ATM, 0.6), (ATM_AUX + ["MODEL.TOKEN_REDUCTION.DTOP.PRUNE_LAYERS", "[2]"], 0.3)])
def test_cost_records_follow_the_pruned_counts_and_equal_fvcore(opts, theta):
    _, model = _dtop(*opts, theta=theta, top_k=1)
    x = torch.cat([images((64, 80), seed=s) for s in (6, 7)])
    with torch.no_grad():
        records = model.cost_records(model.reduced_network(x)[1], (64, 80))
    reducer, compared = model.token_reducer, 0
    for b, record in enumerate(records):
        live, tokens = [], [20]
        for layer, pruned in zip(range(1, 4), [0] * (reducer.prune_layers[0] - 1) + record["pruned"] + [0] * 3):
            if layer in reducer.prune_layers:
                live.append(tokens[-1])
            tokens.append(tokens[-1] - pruned)
        assert record["tokens"] == tokens[:3]
        heads = [reducer.heads[f"layer{v}"] for v in reducer.prune_layers]
        if reducer.aux_head == "linear":
            charged = sum(token_wise_flops(h) * n for h, n in zip(heads, live))
        else:
            charged = sum(h.forward_flops(n) + K * K * n for h, n in zip(heads, live))
        assert record["gflops_token_reducer"] == pytest.approx(charged / 1e9, rel=1e-12)
        if all(record["pruned"]):  # a head whose prediction prunes nothing is unused in fvcore's trace, which drops it
            compared += 1
            # fvcore's einsum handle (ATM's class x mask product) rounds its count by a few flops
            assert record["gflops"] == pytest.approx(fvcore_gflops(model, x[b : b + 1]), abs=1e-7)
    assert compared > 0 and model.dynamic_cost


def test_training_prunes_and_the_losses_reach_the_auxiliary_heads():
    _, model = _dtop(theta=0.6, top_k=1)
    model.train()
    losses = model(_batch())
    assert {"loss_ce", "loss_dtop_aux1", "loss_dtop_aux2"} == set(losses)
    state = model._reduction.encode(model.preprocess_image(_batch()).tensor, targets=torch.zeros(2, 64, 64, dtype=torch.long)).state
    assert any(sum(r["pruned"]) for r in state.cost)  # pruned in training, as in inference
    sum(losses.values()).backward()
    for name in ("layer1", "layer2"):
        assert model.token_reducer.heads[name][1].weight.grad.abs().sum() > 0
    assert model.backbone.blocks[2].mlp.fc1.weight.grad.abs().sum() > 0
    # PRUNE_IN_TRAINING False: nothing pruned in training, the heads still train
    _, off = _dtop("MODEL.TOKEN_REDUCTION.DTOP.PRUNE_IN_TRAINING", "False", theta=0.6, top_k=1)
    off.train()
    state = off._reduction.encode(off.preprocess_image(_batch()).tensor, targets=torch.zeros(2, 64, 64, dtype=torch.long)).state
    assert all(r["pruned"] == [0, 0] for r in state.cost) and {"loss_dtop_aux1", "loss_dtop_aux2"} <= set(state.losses)


def test_bad_settings_fail_by_name():
    key = "MODEL.TOKEN_REDUCTION.DTOP."
    for name, value in [("PRUNE_LAYERS", "[0, 2]"), ("PRUNE_LAYERS", "[2, 1]"), ("PRUNE_LAYERS", "[3]"), ("PRUNE_LAYERS", "[]"),
                        ("THETA", "0.0"), ("THETA", "-0.5"), ("TOP_K_PER_CLASS", "-1"), ("TOP_K_PER_CLASS", "1.5"),
                        ("AUX_HEAD", "'mlp'"), ("AUX_LOSS_WEIGHT", "-1.0")]:
        with pytest.raises(ValueError, match=key.replace(".", r"\.") + name):
            tiny_segmenter(*DTOP, key + name, value)


def test_the_tiny_config_fine_tunes_through_the_trainer(tiny_datasets, tmp_path):
    """configs/synthetic/dtop_tiny_cpu.yaml, a few iterations of train_net.py's path on the tiny set."""
    out = tmp_path / "dtop"
    opts = ["--config-file", str(REPO / "configs/synthetic/dtop_tiny_cpu.yaml"), "MODEL.WEIGHTS", "",
            "DATASETS.TRAIN", "('synthetic_panoptic_train',)", "DATASETS.TEST", "('synthetic_panoptic_val',)",
            "INPUT.DATASET_MAPPER_NAME", "mask_former_semantic", "MODEL.SEM_SEG_HEAD.NUM_CLASSES", "8",
            "INPUT.MIN_SIZE_TRAIN", "(64,)", "INPUT.MIN_SIZE_TRAIN_SAMPLING", "choice", "INPUT.MAX_SIZE_TRAIN", "64",
            "INPUT.CROP.ENABLED", "False", "INPUT.SIZE_DIVISIBILITY", "-1", "INPUT.MIN_SIZE_TEST", "64",
            "INPUT.MAX_SIZE_TEST", "64", "MODEL.VIT.IMG_SIZE", "64", "MODEL.TOKEN_REDUCTION.DTOP.THETA", "0.3",
            "SOLVER.MAX_ITER", "4", "SOLVER.CHECKPOINT_PERIOD", "1000", "LOG_PERIOD", "1", "OUTPUT_DIR", str(out)]
    results = main(default_argument_parser().parse_args(opts))
    rows = [json.loads(line) for line in (out / "metrics.json").read_text().splitlines() if line.strip()]
    rows = [r for r in rows if "total_loss" in r]
    assert len(rows) == 4 and {"loss_ce", "loss_dtop_aux1", "loss_dtop_aux2"} <= set(rows[-1])
    assert (out / "model_final.pth").is_file()
    assert 0.0 <= results["synthetic_panoptic_val"]["sem_seg"]["mIoU"] <= 100.0
