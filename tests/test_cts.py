"""CTS: the dense Segmenter exactly when nothing is shared (the policy not run), a shared token's
embedding by hand, copied-back predictions, ragged batches equal to each image alone, cost
records equal to fvcore, token maps, the frozen policy loaded after construction and unchanged by
training through train_net, and clear errors."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))

from token_reducers import LINEAR, fvcore_gflops, images, tiny_segmenter  # noqa: E402
from eco_m2f.config import setup_cfg  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
POLICY_CONFIG = REPO / "configs/synthetic/cts_policy_tiny_cpu.yaml"
CTS = ["MODEL.TOKEN_REDUCTION.NAME", "CTS", "MODEL.TOKEN_REDUCTION.CTS.NUM_SHARED_OF", "0"]


def _cts(*opts: str, seed: int = 0):
    """A tiny CTS Segmenter with the weights of the dense one built from the same seed."""
    dense = tiny_segmenter(*opts, seed=seed)
    model = tiny_segmenter(*CTS, *opts, seed=seed)
    report = model.load_state_dict(dense.state_dict(), strict=False)
    assert not report.unexpected_keys and all(k.startswith("token_reducer.policy.") for k in report.missing_keys)
    return dense, model


def _inputs(n: int, h: int = 64, w: int = 64, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return [{"image": torch.randint(0, 256, (3, h, w), generator=g, dtype=torch.uint8), "height": h, "width": w}
            for _ in range(n)]


def _forbid_policy(model) -> None:
    def boom(*args, **kwargs):
        raise AssertionError("the policy ran although nothing can be shared")

    model.token_reducer.policy.window_logits = boom


@pytest.mark.parametrize("opts", [
    ["MODEL.TOKEN_REDUCTION.CTS.NUM_SHARED", "0"],
    ["MODEL.TOKEN_REDUCTION.CTS.MODE", "threshold", "MODEL.TOKEN_REDUCTION.CTS.THRESHOLD", "1.01"],
])
def test_nothing_shared_is_the_dense_segmenter_exactly_and_runs_no_policy(opts):
    dense, model = _cts(*opts)
    _forbid_policy(model)
    x = images((48, 80), (48, 80))
    with torch.no_grad():
        assert torch.equal(model.network(x), dense.network(x))
        outs, ref = model(_inputs(2, 48, 80)), dense(_inputs(2, 48, 80))
    for a, b in zip(outs, ref):
        assert torch.equal(a["sem_seg"], b["sem_seg"])
        assert a["cost"]["shared"] == 0 and a["cost"]["tokens"] == b["cost"]["tokens"] == [15, 15, 15]
        assert a["cost"]["gflops"] == pytest.approx(b["cost"]["gflops"], rel=1e-12) and a["cost"]["gflops_token_reducer"] == 0


def test_a_shared_token_is_the_patch_embedding_of_the_averaged_region():
    _, model = _cts("MODEL.TOKEN_REDUCTION.CTS.NUM_SHARED", "2")
    vit, reducer = model.backbone, model.token_reducer
    x = images((64, 96), (64, 96), seed=5)
    from eco_m2f.modeling.token_reduction.plugin import ReductionState

    with torch.no_grad():
        state = ReductionState(images=x, grid=(4, 6))
        tokens = reducer.embed(vit, x, state)
        scores = reducer.policy.superpatch_scores(x, reducer.seg_pixel_mean, reducer.seg_pixel_std)  # B x 2 x 3
        dense_tokens, _ = vit.prepare_tokens(x)
    assert tokens.live_counts == (24 - 3 * 2, 24 - 3 * 2)
    pos = vit.position_embedding((4, 6))[0, 1:]  # (24, C)
    patches = tokens.patches()
    for b in range(2):
        top = scores[b].flatten().topk(2).indices.tolist()
        for k in top:
            i, j = divmod(k, 3)
            region = x[b : b + 1, :, 32 * i : 32 * i + 32, 32 * j : 32 * j + 32]
            small = F.avg_pool2d(region, 2)  # the 32x32 region as one 16x16 patch
            by_hand = F.conv2d(small, vit.patch_embed.proj.weight, vit.patch_embed.proj.bias).flatten(1)[0]
            cells = [(2 * i + di) * 6 + 2 * j + dj for di in (0, 1) for dj in (0, 1)]
            by_hand = vit.patch_embed.norm(by_hand) + pos[cells].mean(0)
            rows = tokens.owner[b, cells].unique()
            assert rows.numel() == 1, "the four cells of a shared superpatch have one token"
            assert torch.allclose(patches[rows[0]], by_hand, atol=1e-5)
        alone = [c for c in range(24) if (c // 6 // 2) * 3 + (c % 6) // 2 not in top]
        for c in alone:  # every other cell keeps the ViT's own token
            assert torch.allclose(patches[tokens.owner[b, c]], dense_tokens[b, 1 + c], atol=1e-5)
    assert state.cost[0]["shared"] == 2 and state.cost[0]["shared_cells"] == 8


def test_predictions_of_a_shared_token_are_copied_to_its_cells():
    _, model = _cts("MODEL.TOKEN_REDUCTION.CTS.NUM_SHARED", "3", *LINEAR)
    x = images((64, 64), (64, 64), seed=2)
    with torch.no_grad():
        _, reduced = model.reduced_network(x)
        outputs = model.head_outputs(model.sem_seg_head, reduced.features, reduced)
    per_cell = outputs["pred_tokens"]  # B x G x K, copied back to every cell
    owner = reduced.tokens.owner
    for b in range(2):
        for row in owner[b].unique():
            cells = (owner[b] == row).nonzero().view(-1)
            assert cells.numel() in (1, 4)
            assert torch.equal(per_cell[b, cells], per_cell[b, cells[:1]].expand(cells.numel(), -1))
        assert int((owner[b].bincount() == 4).sum()) == 3


def _ragged_threshold(model, x) -> float:
    """A score threshold at which the images of ``x`` share different numbers of superpatches."""
    r = model.token_reducer
    with torch.no_grad():
        scores = r.policy.superpatch_scores(x, r.seg_pixel_mean, r.seg_pixel_std).flatten(1)
    for t in scores.flatten().sort().values.tolist():
        counts = (scores >= t).sum(1).tolist()
        if len(set(counts)) == len(counts) and 0 < min(counts):
            return t
    raise AssertionError(f"no threshold separates the images: {scores}")


@pytest.mark.parametrize("opts", [[], LINEAR])
def test_dynamic_cts_batch_equals_each_image_alone_and_fvcore(opts):
    _, model = _cts("MODEL.TOKEN_REDUCTION.CTS.MODE", "threshold", *opts)
    assert model.dynamic_cost
    x = images((64, 96), (64, 96), (64, 96), seed=7)
    model.token_reducer.threshold = _ragged_threshold(model, x)
    with torch.no_grad():
        batch_logits, reduced = model.reduced_network(x)
        records = model.cost_records(reduced, (64, 96))
    shared = [r["shared"] for r in records]
    assert len(set(shared)) == 3, shared
    for b, record in enumerate(records):
        with torch.no_grad():
            alone, alone_pass = model.reduced_network(x[b : b + 1])
        assert torch.allclose(batch_logits[b], alone[0], atol=1e-5)
        assert alone_pass.tokens.live_counts[0] == reduced.tokens.live_counts[b] == 24 - 3 * shared[b]
        assert record["tokens"] == [24 - 3 * shared[b]] * 3 and record["shared_cells"] == 4 * shared[b]
        assert record["gflops"] == pytest.approx(fvcore_gflops(model, x[b : b + 1]), rel=1e-9)
        assert record["gflops_token_reducer"] == pytest.approx(model.token_reducer.policy.flops(64, 96) / 1e9, rel=1e-12)


def test_fixed_cts_cost_and_budget_scale_with_the_input():
    _, model = _cts("MODEL.TOKEN_REDUCTION.CTS.NUM_SHARED", "3", "MODEL.TOKEN_REDUCTION.CTS.NUM_SHARED_OF", "4")
    assert not model.dynamic_cost
    r = model.token_reducer
    assert [r.budget(g) for g in [(4, 4), (8, 8), (5, 5), (1, 9)]] == [3, 12, 3, 0]
    x = images((80, 80), seed=1)  # a 5 x 5 grid: the last row and column form no superpatch
    with torch.no_grad():
        _, reduced = model.reduced_network(x)
        record = model.cost_records(reduced, (80, 80))[0]
    assert record["tokens"] == [25 - 9] * 3 and record["shared"] == 3
    assert (reduced.tokens.token_area().view(-1) <= 4).all()
    owner = reduced.tokens.owner[0].view(5, 5)
    assert owner[4].unique().numel() == 5 and owner[:, 4].unique().numel() == 5  # one token per border cell
    assert record["gflops"] == pytest.approx(fvcore_gflops(model, x), rel=1e-9)


def test_policy_flops_equal_fvcore():
    from eco_m2f.architectures import build_model
    from eco_m2f.evaluation.flops import count_flops

    policy = build_model(setup_cfg(str(POLICY_CONFIG), ["MODEL.BACKBONE.PRETRAINED", "False"])).eval()
    for h, w in [(64, 64), (96, 160)]:
        assert policy.flops(h, w) == pytest.approx(count_flops(policy, torch.zeros(1, 3, h, w))["total"] * 1e9, rel=1e-9)


def test_token_map_names_the_shared_window_of_each_cell():
    _, model = _cts("MODEL.TOKEN_REDUCTION.CTS.NUM_SHARED", "2")
    x = images((64, 64), seed=4)
    maps = model.token_maps(x)[0]
    shared = maps["shared window"]
    assert shared.values.shape == (4, 4) and int((shared.values == 2).sum()) == 8
    assert set(shared.values.unique().tolist()) == {1, 2} and shared.labels[2] == "2x2 shared"


# ----------------------------------------------------------------------------- the policy's weights


def _policy_checkpoint(tmp_path: Path, seed: int = 3) -> Path:
    from eco_m2f.architectures import build_model

    torch.manual_seed(seed)
    policy = build_model(setup_cfg(str(POLICY_CONFIG), ["MODEL.BACKBONE.PRETRAINED", "False"]))
    path = tmp_path / "policy.pth"
    torch.save({"model": policy.state_dict()}, path)
    return path


def test_policy_weights_load_after_construction_and_segmenter_checkpoints_may_lack_them(tmp_path):
    from eco_m2f.architectures import build_model
    from eco_m2f.checkpoint import load_weights

    path = _policy_checkpoint(tmp_path)
    saved = torch.load(path)["model"]
    dense = tiny_segmenter()
    opts = ["MODEL.TOKEN_SHARING.POLICY_WEIGHTS", str(path), "MODEL.TOKEN_SHARING.POLICY_CONFIG", str(POLICY_CONFIG)]
    from token_reducers import TINY

    model = build_model(setup_cfg(None, TINY + CTS + opts))
    sd = model.state_dict()
    assert all(torch.equal(sd[f"token_reducer.policy.{k}"], v) for k, v in saved.items())
    report = load_weights(model, dense.state_dict())  # a dense Segmenter checkpoint: no policy tensors
    assert report.clean, report
    assert all(not p.requires_grad for p in model.token_reducer.policy.parameters())
    model.train()
    assert not model.token_reducer.policy.training

    wrong = POLICY_CONFIG.parent / "cts_policy_dcts.yaml"  # other window sizes than this config builds
    with pytest.raises(ValueError, match="MODEL.POLICY.WINDOW_SIZES"):
        build_model(setup_cfg(None, TINY + CTS + ["MODEL.TOKEN_SHARING.POLICY_WEIGHTS", str(path),
                                                  "MODEL.TOKEN_SHARING.POLICY_CONFIG", str(wrong)]))


def test_training_through_train_net_leaves_the_policy_frozen(tiny_datasets, tmp_path):
    from eco_m2f.engine import default_argument_parser, main

    path = _policy_checkpoint(tmp_path)
    out = tmp_path / "run"
    opts = [
        "--config-file", str(REPO / "configs/synthetic/cts_tiny_cpu.yaml"),
        "DATASETS.TRAIN", "('synthetic_panoptic_train',)", "DATASETS.TEST", "()",
        "INPUT.DATASET_MAPPER_NAME", "mask_former_semantic", "MODEL.SEM_SEG_HEAD.NUM_CLASSES", "8",
        "INPUT.MIN_SIZE_TRAIN", "(64,)", "INPUT.MIN_SIZE_TRAIN_SAMPLING", "choice", "INPUT.MAX_SIZE_TRAIN", "64",
        "INPUT.CROP.ENABLED", "False", "INPUT.SIZE_DIVISIBILITY", "-1", "MODEL.VIT.IMG_SIZE", "64",
        "MODEL.TOKEN_REDUCTION.CTS.NUM_SHARED", "2", "MODEL.TOKEN_REDUCTION.CTS.NUM_SHARED_OF", "4",
        "MODEL.TOKEN_SHARING.POLICY_CONFIG", str(POLICY_CONFIG), "MODEL.TOKEN_SHARING.POLICY_WEIGHTS", str(path),
        "SOLVER.MAX_ITER", "4", "SOLVER.CHECKPOINT_PERIOD", "1000", "LOG_PERIOD", "1", "OUTPUT_DIR", str(out),
    ]
    main(default_argument_parser().parse_args(opts))
    rows = [json.loads(line) for line in (out / "metrics.json").read_text().splitlines() if line.strip()]
    losses = [r["total_loss"] for r in rows if "total_loss" in r]
    assert len(losses) == 4 and all(v == v for v in losses)
    trained = torch.load(out / "model_final.pth", weights_only=False)["model"]
    saved = torch.load(path)["model"]
    for k, v in saved.items():
        assert torch.equal(trained[f"token_reducer.policy.{k}"].cpu(), v), k  # BatchNorm statistics too
    dense_keys = [k for k in trained if k.startswith("backbone.patch_embed")]
    assert dense_keys  # the segmenter itself trained


@pytest.mark.parametrize("opts,match", [
    (["MODEL.TOKEN_REDUCTION.CTS.MODE", "topk"], "CTS.MODE"),
    (["MODEL.TOKEN_REDUCTION.CTS.NUM_SHARED", "-1"], "CTS.NUM_SHARED"),
    (["MODEL.TOKEN_REDUCTION.CTS.NUM_SHARED", "300", "MODEL.TOKEN_REDUCTION.CTS.NUM_SHARED_OF", "256"], "NUM_SHARED_OF"),
    (["MODEL.TOKEN_REDUCTION.CTS.THRESHOLD", "-0.5"], "CTS.THRESHOLD"),
    (["MODEL.POLICY.WINDOW_SIZES", "[4]"], "MODEL.POLICY.WINDOW_SIZES"),
])
def test_bad_settings_fail_by_name(opts, match):
    with pytest.raises(ValueError, match=match):
        tiny_segmenter(*CTS, *opts)


def test_cts_needs_a_token_wise_head():
    from token_reducers import SETR

    with pytest.raises(ValueError, match="token-wise head"):
        tiny_segmenter(*CTS, *SETR)
