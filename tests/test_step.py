"""STEP (papers/003) = dCTS + DToP: each half switched off is the other method exactly, DToP's
checkpoints load, ragged batches (images sharing and pruning differently) equal single images,
a pruned shared token's auxiliary prediction covers all its cells, the cost records equal
fvcore, training reaches the auxiliary heads with the policy frozen, the SegViT (ATM) base, the
shipped configs."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from token_reducers import K, SETR, fvcore_gflops, images, tiny_segmenter  # noqa: E402
from eco_m2f.checkpoint import load_weights  # noqa: E402
from eco_m2f.config import setup_cfg  # noqa: E402
from eco_m2f.modeling.token_reduction.methods.dtop import PRUNED_MAP  # noqa: E402
from eco_m2f.modeling.token_reduction.methods.sharing import SHARED_WINDOW_MAP  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SIZES = ["MODEL.POLICY.WINDOW_SIZES", "[2, 4]", "MODEL.TOKEN_REDUCTION.DCTS.WINDOW_SIZES", "[2, 4]",
         "MODEL.TOKEN_REDUCTION.DCTS.SETTING", ""]
PRUNE = ["MODEL.TOKEN_REDUCTION.DTOP.PRUNE_LAYERS", "[1, 2]", "MODEL.TOKEN_REDUCTION.DTOP.TOP_K_PER_CLASS", "1"]


def _opts(name: str, thresholds=(0.5, 0.55), theta: float = 0.6):
    return ["MODEL.TOKEN_REDUCTION.NAME", name, *SIZES, *PRUNE, "MODEL.TOKEN_REDUCTION.DCTS.THRESHOLDS", str(list(thresholds)),
            "MODEL.TOKEN_REDUCTION.DTOP.THETA", str(theta)]


def _step(thresholds=(0.5, 0.55), theta: float = 0.6, sharpen: float = 40.0):
    """A tiny STEP (windows of 2 and 4 patches, pruning after layers 1 and 2 of 3) with a dense
    model's weights, its auxiliary heads sharpened so that some tokens are confident."""
    dense = tiny_segmenter()
    model = tiny_segmenter(*_opts("STEP", thresholds, theta), seed=1)
    report = load_weights(model, dense.state_dict(), allow_missing=True)
    assert all(k.startswith(("token_reducer.heads.", "token_reducer.sharing.policy.")) for k in report.missing_keys)
    with torch.no_grad():
        for head in model.token_reducer.heads.values():
            head[1].weight.mul_(sharpen)
    return model


def _twin(model, name: str, thresholds=(0.5, 0.55), theta: float = 0.6):
    """The DTOP or DCTS model with the same weights as the STEP ``model``."""
    twin = tiny_segmenter(*_opts(name, thresholds, theta), seed=2)
    state = model.state_dict()
    if name == "DCTS":  # the policy lives under sharing. in STEP; DToP's heads are not in dCTS
        state = {k.replace("token_reducer.sharing.", "token_reducer."): v for k, v in state.items() if ".heads." not in k}
    else:
        state = {k: v for k, v in state.items() if ".sharing." not in k}
    twin.load_state_dict(state, strict=True)
    return twin.eval()


def _batch():
    return torch.cat([images((64, 80), seed=s) for s in (3, 4, 5)])


def test_each_half_switched_off_is_the_other_method_exactly():
    x = _batch()
    with torch.no_grad():
        step = _step(thresholds=(2.0, 2.0))  # nothing shared: DToP
        scores, reduced = step.reduced_network(x)
        assert any(sum(r["pruned"]) for r in reduced.state.cost)
        assert torch.equal(scores, _twin(step, "DTOP", (2.0, 2.0)).network(x))
        step = _step(theta=1.0)  # nothing pruned: dCTS
        scores, reduced = step.reduced_network(x)
        assert any(sum(r["shared"]) for r in reduced.state.cost)
        assert all(r["pruned"] == [0, 0] for r in reduced.state.cost)
        assert torch.equal(scores, _twin(step, "DCTS", theta=1.0).network(x))
        step = _step(thresholds=(2.0, 2.0), theta=1.0)  # neither: the dense Segmenter
        dense = tiny_segmenter()
        load_weights(dense, step.state_dict(), allow_unexpected=True)
        assert torch.equal(step.network(x), dense.network(x))


