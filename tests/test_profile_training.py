"""scripts/profile_training.py runs the trainer's step on the tiny model and books its phases."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

from conftest import TINY_OPTS

REPO = Path(__file__).resolve().parents[1]


def _script():
    spec = importlib.util.spec_from_file_location("profile_training", REPO / "scripts/profile_training.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_profile_training_books_each_phase(tiny_datasets, tmp_path, capsys):
    out = tmp_path / "profile.json"
    rc = _script().main([
        "--config-file", str(REPO / "configs/synthetic/maskformer2_tiny_cpu.yaml"), "--device", "cpu",
        "--iters", "2", "--warmup", "1", "--top", "5", "--json", str(out),
        *TINY_OPTS, "SOLVER.IMS_PER_BATCH", "2",
    ])
    assert rc == 0
    report = json.loads(out.read_text())
    phases = report["phases_s"]
    for name in ("backbone", "sem_seg_head", "criterion", "backward", "clip + optimizer step"):
        assert phases[name] > 0, (name, phases)
    assert report["plain"]["s_per_iter"] > report["plain"]["loader_wait_s"] >= 0
    # the synchronised phases cover the step: their sum is of the order of the plain step
    assert 0.3 < sum(phases.values()) / report["plain"]["s_per_iter"] < 3.0
    assert len(report["top"]["host"]) == 5 and any(r["op"].startswith("aten::") for r in report["top"]["host"])
    assert "synchronised phases" in capsys.readouterr().out
