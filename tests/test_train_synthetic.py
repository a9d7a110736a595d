"""The real tiny Mask2Former trains on the synthetic dataset through train_net.py on CPU."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import TINY_OPTS

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs/synthetic/maskformer2_tiny_cpu.yaml"


def _losses(metrics: Path):
    rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    return [r["total_loss"] for r in rows if "total_loss" in r]


@pytest.mark.slow
def test_tiny_config_loss_falls_and_eval_runs(tiny_datasets, tmp_path):
    out = tmp_path / "run"
    cmd = [
        sys.executable, str(REPO / "train_net.py"), "--config-file", str(TINY),
        *TINY_OPTS,
        "SOLVER.MAX_ITER", "40", "SOLVER.IMS_PER_BATCH", "4", "SOLVER.BASE_LR", "0.0005",
        "SOLVER.CHECKPOINT_PERIOD", "20", "LOG_PERIOD", "1", "SEED", "0",
        "OUTPUT_DIR", str(out),
    ]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=1200,
                          env={**__import__("os").environ, "DETECTRON2_DATASETS": str(tiny_datasets)})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    losses = _losses(out / "metrics.json")
    assert len(losses) >= 30
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < 0.9 * first, f"loss did not fall: first {first:.2f}, last {last:.2f}"
    assert (out / "model_final.pth").is_file()
    results = json.loads((out / "inference" / "synthetic_panoptic_val" / "results.json").read_text())
    assert {"panoptic_seg", "sem_seg", "segm", "cost"} <= set(results)
    assert results["cost"]["num_images"] == 4  # the 4 val images, each counted at full depth
    assert results["cost"]["gflops_encoder"] > 0
