"""ECO-M2F step C: gate module, Table T2 losses, gate training, the train_gate.sh CLI and the beta sweep."""
from __future__ import annotations

import csv
import hashlib
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from eco_m2f.checkpoint import load_state_dict_file, save_checkpoint
from eco_m2f.config import setup_cfg
from eco_m2f.eco.gate import ExitGate, load_gate_checkpoint
from eco_m2f.eco.gate_training import extract_features, features_for_records, split_indices, train_gate
from eco_m2f.eco.gate_losses import GATE_LOSSES, get_gate_loss, hard_ce, soft_ce, soft_mse, u_ce
from eco_m2f.eco.records import RecordWriter, write_meta
from eco_m2f.eco.step_c import run_step_c
from eco_m2f.eco.sweep import parse_results_json, run_sweep, subprocess_evaluate_fn

REPO = Path(__file__).resolve().parents[1]
CONFIG = str(REPO / "configs" / "synthetic" / "maskformer2_tiny_cpu.yaml")
EXITS = [2, 3, 4, 5, 6]
C = 8


# ------------------------------------------------------------------------------------------- losses
def test_losses_equal_their_formulas_by_hand():
    # Row 1: softmax(g) = [1/4, 3/4]; row 2: softmax(g) = [1/2, 1/2].
    g = torch.tensor([[0.0, math.log(3.0)], [0.0, 0.0]])
    target = torch.tensor([0, 1])
    l4, l34, l2 = math.log(0.25), math.log(0.75), math.log(0.5)
    # hard-CE: -log softmax(g)_t
    assert hard_ce(g, torch.zeros(2, 2), target).item() == pytest.approx((-l4 - l2) / 2, abs=1e-6)
    # u-CE: -sum_k u_k log softmax(g)_k with raw utilities
    u = torch.tensor([[0.3, 0.1], [1.0, 0.0]])
    want = (-(0.3 * l4 + 0.1 * l34) - (1.0 * l2)) / 2  # = (0.4446565 + 0.6931472) / 2
    assert u_ce(g, u, target).item() == pytest.approx(want, abs=1e-6)
    assert want == pytest.approx((0.4446565 + 0.6931472) / 2, abs=1e-6)
    # soft-CE / soft-MSE with softmax(u) = [0.2, 0.8] and [0.5, 0.5]
    u = torch.tensor([[0.0, math.log(4.0)], [0.0, 0.0]])
    want = (-(0.2 * l4 + 0.8 * l34) - l2) / 2  # = (0.5074046 + 0.6931472) / 2
    assert soft_ce(g, u, target).item() == pytest.approx(want, abs=1e-6)
    want = ((0.2 - 0.25) ** 2 + (0.8 - 0.75) ** 2 + 0.0) / 2  # = 0.0025
    assert soft_mse(g, u, target).item() == pytest.approx(want, abs=1e-7)
    assert want == pytest.approx(0.0025)


def test_loss_registry_names():
    assert sorted(GATE_LOSSES) == sorted(["hard-CE", "u-CE", "soft-CE", "soft-MSE"])
    assert get_gate_loss("soft-CE") is soft_ce
    with pytest.raises(ValueError, match="MODEL.ECO.GATE.LOSS 'ce'.*hard-CE"):
        get_gate_loss("ce")


# --------------------------------------------------------------------------------------------- gate
def test_gate_shapes_pool_and_choose():
    gate = ExitGate(4, [2, 3, 4])
    assert set(gate.state_dict()) == {"linear.weight", "linear.bias", "exits"}
    s1 = torch.arange(2 * 4 * 3 * 5, dtype=torch.float32).view(2, 4, 3, 5)
    z = ExitGate.pool(s1)
    assert z.shape == (2, 4)
    torch.testing.assert_close(z, s1.mean(dim=(2, 3)))
    valid = torch.zeros(2, 3, 5, dtype=torch.bool)
    valid[0] = True
    valid[1, :2, :3] = True  # image 2 is padded: only its top-left 2x3 tokens are its own
    zv = ExitGate.pool(s1, valid)
    torch.testing.assert_close(zv[0], z[0])
    torch.testing.assert_close(zv[1], s1[1, :, :2, :3].mean(dim=(1, 2)))
    with torch.no_grad():
        gate.linear.weight.zero_()
        gate.linear.bias.copy_(torch.tensor([0.0, 1.0, 0.5]))
    assert gate(z).shape == (2, 3)
    assert gate.choose(z).tolist() == [3, 3]  # argmax index 1 -> exit 3
    with torch.no_grad():
        gate.linear.weight[2, 0] = 1.0  # logit of exit 4 grows with z[:, 0]
    assert gate.choose(torch.tensor([[0.0, 0, 0, 0], [2.0, 0, 0, 0]])).tolist() == [3, 4]
    with pytest.raises(ValueError, match=r"\[B, C, H, W\]"):
        ExitGate.pool(torch.zeros(2, 4))
    with pytest.raises(ValueError, match=r"\[B, 4\]"):
        gate(torch.zeros(2, 5))