def test_a_ragged_batch_shares_and_prunes_differently_and_equals_each_image_alone():
    model = _step()
    x = _batch()
    with torch.no_grad():
        scores, reduced = model.reduced_network(x)
        records = reduced.state.cost
        assert len({tuple(r["shared"]) for r in records}) > 1 and len({tuple(r["pruned"]) for r in records}) > 1
        assert len({tuple(r["tokens"]) for r in model.cost_records(reduced, (64, 80))}) > 1  # tokens per block differ
        for b in range(x.shape[0]):
            alone, single = model.reduced_network(x[b : b + 1])
            assert single.state.cost[0]["shared"] == records[b]["shared"]
            assert single.state.cost[0]["pruned"] == records[b]["pruned"]
            assert (alone[0] - scores[b]).abs().max().item() <= 1e-5


def test_a_pruned_shared_token_leaves_its_auxiliary_prediction_on_all_its_cells():
    model = _step(theta=0.5)
    x = _batch()
    with torch.no_grad():
        _, reduced = model.reduced_network(x, record_maps=True)
        outputs = model.head_outputs(model.sem_seg_head, reduced.features, reduced)
    side, pruned = reduced.state.token_maps[SHARED_WINDOW_MAP], reduced.state.token_maps[PRUNED_MAP]
    found = 0
    for b in range(x.shape[0]):
        cells = ((side[b] > 1) & (pruned[b] > 0)).nonzero().view(-1)
        if cells.numel() == 0:
            continue
        found += 1
        logits = outputs["pred_tokens"][b]  # G x K, copied back and overlaid
        final_rows = reduced.tokens.finals["logits"].index[b]  # the finalised row each cell reads
        for c in cells.tolist():
            same = (final_rows == final_rows[c]).nonzero().view(-1)  # every cell of that token
            assert same.numel() == int(side[b, c]) ** 2  # a whole n x n window, one prediction
            assert (logits[same] - logits[c]).abs().max().item() == 0.0
    assert found > 0


def test_cost_records_count_shared_and_pruned_tokens_and_equal_fvcore():
    model = _step()
    x = _batch()
    with torch.no_grad():
        reduced = model.reduced_network(x)[1]
        records = model.cost_records(reduced, (64, 80))
    compared = 0
    for b, record in enumerate(records):
        shared = record["shared"]  # windows of 2 and 4 patches
        first = 20 - 3 * shared[0] - 15 * shared[1]  # 4 x 5 cells: a window of n x n patches is one token
        assert record["tokens"][0] == first
        assert record["tokens"][1] == first - record["pruned"][0]
        assert record["tokens"][2] == first - sum(record["pruned"])
        if all(record["pruned"]):  # fvcore's trace drops a head whose prediction removes nothing
            compared += 1
            assert record["gflops"] == pytest.approx(fvcore_gflops(model, x[b : b + 1]), rel=1e-9)
    assert compared > 0 and model.dynamic_cost


def test_training_reaches_the_auxiliary_heads_and_leaves_the_policy_frozen():
    model = _step()
    before = {k: v.clone() for k, v in model.token_reducer.sharing.policy.state_dict().items()}
    model.train()
    g = torch.Generator().manual_seed(7)
    batch = [{"image": torch.randint(0, 256, (3, 64, 64), generator=g, dtype=torch.uint8), "height": 64, "width": 64,
              "sem_seg": torch.randint(0, K, (64, 64), generator=g)} for _ in range(2)]
    losses = model(batch)
    assert {"loss_ce", "loss_dtop_aux1", "loss_dtop_aux2"} <= set(losses)
    sum(losses.values()).backward()
    for name in ("layer1", "layer2"):
        assert model.token_reducer.heads[name][1].weight.grad.abs().sum() > 0
    assert not model.token_reducer.sharing.policy.training
    assert all(p.grad is None for p in model.token_reducer.sharing.policy.parameters())
    after = model.token_reducer.sharing.policy.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_step_needs_a_token_wise_head():
    with pytest.raises(ValueError, match="token-wise head"):
        tiny_segmenter(*_opts("STEP"), *SETR)


