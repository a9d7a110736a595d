"""The ECO-M2F trends stage of scripts/synthetic_experiments.sh, end to end on tiny CPU models:
every table it promises is written, and a rerun keeps the finished steps."""
from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import TINY_OPTS

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_the_trends_stage_writes_every_table_and_resumes(tmp_path):
    env = dict(os.environ, PYTHON=sys.executable, NTRAIN="10", NVAL="4", SIZE="64", ITERS="3", STEPA_ITERS="2", CKPT="2",
               BETAS="0.001", TREND_BETA="0.001", TREND_KS="4", TREND_LOSSES="soft-CE", WALL_BATCHES="2 1", WALL_DTYPE="fp32",
               CONFIG="configs/synthetic/maskformer2_tiny_cpu.yaml", ECO_CONFIG="configs/synthetic/eco_m2f_tiny_cpu.yaml",
               EXTRA=" ".join(TINY_OPTS), OMP_NUM_THREADS="1", PARALLEL="1")
    env.pop("DETECTRON2_DATASETS", None)  # the stage generates its own (hard) dataset under OUT
    out = tmp_path / "trends"
    cmd = ["bash", str(REPO / "scripts" / "synthetic_experiments.sh"), "trends", str(out)]
    first = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=800)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]

    info = json.loads((out / "datasets" / "synthetic" / "synthetic_info.json").read_text())
    assert info["preset"] == "hard"
    for name in ("baseline_exits", "stepA_wsd_exits", "stepA_usd_exits"):
        assert (out / f"{name}.json").is_file(), name
    assert "ALPHA: uniform" in (out / "stepA_usd" / "config.yaml").read_text()
    complexity = json.loads((out / "exit_complexity.json").read_text())
    assert [c["field"] for c in complexity] == ["objects", "occluded_fraction", "boundary_fraction"]
    assert sum(b["images"] for b in complexity[0]["buckets"]) == 10
    with open(out / "derived" / "sweep" / "sweep.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["kind"] for r in rows] == ["fixed"] * 5 + ["gated"] and rows[0]["PQ_th"] != ""
    assert (out / "derived" / "sweep_k4" / "sweep.csv").is_file() and (out / "derived" / "gate_beta0.001_k4").is_dir()
    assert (out / "derived" / "gate_beta0.001_k6_soft-CE" / "gate.pth").is_file()
    # PARALLEL=1: the two step-A runs and the two extra sweeps ran side by side, each logging to its folder
    assert "Starting training" in (out / "stepA_usd" / "stdout.log").read_text()
    assert (out / "derived" / "sweep_k4" / "stdout.log").is_file()
    for e in ("gated", "2", "6"):
        timings = json.loads((out / f"wall_time_{e}.json").read_text())
        assert [t["batch"] for t in timings] == [2, 1] and all(t["images_per_s"] > 0 for t in timings)
    report = (out / "trends_report.md").read_text()  # the stage ends with the tables of all of it
    for heading in ("Table 5: PQ at", "Step B: best exit of the 10 training images", "Fig. 5 / Table 3", "Table 4: K_user at beta 0.001",
                    "Table T2: gate losses at beta 0.001", "Wall time"):
        assert heading in report, heading
    assert "| K_user 4 |" in report and "| soft-CE |" in report and (out / "trends_report.png").is_file()

    again = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=800)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert "kept the finished run in" in again.stdout and f"kept {out}/stepA_wsd_exits.json" in again.stdout
    assert "Starting training" not in again.stdout + again.stderr
