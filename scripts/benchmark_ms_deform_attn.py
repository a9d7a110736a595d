#!/usr/bin/env python
"""Time the deformable-attention core alone: each implementation, forward and forward + backward.

    python scripts/benchmark_ms_deform_attn.py [--size H W] [--batch-sizes 2 16] [--dtypes fp32 bf16]

Shapes are those of Mask2Former's encoder for an H x W input: levels at strides 32, 16, 8,
8 heads of 32 channels, 4 points per level, one query per token.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from eco_m2f.evaluation.throughput import DTYPES, time_callable  # noqa: E402
from eco_m2f.modeling.pixel_decoder.ms_deform_attn import ms_deform_attn  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=int, nargs=2, default=[1024, 1024], metavar=("H", "W"))
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    p.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    p.add_argument("--impls", nargs="+", default=["pytorch", "triton"])
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=32)
    p.add_argument("--points", type=int, default=4)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--iters", type=int, default=20)
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        p.error("needs a CUDA device")
    torch.backends.cuda.matmul.allow_tf32 = False
    h, w = args.size
    shapes = [(h // s, w // s) for s in (32, 16, 8)]
    tokens = sum(a * b for a, b in shapes)
    print(f"device: {torch.cuda.get_device_name()}; input {h}x{w}: levels {shapes}, {tokens} queries per image; "
          f"median of {args.iters} after {args.warmup} warm-up")
    print(f"{'impl':<9}{'batch':>6}{'dtype':>7}{'forward ms':>12}{'fwd+bwd ms':>12}{'peak MiB fwd+bwd':>18}")
    g = torch.Generator(device="cuda").manual_seed(0)
    for batch in args.batch_sizes:
        for dtype in args.dtypes:
            value = torch.randn(batch, tokens, args.heads, args.head_dim, device="cuda", generator=g).to(DTYPES[dtype])
            loc = torch.rand(batch, tokens, args.heads, len(shapes), args.points, 2, device="cuda", generator=g)
            attn = torch.rand(batch, tokens, args.heads, len(shapes), args.points, device="cuda", generator=g)
            go = torch.randn(batch, tokens, args.heads * args.head_dim, device="cuda", generator=g)
            for impl in args.impls:
                def forward():
                    with torch.no_grad():
                        return ms_deform_attn(value, shapes, loc, attn, impl=impl)

                ins = [t.detach().requires_grad_() for t in (value, loc, attn)]

                def forward_backward():
                    out = ms_deform_attn(ins[0], shapes, ins[1], ins[2], impl=impl)
                    return torch.autograd.grad(out, ins, go.to(out.dtype))

                fwd = time_callable(forward, args.warmup, args.iters)
                torch.cuda.reset_peak_memory_stats()
                base = torch.cuda.memory_allocated()
                both = time_callable(forward_backward, args.warmup, args.iters)
                peak = (torch.cuda.max_memory_allocated() - base) / 2**20
                print(f"{impl:<9}{batch:>6}{dtype:>7}{fwd:>12.2f}{both:>12.2f}{peak:>18.0f}", flush=True)
            del value, loc, attn, go
            torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