@pytest.mark.parametrize("path,layers,setting,depth", [
    ("ade20k/semantic-segmentation/step/step_18_tau-6899_segvit_vit_large_atm_640_bs4_160k.yaml", [18], "tau-6899", 24),
    ("ade20k/semantic-segmentation/step/step_18_tau-4999_segvit_vit_large_atm_640_bs4_160k.yaml", [18], "tau-4999", 24),
    ("ade20k/semantic-segmentation/step/step_8_16_tau-6899_segvit_vit_large_atm_640_bs4_160k.yaml", [8, 16], "tau-6899", 24),
    ("ade20k/semantic-segmentation/step/step_9_tau-6899_segvit_vit_base_atm_bs4_160k.yaml", [9], "tau-6899", 12),
    ("ade20k/semantic-segmentation/step/step_6_8_tau-6899_segvit_vit_base_atm_bs4_160k.yaml", [6, 8], "tau-6899", 12),
    ("ade20k/semantic-segmentation/step/step_9_tau-6899_vit_small_mask_bs8_160k.yaml", [9], "tau-6899", 12),
    ("coco_stuff/semantic-segmentation/step/step_18_tau-6899_segvit_vit_large_atm_512_bs4_80k.yaml", [18], "tau-6899", 24),
    ("coco_stuff/semantic-segmentation/step/step_8_16_tau-4999_segvit_vit_large_atm_512_bs4_80k.yaml", [8, 16], "tau-4999", 24),
])
def test_shipped_configs(path, layers, setting, depth):
    cfg = setup_cfg(str(REPO / "configs" / path))
    tr = cfg.MODEL.TOKEN_REDUCTION
    assert tr.NAME == "STEP" and list(tr.DTOP.PRUNE_LAYERS) == layers and tr.DCTS.SETTING == setting
    assert cfg.MODEL.VIT.DEPTH == depth and list(cfg.MODEL.POLICY.WINDOW_SIZES) == [2, 4, 8, 16]
    assert list(tr.DCTS.WINDOW_SIZES) == [2, 4, 8, 16] and tr.DTOP.TOP_K_PER_CLASS == 5
    assert cfg.MODEL.TOKEN_SHARING.POLICY_WEIGHTS and cfg.MODEL.TOKEN_SHARING.POLICY_CONFIG
    policy = setup_cfg(str(REPO / cfg.MODEL.TOKEN_SHARING.POLICY_CONFIG))
    assert policy.MODEL.META_ARCHITECTURE == "TokenSharingPolicy" and list(policy.MODEL.POLICY.WINDOW_SIZES) == [2, 4, 8, 16]


def test_step_on_the_segvit_atm_base_shares_prunes_and_matches_single_images():
    from test_dtop import ATM

    model = tiny_segmenter(*_opts("STEP"), *ATM, seed=1)
    with torch.no_grad():
        for head in model.token_reducer.heads.values():
            head[1].weight.mul_(40.0)
        x = _batch()
        scores, reduced = model.reduced_network(x)
        records = reduced.state.cost
        assert any(sum(r["shared"]) for r in records) and any(sum(r["pruned"]) for r in records)
        assert scores.min().item() >= 0.0  # SegViT's scores: probabilities, finalised cells too
        for b in range(x.shape[0]):
            alone, _ = model.reduced_network(x[b : b + 1])
            assert (alone[0] - scores[b]).abs().max().item() <= 1e-5


