#!/usr/bin/env python
"""Where a token-reduction Segmenter's inference time goes, against the dense Segmenter.

    python scripts/profile_token_reduction.py --config-file configs/synthetic/dcts_vit_s_mask.yaml \\
        --size 1024 1024 --batch 8 1 --setting cts-S MODEL.TOKEN_REDUCTION.NAME CTS \\
        --setting dtop-theta1 MODEL.TOKEN_REDUCTION.NAME DTOP MODEL.TOKEN_REDUCTION.DTOP.THETA 1.0 \\
        [--json OUT.json] [-- KEY VALUE ...]
    python scripts/profile_token_reduction.py --device cpu --tiny     # a quick check of the script

Random weights and random images by default (the time of a fixed configuration does not depend on
them: fixed-S CTS shares S superpatches of any policy, theta 1 prunes nothing); ``--weights W
--real-images`` profiles trained models on the sweep's timed batch instead, for settings whose
decisions depend on the content (thresholds, theta). For the dense model, the dense model
replayed as one CUDA graph (its latency only: the strongest dense baseline, the sweep's
``dense-graphed`` row), the dense model with its attention forced to the flash kernel (the kernel
the ragged runtime uses), and every setting, the latency of ``model.network`` in bf16 at each batch size and the GPU time inside
each stage (CUDA events around the policy, the embedding, the runs of blocks, the reductions,
the decode head and the final upsampling; when a pass is launch-bound the stages add up to less
than its latency), the top kernels of each pass, and (``--gaps N``) where the GPU idles: the N
lines of the package that launched the work after the longest idle time, and the host waits
before them (:mod:`eco_m2f.evaluation.gpu_idle`). Overrides for every model go behind ``--``
(a --setting takes every word up to the next option); with ``--real-images`` the images must come
out of the test mapper at ``--size`` (e.g. ``-- INPUT.MIN_SIZE_TEST 1024 INPUT.SIZE_DIVISIBILITY
1024``), or the script stops.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import sys
from pathlib import Path
from typing import Any, Dict, List

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from eco_m2f.architectures import build_model  # noqa: E402
from eco_m2f.config import setup_cfg  # noqa: E402
from eco_m2f.evaluation.reduction_sweep import build_trained, parse_settings, split_shared_overrides, timed_inputs  # noqa: E402
from eco_m2f.evaluation.gpu_idle import gpu_idle  # noqa: E402
from eco_m2f.evaluation.ideal_schedule import ideal_network, schedule_from_records  # noqa: E402
from eco_m2f.evaluation.throughput import (  # noqa: E402
    DTYPES, GraphedForward, host_profile, profile_kernels, stage_times, sync_points, time_forward,
)

TINY = ["MODEL.VIT.EMBED_DIM", "64", "MODEL.VIT.DEPTH", "4", "MODEL.VIT.NUM_HEADS", "2",
        "MODEL.SEM_SEG_HEAD.MASK_TRANSFORMER.NUM_LAYERS", "1", "MODEL.SEM_SEG_HEAD.MASK_TRANSFORMER.NUM_HEADS", "2"]


def _stages(model) -> Dict[str, tuple]:
    """name -> (object, method) of the stages of ``model.network``."""
    head = model.sem_seg_head
    if getattr(model, "_reduction", None) is None:
        return {"encoder": (model, "encode"), "decode head": (model, "run_head"), "upsampling": (head, "semantic_logits")}
    reducer, loop = model.token_reducer, model._reduction
    stages = {"embedding (+ policy)": (reducer, "embed"), "blocks": (loop, "_run")}
    sharing = getattr(reducer, "sharing", reducer)
    if hasattr(sharing, "policy_scores"):
        stages["policy"] = (sharing, "policy_scores")
    if reducer.decision_layers:
        stages["reductions"] = (reducer, "reduce")
    stages.update({"decode head": (model, "head_outputs"), "upsampling": (head, "semantic_logits")})
    return stages


def _captures(model) -> int:
    """CUDA graphs captured so far by the model's runs of blocks and its policy (a capture inside
    the timed passes would be timed too)."""
    loop = getattr(model, "_reduction", None)
    if loop is None:
        return 0
    count = sum(int(g.stats["captures"]) for g in loop._graphs.values())
    fast = getattr(getattr(model.token_reducer, "sharing", model.token_reducer), "_fast_policy", None)
    return count + (fast.captures if fast is not None else 0)


def _ideal(model, x: torch.Tensor, dtype: str) -> Dict[str, Any]:
    """Latency of ``model``'s token schedule on ``x`` (the mean live tokens per block of this
    batch) with no decisions, replayed as one CUDA graph on CUDA."""
    with torch.inference_mode(), torch.autocast(x.device.type, dtype=DTYPES[dtype], enabled=dtype != "fp32"):
        _, reduced = model.reduced_network(x)
        counts = schedule_from_records(model.cost_records(reduced, x.shape[-2:]))
    fn = ideal_network(model, counts)
    forward = GraphedForward(fn) if x.is_cuda else fn
    time_forward(forward, x, dtype, warmup=10 if x.is_cuda else 1, iters=0)
    ms, ips = time_forward(forward, x, dtype, warmup=0, iters=30 if x.is_cuda else 3)
    return {"ms": ms, "img/s": ips, "counts": counts}


def profile(
    cfg, name: str, sizes: List[int], batches: List[int], device: str, flash_only: bool = False, kernels: int = 0,
    host: int = 0, syncs: bool = False, real_images: bool = False, gaps: int = 0, graphed: bool = False,
    ideal: bool = False,
) -> Dict[str, Any]:
    """Latency, images/s and stage times of one model at each batch size (``graphed``: the
    latency of ``model.network`` replayed as one CUDA graph, and nothing else; ``ideal``: for a
    token-reduction model also the latency of its token schedule with the decisions left out,
    :mod:`eco_m2f.evaluation.ideal_schedule`, replayed as one CUDA graph)."""
    torch.manual_seed(0)
    model = build_trained(cfg, device) if cfg.MODEL.WEIGHTS else build_model(cfg).to(device).eval()
    real = timed_inputs(cfg, max(batches)) if real_images else None
    row: Dict[str, Any] = {"name": name}
    context = contextlib.nullcontext()
    if flash_only:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        context = sdpa_kernel([SDPBackend.FLASH_ATTENTION])
    g = torch.Generator().manual_seed(1)
    with context:
        for b in batches:
            if real is None:
                x = torch.randn(b, 3, *sizes, generator=g).to(device)
            else:  # the sweep's timed batch: the first validation images, as the model pads them
                x = model.preprocess_image(real[:b]).tensor
                if list(x.shape[-2:]) != list(sizes):
                    raise SystemExit(
                        f"{name}: the validation images of {cfg.DATASETS.TEST[0]} come out at {list(x.shape[-2:])} "
                        f"(INPUT.MIN_SIZE_TEST {cfg.INPUT.MIN_SIZE_TEST}, INPUT.SIZE_DIVISIBILITY "
                        f"{cfg.INPUT.SIZE_DIVISIBILITY}), not --size {list(sizes)}: give the INPUT overrides behind --")
            forward = GraphedForward(model.network) if graphed else model.network
            time_forward(forward, x, "bf16" if device == "cuda" else "fp32", warmup=10, iters=0)
            before = _captures(model)
            ms, ips = time_forward(forward, x, "bf16" if device == "cuda" else "fp32", warmup=0, iters=30)
            row[f"b{b}"] = {"ms": ms, "img/s": ips, "captures_while_timed": _captures(model) - before}
            if graphed:
                continue
            if ideal and getattr(model, "_reduction", None) is not None:
                row[f"b{b}"]["ideal"] = _ideal(model, x, "bf16" if device == "cuda" else "fp32")
            if device == "cuda":
                row[f"b{b}"]["stages_ms"] = stage_times(model.network, x, "bf16", _stages(model), iters=10)
                if kernels:
                    row[f"b{b}"]["kernels"] = profile_kernels(model.network, x, "bf16", top=kernels)
                if syncs:
                    row[f"b{b}"]["syncs"] = sync_points(model.network, x, "bf16")
                if gaps:
                    row[f"b{b}"]["gaps"] = gpu_idle(model.network, x, "bf16").table(top=gaps)
            if host and b == batches[0]:
                row[f"b{b}"]["host"] = host_profile(model.network, x, "bf16" if device == "cuda" else "fp32", top=host)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config-file", default="configs/synthetic/dcts_vit_s_mask.yaml")
    parser.add_argument("--size", type=int, nargs=2, default=[1024, 1024])
    parser.add_argument("--batch", type=int, nargs="+", default=[8, 1])
    parser.add_argument("--setting", nargs="+", action="append", default=[], metavar="NAME KEY VALUE",
                        help="a named setting: config overrides (repeatable)")
    parser.add_argument("--kernels", type=int, default=0, help="print the top N kernels of each pass at the first batch size")
    parser.add_argument("--host", type=int, default=0, help="print the top N Python functions by host time (cProfile) at the first batch size")
    parser.add_argument("--gaps", type=int, default=0, help="at every batch size, where the GPU idles in a pass: "
                        "the top N places of the package that launched the work after a gap (CUDA)")
    parser.add_argument("--ideal", action="store_true", help="also time each setting's token schedule with its decisions "
                        "and token moves left out (the dense model's modules on the mean live tokens per block, one CUDA graph)")
    parser.add_argument("--syncs", action="store_true", help="list the host syncs of one pass at every batch size (CUDA)")
    parser.add_argument("--weights", default="", help="trained weights of every model, loaded as the sweep loads them "
                        "(a model without a token reducer ignores token_reducer.* keys); default: random weights")
    parser.add_argument("--real-images", action="store_true",
                        help="time the first validation images of DATASETS.TEST[0] (the sweep's batch) instead of random ones")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tiny", action="store_true", help="a tiny ViT and 64 x 64 inputs (a check of the script)")
    parser.add_argument("--json", default="")
    parser.add_argument("opts", nargs="*", help="KEY VALUE overrides for every model (behind --)")
    argv, shared = split_shared_overrides(sys.argv[1:])
    args = parser.parse_intermixed_args(argv)
    args.opts = list(args.opts) + shared
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device here (use --device cpu for a check of the script)")
    if args.device != "cuda" and (args.gaps or args.syncs or args.kernels):
        parser.error("--gaps, --syncs and --kernels read the GPU's work: they need --device cuda")
    try:
        settings = parse_settings(args.setting)
    except ValueError as exc:
        parser.error(f"--setting: {exc}")
    sizes = [64, 64] if args.tiny else args.size
    no_policy = [] if args.weights else ["MODEL.TOKEN_SHARING.POLICY_WEIGHTS", ""]
    common = [*(TINY if args.tiny else []), "MODEL.DEVICE", args.device, "MODEL.WEIGHTS", args.weights, *no_policy,
              "MODEL.VIT.IMG_SIZE", str(sizes[0]), *args.opts]
    dense = ["MODEL.TOKEN_REDUCTION.NAME", ""]
    base = [("dense", dense, False, False)]
    if args.device == "cuda":
        base += [("dense, one CUDA graph", dense, False, True), ("dense, flash attention", dense, True, False)]
    rows = []
    for name, opts, flash, graphed in base + [(s.name, s.overrides, False, False) for s in settings]:
        cfg = setup_cfg(args.config_file, common + opts)
        row = profile(cfg, name, sizes, args.batch, args.device, flash, args.kernels, args.host, args.syncs, args.real_images,
                      args.gaps, graphed, args.ideal)
        rows.append(row)
        cells = []
        for b in args.batch:
            r = row[f"b{b}"]
            stages = ", ".join(f"{k} {v:.2f}" for k, v in r.get("stages_ms", {}).items())
            captured = f", {r['captures_while_timed']} graph capture(s) while timed" if r["captures_while_timed"] else ""
            cells.append(f"b{b}: {r['ms']:.2f} ms ({r['img/s']:.1f} img/s{captured}){'; ' + stages if stages else ''}")
        print(f"{name:24s} " + " | ".join(cells), flush=True)
        ideal = [f"b{b}: {row[f'b{b}']['ideal']['ms']:.2f} ms ({row[f'b{b}']['ideal']['img/s']:.1f} img/s)"
                 for b in args.batch if "ideal" in row[f"b{b}"]]
        if ideal:
            counts = row[f"b{args.batch[0]}"]["ideal"]["counts"]
            print(f"{'  ideal schedule':24s} " + " | ".join(ideal) + f"; tokens per block at b{args.batch[0]}: {counts}", flush=True)
        first = row[f"b{args.batch[0]}"]
        for key in ("kernels", "host"):
            if key in first:
                print(first.pop(key), flush=True)
        for b in args.batch:
            if "gaps" in row[f"b{b}"]:
                print(f"  b{b}: " + row[f"b{b}"].pop("gaps"), flush=True)
        for b in args.batch:
            if "syncs" in row[f"b{b}"]:
                points = row[f"b{b}"]["syncs"]
                print(f"  b{b}: {len(points)} host sync(s)" + "".join(f"\n    {p}" for p in points), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"config": args.config_file, "size": sizes, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
