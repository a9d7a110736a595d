#!/usr/bin/env python
"""Does removing tokens remove time? A ViT block stack on a batch whose images keep different
fractions of their tokens, timed against the dense stack in the same run.

    python scripts/benchmark_token_runtime.py                      # ViT-B, 8 x (1024 + 1) tokens, bf16, CUDA
    python scripts/benchmark_token_runtime.py --device cpu --tiny  # a quick check of the script

Per keep pattern and attention implementation (eager; on CUDA also "graphs", the stack
replayed as one CUDA graph with flash attention) it prints the dense time t_dense, the time t of
the stack on the kept tokens, F/F_dense (FLOPs of the kept tokens over dense FLOPs), the speed-up
and whether (t_dense - t) >= 0.9 * (t_dense - t_dense * F / F_dense), i.e. whether at least 90%
of the FLOP reduction became time; "e2e" adds the removal before the blocks and the dense
reassembly after them. Then it times the removal and reassembly operations alone.
"""
from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path
from typing import Dict, List, Sequence

import torch
import torch.nn as nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from eco_m2f.evaluation.throughput import DTYPES, time_callable  # noqa: E402


def _import_runtime():
    """The runtime package. Through ``eco_m2f.modeling`` when that imports; otherwise (its
    ``__init__`` loads the model registries, which need fvcore) the package on its own: it
    depends on torch and timm only."""
    try:
        import eco_m2f.modeling.token_reduction as runtime

        return runtime
    except ModuleNotFoundError as exc:
        if exc.name is None or not exc.name.startswith("fvcore"):
            raise
    folder = ROOT / "eco_m2f" / "modeling" / "token_reduction"
    spec = importlib.util.spec_from_file_location("token_reduction", folder / "__init__.py", submodule_search_locations=[str(folder)])
    runtime = importlib.util.module_from_spec(spec)
    sys.modules["token_reduction"] = runtime
    spec.loader.exec_module(runtime)
    return runtime


tr = _import_runtime()

CRITERION = 0.9  # share of the FLOP reduction that must become time


def keep_patterns(batch: int) -> Dict[str, List[float]]:
    """Keep fraction per image for each named pattern."""
    def spread(lo: float, hi: float) -> List[float]:
        return [lo + (hi - lo) * i / max(batch - 1, 1) for i in range(batch)]

    return {
        "all 100%": [1.0] * batch,
        "all 50%": [0.5] * batch,
        "mixed 25-100%": spread(0.25, 1.0),
        "mixed 50-100%": spread(0.5, 1.0),
        "all 25%": [0.25] * batch,
    }


def build_stack(depth: int, dim: int, heads: int, device: torch.device, dtype: torch.dtype) -> nn.ModuleList:
    from timm.models.vision_transformer import Block

    torch.manual_seed(0)
    return nn.ModuleList([Block(dim, heads, qkv_bias=True) for _ in range(depth)]).to(device, dtype).eval()


def dense_forward(blocks: nn.ModuleList, x: torch.Tensor) -> torch.Tensor:
    for block in blocks:
        x = block(x)
    return x


