#!/usr/bin/env python
"""Time threshold decisions (DoViT, DToP, STEP) run eagerly against decisions captured in the
blocks' CUDA graphs.

    python scripts/benchmark_graph_decisions.py [--config-file configs/synthetic/dovit_vit_s_mask.yaml]
        [--size 1024] [--batch 8 1] [--threshold 0.3] [--head-scale 30] [--weights W] [KEY VALUE ...]
    python scripts/benchmark_graph_decisions.py --config-file configs/synthetic/dtop_vit_s_mask.yaml \
        --threshold 0.6 --head-scale 20

The same model, the same images and therefore the same removals, timed three ways in one
process: the dense Segmenter (the reducer off), the method with eager decisions, and with
``MODEL.TOKEN_REDUCTION.GRAPH_DECISIONS``. ``--threshold`` is DoViT's xi or DToP's theta.
Without ``--weights`` the model is random and its auxiliary classifiers are scaled by
``--head-scale``, so that their confidences spread and the threshold removes different numbers
of tokens in each image (a pattern to time, not a trained model). Prints the median latency and
images/s (bf16), the tokens removed at each decision, and checks that both decision paths
remove the same tokens.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from eco_m2f.architectures import build_model  # noqa: E402
from eco_m2f.checkpoint import load_weights  # noqa: E402
from eco_m2f.config import setup_cfg  # noqa: E402
from eco_m2f.evaluation.throughput import time_forward  # noqa: E402


#: reducer name -> (its threshold key, its cost record of removed tokens per decision)
_THRESHOLDS = {
    "DoViT": ("MODEL.TOKEN_REDUCTION.DOVIT.THRESHOLD", "stopped"),
    "DTOP": ("MODEL.TOKEN_REDUCTION.DTOP.THETA", "pruned"),
    "STEP": ("MODEL.TOKEN_REDUCTION.DTOP.THETA", "pruned"),
}


def _classifiers(reducer) -> list:
    """The last linear layer of every auxiliary head (scaled to spread a random model's confidences)."""
    if hasattr(reducer, "aux_heads"):  # DoViT
        return [head.cls for head in reducer.aux_heads]
    if reducer.aux_head != "linear":
        raise SystemExit("--head-scale needs DToP's linear auxiliary heads (MODEL.TOKEN_REDUCTION.DTOP.AUX_HEAD linear), "
                         "or pass --weights; ATM auxiliary heads decide eagerly in any case")
    return [head[1] for head in reducer.heads.values()]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config-file", default="configs/synthetic/dovit_vit_s_mask.yaml")
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--batch", type=int, nargs="+", default=[8, 1])
    parser.add_argument("--threshold", "--xi", type=float, default=0.3, help="DoViT's xi or DToP's (STEP's) theta")
    parser.add_argument("--head-scale", type=float, default=30.0, help="scale of the random auxiliary classifiers")
    parser.add_argument("--weights", default="", help="trained weights (then --head-scale is not applied)")
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--iters", type=int, default=30)
    parser.add_argument("--json", default="")
    parser.add_argument("opts", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    name = str(setup_cfg(args.config_file, list(args.opts)).MODEL.TOKEN_REDUCTION.NAME)
    if name not in _THRESHOLDS:
        parser.error(f"MODEL.TOKEN_REDUCTION.NAME is '{name}': this benchmark times the decisions of {sorted(_THRESHOLDS)}")
    if not torch.cuda.is_available():
        parser.error("needs a CUDA device: the captured decisions replay CUDA graphs")
    key, record = _THRESHOLDS[name]
    extra = ["MODEL.TOKEN_REDUCTION.DOVIT.DISTILL_WEIGHT", "0.0"] if name == "DoViT" else []
    cfg = setup_cfg(args.config_file, [*extra, key, str(args.threshold), *args.opts])
    torch.manual_seed(0)
    model = build_model(cfg)
    if args.weights:
        print(load_weights(model, args.weights))
    else:
        with torch.no_grad():
            for layer in _classifiers(model.token_reducer):
                layer.weight.mul_(args.head_scale)
    model = model.cuda().eval()
    loop = model._reduction
    rows = []
    for batch in args.batch:
        images = torch.randn(batch, 3, args.size, args.size, generator=torch.Generator().manual_seed(batch)).cuda()
        stops = {}
        for name in ("dense", "eager decisions", "captured decisions"):
            if name == "dense":
                reduction, model._reduction = model._reduction, None
                fn = model.network
            else:
                model._reduction = reduction
                loop.graph_decisions = name == "captured decisions"
                loop.reset()
                fn = model.network
                with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16):
                    _, done = model.reduced_network(images)
                stops[name] = [r[record] for r in model.cost_records(done, (args.size, args.size))]
            ms, ips = time_forward(fn, images, "bf16", args.warmup, args.iters)
            rows.append({"setting": name, "batch": batch, "ms": ms, "images_per_s": ips, record: stops.get(name)})
        model._reduction = reduction
        same = stops["eager decisions"] == stops["captured decisions"]
        dense = rows[-3]["ms"]
        for row in rows[-3:]:
            print(f"b{batch:<2} {row['setting']:<20} {row['ms']:8.2f} ms {row['images_per_s']:8.1f} img/s "
                  f"{dense / row['ms']:5.2f}x dense" + (f"   {record} {row[record]}" if row[record] and batch <= 2 else ""))
        eager = stops["eager decisions"]
        print(f"b{batch:<2} tokens {record} per image and decision {'equal' if same else 'DIFFER'} between the two decision paths; "
              f"mean {record} per decision {[sum(s[i] for s in eager) / batch for i in range(len(eager[0]))]}")
        if not same:
            print("eager:", stops["eager decisions"], "\ncaptured:", stops["captured decisions"])
    if args.json:
        Path(args.json).write_text(json.dumps({"device": torch.cuda.get_device_name(), "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