def test_gate_state_dict_carries_exits_and_rejects_others():
    class Host(torch.nn.Module):
        def __init__(self, exits):
            super().__init__()
            self.gate = ExitGate(C, exits)

    src = Host([2, 3, 4])
    sd = src.state_dict()
    assert set(sd) == {"gate.linear.weight", "gate.linear.bias", "gate.exits"}
    dst = Host([2, 3, 4])
    dst.load_state_dict(sd)
    torch.testing.assert_close(dst.gate.linear.weight, src.gate.linear.weight)
    other = Host([3, 4, 5])  # same shapes, different exits: must not load silently
    with pytest.raises(RuntimeError, match=r"trained for exits \[2, 3, 4\] but this gate has exits \[3, 4, 5\]"):
        other.load_state_dict(sd)


# ----------------------------------------------------------------------------------------- training
def synthetic_records(n: int, seed: int = 0, with_feature: bool = True):
    """Records whose best exit is a class readable from the feature (separable)."""
    rng = np.random.default_rng(seed)
    records = []
    for i in range(n):
        c = int(rng.integers(len(EXITS)))
        feat = np.zeros(C)
        feat[c] = 3.0
        feat += rng.normal(scale=0.3, size=C)
        pq = [0.5 + (0.3 if j == c else 0.0) + float(rng.uniform(0, 0.05)) for j in range(len(EXITS))]
        rec = {"image_id": i, "file_name": f"{i:04d}.png", "exits": EXITS, "pq": pq, "sq": pq, "rq": pq}
        if with_feature:
            rec["feature"] = [float(x) for x in feat]
        records.append(rec)
    return records


def test_split_is_deterministic_and_order_free():
    ids = list(range(50))
    tr, va = split_indices(ids, 0.2, seed=3)
    assert len(va) == 10 and len(tr) == 40 and not set(tr) & set(va)
    tr2, va2 = split_indices(ids, 0.2, seed=3)
    assert tr.tolist() == tr2.tolist() and va.tolist() == va2.tolist()
    rev = ids[::-1]  # same images, another order: the same images are held out
    _, va_rev = split_indices(rev, 0.2, seed=3)
    assert sorted(rev[i] for i in va_rev) == sorted(ids[i] for i in va)
    assert split_indices(ids, 0.2, seed=4)[1].tolist() != va.tolist()
    assert len(split_indices([1, 2], 0.01, 0)[1]) == 1  # at least one held out
    with pytest.raises(ValueError, match="VAL_FRACTION"):
        split_indices(ids, 1.0, 0)


def test_hard_ce_learns_separable_targets():
    records = synthetic_records(400)
    res = train_gate(records, beta=0.0, k_user=6, exits=EXITS, epochs=15, lr=0.05, batch_size=32,
                     val_fraction=0.2, seed=0)
    m = res.metrics
    assert m["heldout"]["num_images"] == 80 and m["train"]["num_images"] == 320
    assert m["heldout"]["accuracy"] >= 0.95
    assert sum(m["train"]["target_histogram"].values()) == 320
    # The gate's choices are near the oracle and better than always running full depth.
    assert m["heldout"]["pq_gate"] > m["heldout"]["pq_full_depth"] + 0.1
    assert m["heldout"]["pq_gate"] == pytest.approx(m["heldout"]["pq_oracle"], abs=0.02)
    assert m["heldout"]["layers_full_depth"] == 6
    assert res.gate.exit_list == EXITS
    # Same seed, same gate.
    res2 = train_gate(records, beta=0.0, k_user=6, exits=EXITS, epochs=15, lr=0.05, batch_size=32,
                      val_fraction=0.2, seed=0)
    torch.testing.assert_close(res.gate.linear.weight, res2.gate.linear.weight)