def test_the_tiny_config_fine_tunes_through_the_trainer_from_a_dtop_checkpoint(tiny_datasets, tmp_path):
    """configs/synthetic/step_tiny_cpu.yaml, a few iterations of train_net.py's path, initialised
    from a DToP checkpoint (its heads load as they are), the policy from its own file, frozen."""
    import json

    from eco_m2f.architectures import build_model
    from eco_m2f.engine import default_argument_parser, main

    policy_cfg = REPO / "configs/synthetic/cts_policy_dcts_tiny_cpu.yaml"
    torch.manual_seed(3)
    policy = build_model(setup_cfg(str(policy_cfg), ["MODEL.BACKBONE.PRETRAINED", "False"]))
    policy_path = tmp_path / "policy.pth"
    torch.save({"model": policy.state_dict()}, policy_path)
    sizes = ["MODEL.VIT.IMG_SIZE", "64", "MODEL.SEM_SEG_HEAD.NUM_CLASSES", "8"]
    dtop = build_model(setup_cfg(str(REPO / "configs/synthetic/dtop_tiny_cpu.yaml"), ["MODEL.WEIGHTS", "", *sizes]))
    dtop_path = tmp_path / "dtop.pth"
    torch.save({"model": dtop.state_dict()}, dtop_path)
    out = tmp_path / "step"
    opts = ["--config-file", str(REPO / "configs/synthetic/step_tiny_cpu.yaml"), "MODEL.WEIGHTS", str(dtop_path),
            "MODEL.TOKEN_SHARING.POLICY_WEIGHTS", str(policy_path), "MODEL.TOKEN_SHARING.POLICY_CONFIG", str(policy_cfg),
            "DATASETS.TRAIN", "('synthetic_panoptic_train',)", "DATASETS.TEST", "()",
            "INPUT.DATASET_MAPPER_NAME", "mask_former_semantic", *sizes,
            "INPUT.MIN_SIZE_TRAIN", "(64,)", "INPUT.MIN_SIZE_TRAIN_SAMPLING", "choice", "INPUT.MAX_SIZE_TRAIN", "64",
            "INPUT.CROP.ENABLED", "False", "INPUT.SIZE_DIVISIBILITY", "-1", "MODEL.TOKEN_REDUCTION.DTOP.THETA", "0.3",
            "SOLVER.MAX_ITER", "3", "SOLVER.CHECKPOINT_PERIOD", "1000", "LOG_PERIOD", "1", "OUTPUT_DIR", str(out)]
    main(default_argument_parser().parse_args(opts))
    rows = [json.loads(line) for line in (out / "metrics.json").read_text().splitlines() if line.strip()]
    rows = [r for r in rows if "total_loss" in r]
    assert len(rows) == 3 and {"loss_dtop_aux1", "loss_dtop_aux2"} <= set(rows[-1])
    trained = torch.load(out / "model_final.pth", weights_only=False)["model"]
    for k, v in policy.state_dict().items():
        assert torch.equal(trained[f"token_reducer.sharing.policy.{k}"].cpu(), v), k
    assert not torch.equal(trained["token_reducer.heads.layer1.1.weight"].cpu(), dtop.state_dict()["token_reducer.heads.layer1.1.weight"])


def test_the_profile_script_times_dense_and_each_setting(tmp_path):
    """scripts/profile_token_reduction.py on the CPU (--tiny): one row per model, latency per batch size."""
    import json
    import subprocess

    out = tmp_path / "profile.json"
    cmd = [sys.executable, str(REPO / "scripts/profile_token_reduction.py"), "--device", "cpu", "--tiny", "--batch", "2", "1",
           "--host", "5", "--json", str(out), "--setting", "cts-S", "MODEL.TOKEN_REDUCTION.NAME", "CTS",
           "--setting", "step", "MODEL.TOKEN_REDUCTION.NAME", "STEP", "MODEL.TOKEN_REDUCTION.DTOP.PRUNE_LAYERS", "[1, 2]",
           "MODEL.TOKEN_REDUCTION.DCTS.SETTING", "", "MODEL.TOKEN_REDUCTION.DCTS.THRESHOLDS", "[0.4, 0.9, 0.9, 0.9]"]
    done = subprocess.run(cmd, check=True, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.stdout.count("host time of 5 passes") == 3 and "tottime" in done.stdout  # --host: one cProfile table per model
    rows = json.loads(out.read_text())["rows"]
    assert [r["name"] for r in rows] == ["dense", "cts-S", "step"]
    assert all(r[f"b{b}"]["ms"] > 0 and r[f"b{b}"]["img/s"] > 0 for r in rows for b in (2, 1))
    bad = subprocess.run(cmd[:7] + ["--setting", "dense", "KEY", "VALUE"], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert bad.returncode != 0 and "setting names must be distinct" in bad.stderr
    gaps = subprocess.run(cmd[:7] + ["--gaps", "5"], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert gaps.returncode != 0 and "need --device cuda" in gaps.stderr  # not silently left out on the CPU


@pytest.mark.gpu
def test_the_profile_script_times_the_dense_model_as_one_cuda_graph_too(tmp_path):
    """On CUDA the profile has the dense rows eager, as one CUDA graph and with flash attention."""
    import json
    import subprocess

    out = tmp_path / "profile.json"
    cmd = [sys.executable, str(REPO / "scripts/profile_token_reduction.py"), "--tiny", "--batch", "2", "1",
           "--json", str(out), "--setting", "cts-S", "MODEL.TOKEN_REDUCTION.NAME", "CTS"]
    subprocess.run(cmd, check=True, cwd=REPO, capture_output=True, text=True, timeout=600)
    rows = json.loads(out.read_text())["rows"]
    assert [r["name"] for r in rows] == ["dense", "dense, one CUDA graph", "dense, flash attention", "cts-S"]
    assert all(r[f"b{b}"]["ms"] > 0 for r in rows for b in (2, 1))
