#!/usr/bin/env python
"""Parameters and GFLOPs of a config's model: total, the scopes the model reports, the operators.

    python scripts/analyze_model.py --config-file CONFIG [--num-inputs N | --size H W] [--exit K]
                                    [--activations] [KEY VALUE ...]

With --size, GFLOPs of ``model.network`` on one input of that size (zeros), with the counted
operators and those left at 0; --exit K follows the encoder exit K (ECO-M2F). With --num-inputs,
the model runs on the first N images of DATASETS.TEST[0] and the efficiency evaluator averages
their cost records (GFLOPs per image along each image's own path, exits taken...).
--activations adds fvcore's activation count (output elements of convolutions and matmuls).
"""
from __future__ import annotations

import argparse
import itertools
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from eco_m2f.architectures import build_model  # noqa: E402
from eco_m2f.config import setup_cfg  # noqa: E402
from eco_m2f.evaluation.efficiency import EfficiencyEvaluator  # noqa: E402
from eco_m2f.evaluation.flops import activation_counts, flop_report  # noqa: E402


def parameter_table(model: torch.nn.Module) -> str:
    """Parameters in total, per child of the model, and per part of the heads made of several."""
    rows = [("total", sum(p.numel() for p in model.parameters()))]
    for name, child in model.named_children():
        n = sum(p.numel() for p in child.parameters())
        if not n:
            continue
        rows.append((name, n))
        parts = [(sub, sum(p.numel() for p in g.parameters())) for sub, g in child.named_children()]
        parts = [(sub, m) for sub, m in parts if m]
        if name != "backbone" and len(parts) > 1:
            rows.extend((f"{name}.{sub}", m) for sub, m in parts)
    return "\n".join(f"  {name:<32}{n / 1e6:>10.3f} M" for name, n in rows)


def _calls(ops: dict) -> str:
    return ", ".join(f"{op} {n}" for op, n in sorted(ops.items())) or "none"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config-file", required=True)
    g = p.add_mutually_exclusive_group()
    g.add_argument("--num-inputs", type=int, default=0, help="average the cost of N images of DATASETS.TEST[0]")
    g.add_argument("--size", type=int, nargs=2, metavar=("H", "W"), help="count GFLOPs for one input of this size")
    p.add_argument("--exit", type=int, default=None, help="with --size: count the network at this encoder exit")
    p.add_argument("--activations", action="store_true", help="also count activations (fvcore), with --size")
    p.add_argument("opts", nargs=argparse.REMAINDER, help="KEY VALUE config overrides")
    args = p.parse_args(argv)
    if args.num_inputs and (args.exit is not None or args.activations):
        p.error("--exit and --activations go with --size; on a dataset the model's own cost records are averaged")

    cfg = setup_cfg(args.config_file, ["MODEL.DEVICE", "cpu"] + list(args.opts))
    model = build_model(cfg).eval()
    print(f"config: {args.config_file} ({type(model).__name__})")
    print("parameters:")
    print(parameter_table(model))

    if args.num_inputs:
        from eco_m2f.data import build_detection_test_loader
        from eco_m2f.evaluation.evaluator import inference_on_dataset

        dataset = cfg.DATASETS.TEST[0]
        loader = itertools.islice(build_detection_test_loader(cfg, dataset), args.num_inputs)
        cost = inference_on_dataset(model, loader, EfficiencyEvaluator(model)).get("cost")
        if not cost:
            raise SystemExit(f"{type(model).__name__} produced no cost records on {dataset}")
        print(f"cost per image, averaged over {cost['num_images']} images of {dataset}:")
        for key, value in cost.items():
            if key != "num_images":
                print(f"  {key:<32}{value:.3f}" if isinstance(value, float) else f"  {key:<32}{value}")
        return 0

    h, w = args.size or (cfg.INPUT.IMAGE_SIZE, cfg.INPUT.IMAGE_SIZE)
    cost = None
    if args.exit is not None:
        cost = {"exit": args.exit}
        if model.cost_signature(cost) == model.cost_signature({}):
            p.error(f"{type(model).__name__}'s network does not depend on an exit (ECOMaskFormer's does)")
    images = torch.zeros(1, 3, h, w)
    report = flop_report(model, images, cost)
    path = "full network" if cost is None else f"exit {args.exit}"
    scopes = ", ".join(f"{k} {v:.2f}" for k, v in report.gflops.items() if k != "total")
    print(f"GFLOPs (one {h}x{w} input, {path}): total {report.gflops['total']:.2f}" + (f", {scopes}" if scopes else ""))
    children = list(report.by_child)
    print("counted operators (GFLOPs): " + " ".join(f"{c:>14}" for c in ["total", *children]))
    for op, value in report.by_operator.items():
        parts = [f"{report.by_child[c].get(op, 0.0):>14.3f}" for c in children]
        print(f"  {op:<30}{value:>14.3f} " + " ".join(parts))
    print(f"ignored as Detectron2 does (calls): {_calls(report.ignored)}")
    print(f"no FLOP handle, counted as 0 (calls): {_calls(report.uncounted)}")
    if args.activations:
        print("activations (fvcore, M):")
        for name, value in activation_counts(model, images, cost).items():
            print(f"  {name:<32}{value / 1e6:>10.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