def test_k_user_beta_and_other_losses_train():
    records = synthetic_records(120)
    res = train_gate(records, beta=0.0, k_user=4, exits=EXITS, epochs=5, lr=0.05, batch_size=32, seed=0)
    assert res.exits == [2, 3, 4] and res.gate.linear.out_features == 3
    assert set(res.metrics["train"]["target_histogram"]) == {2, 3, 4}
    big_beta = train_gate(records, beta=1.0, k_user=6, exits=EXITS, epochs=5, lr=0.05, seed=0)
    assert big_beta.metrics["train"]["target_histogram"][2] == big_beta.metrics["train"]["num_images"]
    for name in GATE_LOSSES:
        r = train_gate(records, beta=0.001, k_user=6, exits=EXITS, loss=name, epochs=3, lr=0.01, seed=0)
        assert np.isfinite(r.metrics["final_train_loss"]) and r.loss == name


def test_train_gate_needs_features():
    records = synthetic_records(20, with_feature=False)
    with pytest.raises(ValueError, match="no 'feature'"):
        train_gate(records, 0.0, 6, EXITS, epochs=1)
    feats = np.random.default_rng(0).normal(size=(20, C)).astype(np.float32)
    res = train_gate(records, 0.0, 6, EXITS, epochs=1, features=feats)
    assert res.metrics["feature_dim"] == C


def test_extract_features_runs_the_callable_over_a_loader():
    loader = [[{"image_id": i, "v": float(i)} for i in range(b, b + 3)] for b in (0, 3, 6)]
    calls = []

    def gate_input(batch):
        calls.append([x["image_id"] for x in batch])
        return torch.tensor([[x["v"], -x["v"]] for x in batch])

    fmap = extract_features(gate_input, loader, progress=False)
    assert sorted(fmap) == list(range(9)) and fmap[4].tolist() == [4.0, -4.0]
    calls.clear()
    fmap = extract_features(gate_input, loader, image_ids=[1, 2], progress=False)
    assert calls == [[1, 2]] and sorted(fmap) == [1, 2]  # unneeded images are not run; stops early
    feats = features_for_records([{"image_id": 2}, {"image_id": 1}], fmap)
    assert feats.tolist() == [[2.0, -2.0], [1.0, -1.0]]
    with pytest.raises(ValueError, match=r"image ids \[7\]"):
        features_for_records([{"image_id": 7}], fmap)
    with pytest.raises(ValueError, match="Tensor"):
        extract_features(lambda b: torch.zeros(5), loader, progress=False)


# ------------------------------------------------------------------------------------ step C files
def make_derived(root: Path, n: int = 60, with_feature: bool = True) -> Path:
    derived = root / "derived"
    weights = root / "step_a.pth"
    save_checkpoint(weights, {"backbone.w": torch.arange(6.0).view(2, 3),
                              "gate.linear.weight": torch.zeros(1, 1)})  # a stale gate gets replaced
    write_meta(derived, {"config_file": CONFIG, "weights": str(weights), "dataset": "synthetic_panoptic_train",
                         "exits": EXITS, "feature_dim": C, "pq_scale": "per-image PQ in [0, 1]"})
    records = synthetic_records(n, with_feature=with_feature)
    for rank in range(2):
        with RecordWriter(derived, rank, 2) as w:
            for r in records[rank::2]:
                w.append(r)
    return derived


