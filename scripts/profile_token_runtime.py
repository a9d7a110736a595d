#!/usr/bin/env python
"""Where the time of the token runtime goes, against the dense ViT block stack.

    python scripts/profile_token_runtime.py --json $OUT/token_profile.json   # ViT-B, 8 x (1024 + 1) tokens, bf16, CUDA
    python scripts/profile_token_runtime.py --device cpu --tiny               # a quick check of the script

Three parts, each timed on the device alone (CUDA-graph replays):
1. attention alone on equal lengths (8 x 1025), the mixed 25-100% lengths and 8 x 257: dense
   ``scaled_dot_product_attention`` on timm's views (default backend and each forced: flash,
   cuDNN, memory-efficient) against the ragged kernels (flash varlen, ``varlen_attn``) with the
   longest length exact, rounded to 128 or the full length; TFLOP/s and relative error against
   float32;
2. one block's token-wise layers (norm, qkv, proj, fc1, GELU, fc2, residual add) at
   the packed row counts of those patterns, exact and rounded to 64 and 256 rows;
3. torch.profiler kernel tables of the dense stack and of the reduced stack (mixed 25-100%)
   eager and through graph configurations: time per kernel class and per block, kernel time
   against wall time (the gaps), the top kernels.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from eco_m2f.evaluation.token_runtime import (  # noqa: E402
    GRAPH_CONFIGS,
    add_stack_arguments,
    attention_alone,
    build_stack,
    dense_forward,
    keep_counts,
    keep_patterns,
    kernel_breakdown,
    say,
    stack_settings,
    token_wise_alone,
)
from eco_m2f.modeling import token_reduction as tr  # noqa: E402

GRAPHS_PROFILED = ("before", "flash-64", "flash-64-compiled")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_stack_arguments(p, budget=0.08)
    args = p.parse_args(argv)
    device, dtype = stack_settings(p, args)
    cuda = device.type == "cuda"
    n, b, heads = args.tokens, args.batch, args.heads
    head_dim = args.dim // heads
    blocks = build_stack(args.depth, args.dim, heads, device, dtype)
    patterns = keep_patterns(b)
    shapes = {
        f"equal {b}x{n + 1}": [n + 1] * b,
        "mixed 25-100%": [1 + k for k in keep_counts(patterns["mixed 25-100%"], n)],
        f"all 25% {b}x{keep_counts([0.25], n)[0] + 1}": [1 + k for k in keep_counts(patterns["all 25%"], n)],
    }
    say(f"device: {torch.cuda.get_device_name(device) if cuda else 'cpu'}; torch {torch.__version__} (cuDNN "
        f"{torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None}); {args.depth} blocks dim {args.dim} heads {heads}; {dtype}")
    results = {"attention": {}, "token_wise": {}, "kernels": {}}

    def dump() -> None:
        if args.json:
            Path(args.json).parent.mkdir(parents=True, exist_ok=True)
            Path(args.json).write_text(json.dumps(results, indent=1))

    say("\n1. attention alone (device time per call; TFLOP/s of the real pairs; error against float32)")
    for shape, lengths in shapes.items():
        rows = attention_alone(lengths, heads, head_dim, n + 1, device, dtype, args.budget)
        results["attention"][shape] = rows
        say(f"  {shape}: lengths {lengths}")
        for r in rows:
            if "failed" in r:
                say(f"    {r['case']:<56} failed: {r['failed']}")
            else:
                say(f"    {r['case']:<56}{r['us']:>9.1f} us{r['tflops']:>8.1f} TFLOP/s  err {r['err']:.1e}")
        dump()

    say("\n2. one block's token-wise layers at packed row counts (device us per call)")
    totals = {shape: sum(lengths) for shape, lengths in shapes.items()}
    rows = sorted({m for t in totals.values() for m in (t, -(-t // 64) * 64, -(-t // 256) * 256)})
    table = token_wise_alone(blocks[0], rows, args.budget)
    results["token_wise"] = {str(m): v for m, v in table.items()}
    names = list(next(iter(table.values())))
    say(f"  {'rows':>6}" + "".join(f"{name:>12}" for name in names))
    for m, times in table.items():
        say(f"  {m:>6}" + "".join(f"{times[name]:>12.1f}" for name in names))
    dim, hidden = args.dim, blocks[0].mlp.fc1.out_features
    say("  GEMM TFLOP/s: " + "; ".join(
        f"{m} rows: qkv {2 * m * dim * 3 * dim / t['qkv'] / 1e6:.0f}, fc1 {2 * m * dim * hidden / t['fc1'] / 1e6:.0f}, fc2 {2 * m * dim * hidden / t['fc2'] / 1e6:.0f}"
        for m, t in table.items()))
    dump()

    say("\n3. kernel tables (per pass of the whole stack; 'per block' divides by the depth)")
    gen = torch.Generator(device=device).manual_seed(0)
    tokens = torch.randn(b, 1 + n, args.dim, device=device, dtype=dtype, generator=gen)
    scores = torch.rand(b * n, device=device, generator=gen)
    with torch.inference_mode():
        full = tr.TokenSet.from_dense(tokens, (1, n))
        reduced = full.keep_topk(scores, keep_counts(patterns["mixed 25-100%"], n))
    runs = {"dense eager timm": lambda: dense_forward(blocks, tokens), "mixed 25-100% eager auto": lambda: tr.run_blocks(blocks, reduced, "auto")}
    if cuda:
        for name in GRAPHS_PROFILED:
            runner = tr.GraphedBlocks(blocks, GRAPH_CONFIGS[name])
            runs[f"mixed 25-100% graph {name}"] = lambda runner=runner: runner(reduced)
        dense_runner = tr.GraphedBlocks(blocks, GRAPH_CONFIGS["flash-64-compiled"])
        runs["dense graph (runtime compiled, dense SDPA)"] = lambda: dense_runner(full)
    for label, fn in runs.items():
        try:
            with torch.inference_mode():
                info = kernel_breakdown(fn, passes=3, device=device)
        except Exception as exc:  # one run failing must not hide the others' tables
            say(f"  {label}: failed: {type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''}")
            continue
        results["kernels"][label] = info
        say(f"  {label}: {info['kernels_per_pass']:.0f} kernels, busy {info['busy_us'] / 1e3:.3f} ms of wall {info['wall_us'] / 1e3:.3f} ms per pass")
        say("    per class ms (per block us): " + ", ".join(f"{c} {us / 1e3:.3f} ({us / args.depth:.1f})" for c, us in info["categories"].items()))
        for k in info["kernels"][:6]:
            say(f"    {k['us']:>9.1f} us {k['calls']:>5.0f}x  {k['category']:<14} {k['name'][:96]}")
        dump()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