def impls_for(device: torch.device, dtype: torch.dtype, wanted: Sequence[str]) -> List[str]:
    usable = []
    for impl in wanted:
        reason = tr.attention.attention_unavailable(impl, device, dtype)
        if reason:
            print(f"skipping attention '{impl}': {reason}")
        else:
            usable.append(impl)
    return usable


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", default=None, choices=sorted(DTYPES), help="default: bf16 on CUDA, fp32 on CPU")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--tokens", type=int, default=1024, help="patch tokens per image (+1 cls)")
    p.add_argument("--depth", type=int, default=12)
    p.add_argument("--dim", type=int, default=768)
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--impls", nargs="+", default=["padded", "jagged", "flash", "varlen", "flex"])
    p.add_argument("--patterns", nargs="+", default=None, help="subset of the named keep patterns")
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--iters", type=int, default=50)
    p.add_argument("--tiny", action="store_true", help="2 blocks of dim 64 on 64 tokens, 3 timed passes: checks the script")
    args = p.parse_args(argv)
    if args.tiny:
        args.depth, args.dim, args.heads, args.tokens, args.warmup, args.iters = 2, 64, 4, 64, 1, 3
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        p.error("CUDA is not available here; use --device cpu (with --tiny for a quick check)")
    args.dtype = args.dtype or ("bf16" if device.type == "cuda" else "fp32")
    dtype = DTYPES[args.dtype]
    patterns = keep_patterns(args.batch)
    chosen = args.patterns or list(patterns)
    unknown = [name for name in chosen if name not in patterns]
    if unknown:
        p.error(f"unknown patterns {unknown}; known: {list(patterns)}")

    blocks = build_stack(args.depth, args.dim, args.heads, device, dtype)
    n, b = args.tokens, args.batch
    grid = (1, n)  # the runtime never looks at the grid's shape, only at its cell count
    gen = torch.Generator(device=device).manual_seed(0)
    tokens = torch.randn(b, 1 + n, args.dim, device=device, dtype=dtype, generator=gen)
    scores = torch.rand(b * n, device=device, generator=gen)
    impls = impls_for(device, dtype, args.impls)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"device: {name}; torch {torch.__version__}; {args.depth} blocks dim {args.dim} heads {args.heads}; "
          f"batch {b} x ({n} + 1) tokens; {args.dtype} weights and activations; median of {args.iters} after {args.warmup} warm-up")
    dense_flops = sum(tr.blocks_flops(blocks, [[1 + n] * b] * args.depth))

    def timed(fn) -> float:
        with torch.inference_mode():
            return time_callable(fn, args.warmup, args.iters, device)

    header = f"{'pattern':<15}{'attention':<11}{'t_dense ms':>11}{'t ms':>9}{'F/F_dense':>10}{'speed-up':>9}{'FLOP->time':>11}{'ok':>5}{'e2e ms':>9}{'ok e2e':>7}"
    print(header)
    best: Dict[str, List[float]] = {}
    for pattern in chosen:
        keep = [max(0, min(n, round(f * n))) for f in patterns[pattern]]
        with torch.inference_mode():
            reduced = tr.TokenSet.from_dense(tokens, grid).keep_topk(scores, keep)
        uniform = reduced.layout.uniform
        flops = sum(tr.blocks_flops(blocks, [reduced.layout.lengths] * args.depth))
        ratio = flops / dense_flops
        t_dense = timed(lambda: dense_forward(blocks, tokens))
        runners = {"dense-view": "auto"} if uniform else {impl: impl for impl in impls}
        if device.type == "cuda":
            runners["graphs"] = tr.GraphedBlocks(blocks, attention="flash")
        for label, runner in runners.items():
            def blocks_on(ts):
                return runner(ts) if isinstance(runner, tr.GraphedBlocks) else tr.run_blocks(blocks, ts, runner)

            def end_to_end():
                ts = tr.TokenSet.from_dense(tokens, grid).keep_topk(scores, keep, save_features=True)
                return blocks_on(ts).to_dense()

            try:
                t = timed(lambda: blocks_on(reduced))
                t_e2e = timed(end_to_end)
            except Exception as exc:  # one backend failing must not hide the others' figures
                print(f"{pattern:<15}{label:<11} failed: {type(exc).__name__}: {str(exc).splitlines()[0][:120]}")
                continue
            saved, possible = t_dense - t, t_dense - t_dense * ratio
            share = saved / possible if possible > 0 else float("nan")
            ok = saved >= CRITERION * possible
            ok_e2e = (t_dense - t_e2e) >= CRITERION * possible
            print(f"{pattern:<15}{label:<11}{t_dense:>11.3f}{t:>9.3f}{ratio:>10.3f}{t_dense / t:>8.2f}x{share:>11.2f}"
                  f"{'yes' if ok else 'NO':>5}{t_e2e:>9.3f}{'yes' if ok_e2e else 'NO':>7}", flush=True)
            if not uniform and label != "graphs":
                best.setdefault(label, []).append(t)
    if best:
        fastest = min(best, key=lambda k: sum(best[k]))
        print(f"fastest eager attention on the ragged patterns: {fastest} (auto picks '{tr.attention.DEFAULT_CUDA_ATTENTION}' on CUDA)")

    print("\nremoval and reassembly alone (mixed 25-100%):")
    keep = [round(f * n) for f in patterns["mixed 25-100%"]]
    with torch.inference_mode():
        full = tr.TokenSet.from_dense(tokens, grid)
        mask = full.keep_topk(scores, keep).live_cells().view(-1)
        kept = full.keep(mask, save_features=True)
    ops = {
        "keep_topk (k known on the host, no sync)": lambda: full.keep_topk(scores, keep),
        "keep by mask (one host sync for the counts)": lambda: full.keep(mask),
        "keep by mask + save features": lambda: full.keep(mask, save_features=True),
        "to_dense (live + saved features)": lambda: kept.to_dense(),
        "padded view of the live patches": lambda: kept.padded(),
    }
    for label, fn in ops.items():
        print(f"  {label:<46}{timed(fn):>9.3f} ms")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