def digest(folder: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            h.update(p.name.encode() + p.read_bytes())
    return h.hexdigest()


def test_train_gate_sh_end_to_end(tmp_path):
    derived = make_derived(tmp_path)
    records_digest = digest(derived / "records")
    env = {**os.environ, "PYTHON": sys.executable}
    script = str(REPO / "scripts" / "train_gate.sh")
    proc = subprocess.run(
        ["bash", script, CONFIG, str(derived), "0.001", "4", "MODEL.ECO.GATE.EPOCHS", "20",
         "MODEL.ECO.GATE.LR", "0.05"],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    assert "Target exits, train" in out and "Target exits, held-out" in out
    assert "exit  2 |" in out and "exit  4 |" in out and "exit  5 |" not in out
    assert "gate accuracy" in out and "step C wall time" in out

    gate_dir = derived / "gate_beta0.001_k4"
    for name in ("gate.pth", "metrics.json", "model_gated.pth", "config.yaml"):
        assert (gate_dir / name).is_file(), name
    assert f"wrote model: {gate_dir.resolve() / 'model_gated.pth'}" in out

    sd, info = load_gate_checkpoint(str(gate_dir / "gate.pth"))
    assert info["exits"] == [2, 3, 4] and info["beta"] == 0.001 and info["k_user"] == 4
    assert info["loss"] == "hard-CE" and info["metrics"]["epochs"] == 20
    gate = ExitGate(C, info["exits"])
    gate.load_state_dict(sd)  # round trip

    model_sd = load_state_dict_file(gate_dir / "model_gated.pth")
    assert set(model_sd) == {"backbone.w", "gate.linear.weight", "gate.linear.bias", "gate.exits"}
    torch.testing.assert_close(model_sd["backbone.w"], torch.arange(6.0).view(2, 3))
    torch.testing.assert_close(model_sd["gate.linear.weight"], sd["linear.weight"])
    assert model_sd["gate.exits"].tolist() == [2, 3, 4]

    cfg = setup_cfg(str(gate_dir / "config.yaml"))
    assert cfg.MODEL.ECO.GATE.ENABLED is True and cfg.MODEL.ECO.GATE.K_USER == 4
    assert cfg.MODEL.ECO.GATE.BETA == pytest.approx(0.001)
    assert cfg.MODEL.WEIGHTS == str(gate_dir.resolve() / "model_gated.pth")
    assert cfg.MODEL.ECO.GATE.EPOCHS == 20 and cfg.OUTPUT_DIR == str(gate_dir.resolve())
    assert cfg.DATASETS.TEST == ("synthetic_panoptic_val",)

    metrics = json.loads((gate_dir / "metrics.json").read_text())
    assert metrics["num_records"] == 60 and metrics["heldout"]["num_images"] == 6
    assert metrics["timings"]["total_seconds"] > 0

    # A second beta, K_USER from the config, and a KEY VALUE right after BETA (not taken for K_USER).
    proc = subprocess.run(
        ["bash", script, CONFIG, str(derived), "0.01", "MODEL.ECO.GATE.LOSS", "soft-CE",
         "MODEL.ECO.GATE.EPOCHS", "5"],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "loss=soft-CE" in proc.stdout and "K_USER=6" in proc.stdout
    _, info = load_gate_checkpoint(str(derived / "gate_beta0.01_k6_soft-CE" / "gate.pth"))  # its loss in the name
    assert info["exits"] == EXITS and info["loss"] == "soft-CE"
    assert digest(derived / "records") == records_digest  # records reused, untouched
    assert (gate_dir / "gate.pth").is_file()  # the first gate is still there


def test_step_c_without_cached_features_uses_the_callable_once(tmp_path):
    derived = make_derived(tmp_path, n=30, with_feature=False)
    feats = {r["image_id"]: np.asarray(r["feature"], dtype=np.float32) for r in synthetic_records(30)}
    calls = []

    def source(cfg, weights, dataset):
        calls.append((weights, dataset))
        loader = [[{"image_id": i} for i in range(b, min(b + 4, 40))] for b in range(0, 40, 4)]
        return (lambda batch: torch.from_numpy(np.stack([feats.get(x["image_id"], np.zeros(C, np.float32))
                                                         for x in batch]))), loader

    opts = ["MODEL.ECO.GATE.EPOCHS", "3"]
    out = run_step_c(CONFIG, derived, 0.002, k_user=5, opts=opts, feature_source=source)
    assert len(calls) == 1 and calls[0][1] == "synthetic_panoptic_train"
    assert calls[0][0] == str((tmp_path / "step_a.pth").resolve())
    assert out.result.exits == [2, 3, 4, 5] and (derived / "gate_features.npz").is_file()
    out2 = run_step_c(CONFIG, derived, 0.004, k_user=5, opts=opts, feature_source=source)
    assert len(calls) == 1  # cached features reused
    assert out2.output_dir.name == "gate_beta0.004_k5"
    assert out.timings["feature_seconds"] >= 0 and out2.timings["feature_seconds"] == 0


def test_step_c_without_readable_weights_points_config_at_gate(tmp_path):
    derived = make_derived(tmp_path, n=20)
    (tmp_path / "step_a.pth").unlink()
    out = run_step_c(CONFIG, derived, 0.001, opts=["MODEL.ECO.GATE.EPOCHS", "2"])
    assert "model" not in out.paths and not (out.output_dir / "model_gated.pth").exists()
    cfg = setup_cfg(str(out.paths["config"]))
    assert cfg.MODEL.ECO.GATE.WEIGHTS == str(out.paths["gate"])
    assert cfg.MODEL.WEIGHTS == str(tmp_path / "step_a.pth")


# -------------------------------------------------------------------------------------------- sweep
def test_sweep_with_fake_evaluation(tmp_path):
    derived = make_derived(tmp_path, n=40)
    seen = []

    def evaluate(overrides):
        seen.append(overrides)
        cfg = setup_cfg(CONFIG, overrides)
        if cfg.MODEL.ECO.GATE.ENABLED:
            assert cfg.MODEL.WEIGHTS.endswith("model_gated.pth") and cfg.TEST.ECO.EXIT == 0
            return {"PQ": 50.0 - 100 * cfg.MODEL.ECO.GATE.BETA, "gflops_encoder": 20.0, "gflops": 80.0, "exit_mean": 3.5}
        k = cfg.TEST.ECO.EXIT
        return {"PQ": 40.0 + k, "PQ_th": 30.0 + k, "PQ_st": 50.0 + k, "gflops_encoder": 5.0 * k, "gflops": 60.0 + 5.0 * k}

    res = run_sweep(CONFIG, derived, [0.001, 0.01], evaluate, opts=["MODEL.ECO.GATE.EPOCHS", "2"],
                    output_dir=tmp_path / "sweep", log=lambda s: None)
    with open(res["paths"]["csv"], newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["kind", "exit_or_beta", "PQ", "PQ_th", "PQ_st", "mean_exit", "encoder_gflops", "total_gflops"]
    assert float(rows[0]["PQ_th"]) == 32.0 and float(rows[0]["mean_exit"]) == 2.0
    assert rows[6]["PQ_th"] == "" and float(rows[6]["mean_exit"]) == 3.5  # the things split not reported: empty
    assert [(r["kind"], r["exit_or_beta"]) for r in rows] == (
        [("fixed", str(k)) for k in EXITS] + [("gated", "0.001"), ("gated", "0.01")])
    assert float(rows[0]["PQ"]) == 42.0 and float(rows[4]["encoder_gflops"]) == 30.0
    assert float(rows[6]["PQ"]) == pytest.approx(49.0) and float(rows[6]["total_gflops"]) == 80.0
    png = res["paths"]["png"]
    assert png.is_file() and png.stat().st_size > 1000 and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (derived / "gate_beta0.01_k6" / "model_gated.pth").is_file()
    fixed_weights = setup_cfg(CONFIG, seen[0]).MODEL.WEIGHTS
    assert fixed_weights == str((tmp_path / "step_a.pth").resolve())
    details = json.loads(res["paths"]["json"].read_text())
    assert details[-1]["gate_dir"].endswith("gate_beta0.01_k6") and "heldout_accuracy" in details[-1]


def test_results_json_parsing_and_subprocess_evaluate(tmp_path):
    path = tmp_path / "results.json"
    path.write_text(json.dumps({"panoptic_seg": {"PQ": 41.5, "SQ": 70.0},
                                "cost": {"gflops_encoder": 12.5, "gflops": 90.0, "exit_histogram": {"2": 3}}}))
    assert parse_results_json(path) == {"PQ": 41.5, "PQ_th": None, "PQ_st": None, "gflops_encoder": 12.5, "gflops": 90.0,
                                        "exit_mean": None, "exit_histogram": {"2": 3}}
    path.write_text(json.dumps({"panoptic_seg": {"PQ": 41.5, "PQ_th": 20.0, "PQ_st": 60.0},
                                "cost": {"gflops_encoder": 12.5, "gflops": 90.0, "exit_mean": 2.5}}))
    parsed = parse_results_json(path)
    assert (parsed["PQ_th"], parsed["PQ_st"], parsed["exit_mean"]) == (20.0, 60.0, 2.5)
    path.write_text(json.dumps({"panoptic_seg": {"PQ": 41.5}}))
    with pytest.raises(KeyError, match="cost.gflops_encoder"):
        parse_results_json(path)

    # A stand-in for `python train_net.py --eval-only ...` that writes results.json where evaluation would.
    fake = tmp_path / "fake_python"
    fake.write_text(
        f"#!{sys.executable}\n"
        "import json, os, sys\n"
        "args = sys.argv[1:]\n"
        "assert args[0].endswith('train_net.py') and args[1] == '--eval-only', args\n"
        "out = args[args.index('OUTPUT_DIR') + 1]\n"
        "d = os.path.join(out, 'inference', 'synthetic_panoptic_val'); os.makedirs(d, exist_ok=True)\n"
        "k = int(args[args.index('TEST.ECO.EXIT') + 1])\n"
        "json.dump({'panoptic_seg': {'PQ': 30.0 + k}, 'cost': {'gflops_encoder': k, 'gflops': 50 + k}},"
        " open(os.path.join(d, 'results.json'), 'w'))\n"
    )
    fake.chmod(0o755)
    evaluate = subprocess_evaluate_fn(CONFIG, REPO, python=str(fake))
    res = evaluate(["TEST.ECO.EXIT", "3", "OUTPUT_DIR", str(tmp_path / "ev")])
    assert res["PQ"] == 33.0 and res["gflops_encoder"] == 3.0 and res["gflops"] == 53.0


def test_a_gate_of_another_loss_gets_its_own_directory(tmp_path):
    derived = make_derived(tmp_path, n=20)
    plain = run_step_c(CONFIG, derived, 0.002, opts=["MODEL.ECO.GATE.EPOCHS", "2"])
    soft = run_step_c(CONFIG, derived, 0.002, opts=["MODEL.ECO.GATE.EPOCHS", "2", "MODEL.ECO.GATE.LOSS", "soft-CE"])
    assert plain.output_dir.name == "gate_beta0.002_k6" and soft.output_dir.name == "gate_beta0.002_k6_soft-CE"
    assert (plain.output_dir / "gate.pth").is_file() and (soft.output_dir / "gate.pth").is_file()
    assert setup_cfg(str(soft.paths["config"])).MODEL.ECO.GATE.LOSS == "soft-CE"


def test_sweep_beta_script_prints_the_things_split_and_mean_exit(tmp_path, monkeypatch, capsys):
    import importlib.util

    spec = importlib.util.spec_from_file_location("sweep_beta", Path(__file__).resolve().parents[1] / "scripts" / "sweep_beta.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    derived = make_derived(tmp_path, n=20)

    def evaluate(overrides):
        cfg = setup_cfg(CONFIG, overrides)
        if cfg.MODEL.ECO.GATE.ENABLED:
            return {"PQ": 45.0, "gflops_encoder": 10.0, "gflops": 70.0, "exit_mean": 3.25}
        return {"PQ": 40.0, "PQ_th": 20.0, "PQ_st": 60.0, "gflops_encoder": 5.0, "gflops": 60.0}

    monkeypatch.setattr(mod, "results_evaluate_fn", lambda *a, **k: evaluate)
    assert mod.main(["--config-file", CONFIG, "--derived", str(derived), "--betas", "0.001",
                     "--output-dir", str(tmp_path / "sweep"), "MODEL.ECO.GATE.EPOCHS", "2"]) == 0
    lines = capsys.readouterr().out.splitlines()
    header = next(line for line in lines if line.startswith("kind"))
    assert header.split()[:6] == ["kind", "exit/beta", "PQ", "PQ_th", "PQ_st", "mean"]
    gated = next(line.split() for line in lines if line.split()[:2] == ["gated", "0.001"])  # the table, not the log
    assert gated[:6] == ["gated", "0.001", "45.00", "-", "-", "3.25"]
    fixed = next(line.split() for line in lines if line.split()[:2] == ["fixed", "2"])
    assert fixed[3:6] == ["20.00", "60.00", "2.00"]
