"""Every meta-architecture the project registers meets the model contract, end to end on a CPU.

As timm tests every registered model: each ``META_ARCH_REGISTRY`` entry of the package, built
from its tiny config (``tests/tiny_configs.py``), trains a few iterations through
``train_net.py``'s ``main``, evaluates on the tiny synthetic set (its tasks' metrics and the
``"cost"`` record aggregate), loads its own checkpoint strictly, counts its FLOPs and runs
through ``scripts/benchmark.py`` and ``scripts/analyze_model.py``.
"""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from eco_m2f.architectures import build_model
from eco_m2f.checkpoint import load_weights
from eco_m2f.config import setup_cfg
from eco_m2f.engine import default_argument_parser, main
from eco_m2f.evaluation.flops import count_flops
from eco_m2f.modeling.registry import META_ARCH_REGISTRY
from tiny_configs import TINY_CONFIGS, tiny_config_args

REPO = Path(__file__).resolve().parents[1]
# the results task each model task is evaluated under (COCO naming, as Detectron2)
RESULT_TASK = {"sem_seg": "sem_seg", "panoptic_seg": "panoptic_seg", "instances": "segm", "policy": "policy"}


def _script(name: str):
    spec = importlib.util.spec_from_file_location(f"script_{name}", REPO / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_registered_architecture_has_a_tiny_config():
    ours = {name for name, obj in META_ARCH_REGISTRY if getattr(obj, "__module__", "").startswith("eco_m2f.")}
    assert {"MaskFormer", "ECOMaskFormer"} <= ours
    missing = sorted(ours - set(TINY_CONFIGS))
    assert not missing, f"registered meta-architectures without a tiny config in tests/tiny_configs.py: {missing}"
    assert sorted(set(TINY_CONFIGS) - ours) == []
    for name in TINY_CONFIGS:
        config, opts = tiny_config_args(name)
        assert setup_cfg(config, opts).MODEL.META_ARCHITECTURE == name


@pytest.mark.parametrize("name", sorted(TINY_CONFIGS))
def test_architecture_trains_evaluates_counts_and_benchmarks(name, tiny_datasets, tmp_path, capsys):
    config, opts = tiny_config_args(name)
    out = tmp_path / "run"
    run = [*opts, "SOLVER.MAX_ITER", "2", "SOLVER.IMS_PER_BATCH", "2", "SOLVER.CHECKPOINT_PERIOD", "0",
           "TEST.EVAL_PERIOD", "0", "LOG_PERIOD", "1", "SEED", "0", "OUTPUT_DIR", str(out)]
    results = main(default_argument_parser().parse_args(["--config-file", config, *run]))["synthetic_panoptic_val"]

    lines = [json.loads(x) for x in (out / "metrics.json").read_text().splitlines() if x.strip()]
    assert [r["iteration"] for r in lines if "total_loss" in r] == [0, 1]
    model = build_model(setup_cfg(config, opts))
    assert model.tasks and {RESULT_TASK[t] for t in model.tasks} <= set(results)
    cost = results["cost"]
    assert cost["num_images"] == 4 and cost["gflops"] > 0
    scopes = set(model.flop_scopes())
    assert {f"gflops_{s}" for s in scopes} <= set(cost)

    report = load_weights(model, str(out / "model_final.pth"))
    assert not report.missing and not report.unexpected
    gflops = count_flops(model, torch.zeros(1, 3, 64, 64))
    assert set(gflops) == {"total"} | scopes and all(0 < v <= gflops["total"] for v in gflops.values())

    capsys.readouterr()
    assert _script("benchmark").main(["--config-file", config, "--device", "cpu", "--size", "64", "64",
                                      "--batch-sizes", "1", "--dtypes", "fp32", "--warmup", "0", "--iters", "1",
                                      *opts]) == 0
    assert "images/s" in capsys.readouterr().out
    # the trained weights on the first validation images (what a gated model's time depends on)
    assert _script("benchmark").main(["--config-file", config, "--device", "cpu", "--real-images", "--batch-sizes", "2",
                                      "--dtypes", "fp32", "--warmup", "0", "--iters", "1", *opts,
                                      "MODEL.WEIGHTS", str(out / "model_final.pth")]) == 0
    assert "the first validation images" in capsys.readouterr().out
    assert _script("analyze_model").main(["--config-file", config, "--size", "64", "64", *opts]) == 0
    printed = capsys.readouterr().out
    assert f"({name})" in printed and "counted operators" in printed and f"total {gflops['total']:.2f}" in printed
