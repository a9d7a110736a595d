"""Measuring the token-reduction runtime: whether removing tokens removes time.

A ViT block stack on a batch whose images keep different fractions of their tokens is timed
against the dense stack in the same run. The criterion of the runtime: the stack on the kept
tokens must turn at least 90% of its FLOP reduction into time,
``t_dense - t >= 0.9 * (t_dense - t_dense * F / F_dense)``. Used by
``scripts/benchmark_token_runtime.py`` (the stack, every way of running it) and
``scripts/profile_token_runtime.py`` (where the time goes: attention and token-wise layers
alone, kernel tables).
"""
from __future__ import annotations

import argparse
import re
from collections import defaultdict
from typing import Callable, Dict, List, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from eco_m2f.evaluation.throughput import DTYPES, CallTime, time_back_to_back, time_graph
from eco_m2f.modeling.token_reduction import InferenceOptions, StaticLayout, TokenSet, blocks_flops, packed_attention
from eco_m2f.modeling.token_reduction.packing import host_ints

__all__ = [
    "CRITERION",
    "GRAPH_CONFIGS",
    "add_stack_arguments",
    "attention_alone",
    "build_stack",
    "dense_forward",
    "flop_ratio",
    "kernel_breakdown",
    "kernel_category",
    "keep_counts",
    "keep_patterns",
    "needed_time",
    "per_image_reference",
    "relative_error",
    "say",
    "stack_settings",
    "time_share",
    "token_wise_alone",
]

CRITERION = 0.9  # share of the FLOP reduction that must become time

#: Graph-replay configurations compared by the benchmark; the first is the runtime's setting
#: before these options existed (ragged flash attention in 256-row buckets, also for uniform
#: batches).
GRAPH_CONFIGS: Dict[str, InferenceOptions] = {
    "before": InferenceOptions(attention="flash", row_bucket=256, len_bucket=128, dense_when_uniform=False, compile=False),
    "flash-64": InferenceOptions(attention="flash", row_bucket=64, compile=False),
    "flash-64-full": InferenceOptions(attention="flash", row_bucket=64, len_bucket=0, compile=False),
    "flash-exact": InferenceOptions(attention="flash", row_bucket=1, len_bucket=1, compile=False),
    "flash-64-compiled": InferenceOptions(attention="flash", row_bucket=64, compile=True),
    "flash-64-compiled-nocopy": InferenceOptions(attention="flash", row_bucket=64, compile=True, copy_output=False),
    "triton-64-compiled": InferenceOptions(attention="triton", row_bucket=64, compile=True),
}


def say(*parts) -> None:
    """Print at once (a run cut short by a time limit still leaves its lines)."""
    print(*parts, flush=True)


def add_stack_arguments(parser: argparse.ArgumentParser, budget: float) -> None:
    """The options of the runtime scripts: device, dtype, the stack's sizes, timing budget."""
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default=None, choices=sorted(DTYPES), help="default: bf16 on CUDA, fp32 on CPU")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=1024, help="patch tokens per image (+1 cls)")
    parser.add_argument("--depth", type=int, default=12)
    parser.add_argument("--dim", type=int, default=768)
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--budget", type=float, default=budget, help="seconds of timed calls per figure")
    parser.add_argument("--json", default=None, help="write every figure here (rewritten as the run goes)")
    parser.add_argument("--tiny", action="store_true", help="2 blocks of dim 64 on 64 tokens, short timings: checks the script")


def stack_settings(parser: argparse.ArgumentParser, args: argparse.Namespace) -> Tuple[torch.device, torch.dtype]:
    """Apply ``--tiny``, check the device, resolve the dtype (bf16 on CUDA, fp32 on CPU)."""
    if args.tiny:
        args.depth, args.dim, args.heads, args.tokens, args.budget = 2, 64, 4, 64, min(args.budget, 0.02)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("CUDA is not available here; use --device cpu (with --tiny for a quick check)")
    args.dtype = args.dtype or ("bf16" if device.type == "cuda" else "fp32")
    return device, DTYPES[args.dtype]


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


def keep_counts(fractions: Sequence[float], tokens: int) -> List[int]:
    """Patch tokens each image keeps."""
    return [max(0, min(tokens, round(f * tokens))) for f in fractions]


def build_stack(depth: int, dim: int, heads: int, device: torch.device, dtype: torch.dtype) -> nn.ModuleList:
    """``depth`` timm ViT blocks (qkv bias, as ViT-B), seeded, in eval mode."""
    from timm.models.vision_transformer import Block

    torch.manual_seed(0)
    return nn.ModuleList([Block(dim, heads, qkv_bias=True) for _ in range(depth)]).to(device, dtype).eval()


def dense_forward(blocks: Sequence[nn.Module], x: torch.Tensor) -> torch.Tensor:
    """timm's own forward of the stack on (B, N, C)."""
    for block in blocks:
        x = block(x)
    return x


def flop_ratio(blocks: Sequence[nn.Module], lengths: Sequence[int], dense_lengths: Sequence[int]) -> float:
    """F / F_dense of the stack on sequences of ``lengths`` against ``dense_lengths``."""
    depth = len(blocks)
    return sum(blocks_flops(blocks, [list(lengths)] * depth)) / sum(blocks_flops(blocks, [list(dense_lengths)] * depth))


def needed_time(t_dense: float, ratio: float, share: float = CRITERION) -> float:
    """The largest t that turns ``share`` of the FLOP reduction into time."""
    return t_dense - share * (t_dense - t_dense * ratio)


def time_share(t_dense: float, t: float, ratio: float) -> float:
    """Share of the FLOP reduction that became time (NaN when there is no reduction)."""
    possible = t_dense - t_dense * ratio
    return (t_dense - t) / possible if possible > 0 else float("nan")


def per_image_reference(blocks: Sequence[nn.Module], tokens: torch.Tensor, reduced: TokenSet) -> torch.Tensor:
    """The dense stack run on each image's kept tokens alone, in the packed order of ``reduced``:
    ``tokens`` (B, P + G, C) -> (T, C)."""
    p = reduced.num_prefix
    rows = []
    for b in range(reduced.batch_size):
        cells = torch.nonzero(reduced.owner[b] >= 0).view(-1)  # increasing: the packed order
        seq = torch.cat([tokens[b, :p], tokens[b, p + cells]], 0)
        rows.append(dense_forward(blocks, seq.unsqueeze(0))[0])
    return torch.cat(rows, 0)


def relative_error(out: torch.Tensor, ref: torch.Tensor, lengths: Sequence[int] = ()) -> float:
    """||out - ref|| / ||ref|| in float32, the largest over the images of ``lengths`` rows each
    when given (so that one wrong image stands out); inf when ``out`` holds a non-finite value."""
    out, ref = out.float(), ref.float()
    if not torch.isfinite(out).all():
        return float("inf")
    pieces = zip(out.split(list(lengths), 0), ref.split(list(lengths), 0)) if lengths else [(out, ref)]
    return max(((o - r).norm() / r.norm().clamp(min=1e-30)).item() for o, r in pieces)


_CATEGORIES = (
    ("attention", re.compile(r"flash|fmha|sdpa|attention|attn", re.I)),
    ("gemm", re.compile(r"gemm|nvjet|xmma|cutlass|cublas|sm90_|sm80_|matmul", re.I)),
    ("fused (triton)", re.compile(r"^triton_", re.I)),
    ("layer norm", re.compile(r"layer_?norm", re.I)),
    ("copy / index", re.compile(r"copy|memcpy|memset|index|scatter|gather|cat_|fill", re.I)),
    ("elementwise", re.compile(r"elementwise|vectorized|gelu|add|mul|reduce", re.I)),
)


def kernel_category(name: str) -> str:
    """Coarse class of a CUDA kernel by its name."""
    for category, pattern in _CATEGORIES:
        if pattern.search(name):
            return category
    return "other"


def kernel_breakdown(fn: Callable[[], object], passes: int = 3, top: int = 10, device: torch.device = torch.device("cuda")) -> Dict[str, object]:
    """GPU kernels of ``passes`` calls of ``fn`` (after one warm-up) under torch.profiler:
    per pass, the ``top`` kernels by time, the time per :func:`kernel_category`, the kernels'
    total ("busy") and the wall time between the first kernel's start and the last one's end
    (busy below wall: gaps between kernels). On CPU the same for the host's operators."""
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    fn()
    sync()
    with profile(activities=[ProfilerActivity.CUDA if cuda else ProfilerActivity.CPU]) as prof:
        for _ in range(passes):
            fn()
        sync()
    kind = torch.autograd.DeviceType.CUDA if cuda else torch.autograd.DeviceType.CPU
    totals: Dict[str, float] = defaultdict(float)
    counts: Dict[str, int] = defaultdict(int)
    first, last = float("inf"), float("-inf")
    for event in prof.events():
        if event.device_type != kind or (not cuda and event.cpu_parent is not None):
            continue
        totals[event.name] += event.time_range.elapsed_us()
        counts[event.name] += 1
        first, last = min(first, event.time_range.start), max(last, event.time_range.end)
    categories: Dict[str, float] = defaultdict(float)
    for name, us in totals.items():
        categories[kernel_category(name)] += us / passes
    ranked = sorted(totals.items(), key=lambda item: -item[1])[:top]
    return {
        "kernels": [{"name": name, "category": kernel_category(name), "calls": counts[name] / passes, "us": us / passes} for name, us in ranked],
        "categories": dict(sorted(categories.items(), key=lambda item: -item[1])),
        "busy_us": sum(totals.values()) / passes,
        "wall_us": (last - first) / passes if totals else float("nan"),
        "kernels_per_pass": sum(counts.values()) / passes,
    }


def _device_time(fn: Callable[[], object], budget_s: float) -> CallTime:
    """Device time per call from CUDA-graph replays, or back-to-back calls where ``fn`` cannot
    be captured (then host time per call counts too)."""
    try:
        return time_graph(fn, calls=10, budget_s=budget_s)
    except Exception:  # e.g. a library that synchronises inside: time it as a stream of calls
        return time_back_to_back(fn, budget_s)


def _reference_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lengths: Sequence[int], scale: float) -> torch.Tensor:
    """float32 attention within each image: packed (T, H, D) -> (T, H, D)."""
    outs = []
    for qi, ki, vi in zip(*(t.float().split(list(lengths), 0) for t in (q, k, v))):
        outs.append(F.scaled_dot_product_attention(*(t.transpose(0, 1).unsqueeze(0) for t in (qi, ki, vi)), scale=scale)[0].transpose(0, 1))
    return torch.cat(outs, 0)


def attention_alone(lengths: Sequence[int], heads: int, head_dim: int, full_len: int, device: torch.device, dtype: torch.dtype, budget_s: float = 0.1) -> List[Dict[str, object]]:
    """The attention core alone on images of ``lengths`` tokens: dense SDPA on timm's views
    (equal lengths only; default backend and each one forced) and each ragged kernel with the
    longest length exact, rounded up to 128 and the full ``full_len``. q, k, v are views of one
    (T, 3, H, D) projection, as the blocks make them.
    Rows: case, device us per call, TFLOP/s, relative error against float32, or failed."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    lengths = [int(n) for n in lengths]
    batch, total, longest = len(lengths), sum(lengths), max(lengths)
    qkv = torch.randn(total, 3, heads, head_dim, device=device, dtype=dtype, generator=torch.Generator(device=device).manual_seed(0))
    q, k, v = qkv.unbind(1)  # each (T, H, D), row stride 3 * H * D
    scale = head_dim ** -0.5
    reference = _reference_attention(q, k, v, lengths, scale)
    offsets = host_ints([0] + [sum(lengths[: i + 1]) for i in range(batch)], device, torch.int32)
    cases: Dict[str, Callable[[], torch.Tensor]] = {}
    if len(set(lengths)) == 1:
        view = qkv.view(batch, longest, 3, heads, head_dim).permute(2, 0, 3, 1, 4)  # (3, B, H, L, D) as timm's Attention

        def dense(backend=None) -> Callable[[], torch.Tensor]:
            def run() -> torch.Tensor:
                if backend is None:
                    out = F.scaled_dot_product_attention(view[0], view[1], view[2], scale=scale)
                else:
                    with sdpa_kernel([backend]):
                        out = F.scaled_dot_product_attention(view[0], view[1], view[2], scale=scale)
                return out.transpose(1, 2).reshape(total, heads, head_dim)
            return run

        cases["dense SDPA, timm's call (default backend)"] = dense()
        for name in ("FLASH_ATTENTION", "CUDNN_ATTENTION", "EFFICIENT_ATTENTION"):
            cases[f"dense SDPA forced {name.lower()}"] = dense(getattr(SDPBackend, name))
    for label, max_len in (("exact", longest), ("len/128", -(-longest // 128) * 128), ("full", full_len)):
        layout = StaticLayout(offsets, max_len)
        cases[f"flash varlen, max {label} ({max_len})"] = lambda layout=layout: packed_attention(q, k, v, layout, "flash", 0.0, scale)
    exact = StaticLayout(offsets, longest)
    cases["varlen_attn (torch.nn.attention.varlen)"] = lambda: packed_attention(q, k, v, exact, "varlen", 0.0, scale)
    cases.update(_triton_cases(q, k, v, offsets, longest, scale))
    flops = 4 * heads * head_dim * sum(n * n for n in lengths)
    rows = []
    with torch.inference_mode():
        for case, fn in cases.items():
            try:
                err = relative_error(fn(), reference)
                t = _device_time(fn, budget_s)
                rows.append({"case": case, "us": 1e3 * t.median_ms, "tflops": flops / (t.median_ms * 1e-3) / 1e12, "err": err})
            except Exception as exc:  # a backend this torch lacks must not hide the others
                rows.append({"case": case, "failed": f"{type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''}"})
    return rows


#: tile settings of the project's Triton kernel that the attention profile times
TRITON_CONFIGS = ((128, 64, 8, 3), (128, 64, 4, 3), (64, 64, 4, 3), (128, 128, 8, 2), (64, 32, 4, 4))


def _triton_cases(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, offsets: torch.Tensor, longest: int,
                  scale: float) -> Dict[str, Callable[[], torch.Tensor]]:
    """The Triton kernel at each of :data:`TRITON_CONFIGS`, the longest length rounded to 128;
    none where triton is not installed or the tensors are on the CPU without its interpreter."""
    try:
        from eco_m2f.modeling.token_reduction.triton_attention import TritonAttentionConfig, interpreted, varlen_attention_triton
    except ImportError:
        return {}
    if not (q.is_cuda or interpreted()):
        return {}
    max_len = -(-longest // 128) * 128
    cases = {}
    for m, n, warps, stages in TRITON_CONFIGS:
        config = TritonAttentionConfig(m, n, warps, stages)
        cases[f"triton varlen {config.label()}, max len/128 ({max_len})"] = (
            lambda config=config: varlen_attention_triton(q, k, v, offsets, max_len, scale, config))
    return cases


def token_wise_alone(block: nn.Module, rows: Sequence[int], budget_s: float = 0.05) -> Dict[int, Dict[str, float]]:
    """Device us per call of ``block``'s token-wise layers on ``rows`` packed rows (its own
    modules and dtype), and their sum for one eager block."""
    attn, mlp = block.attn, block.mlp
    weight = attn.qkv.weight
    out: Dict[int, Dict[str, float]] = {}
    with torch.inference_mode():
        for m in rows:
            gen = torch.Generator(device=weight.device).manual_seed(m)
            x, other = (torch.randn(m, weight.shape[1], device=weight.device, dtype=weight.dtype, generator=gen) for _ in range(2))
            h = torch.randn(m, mlp.fc1.out_features, device=weight.device, dtype=weight.dtype, generator=gen)
            ops = {
                "norm": lambda: block.norm1(x),
                "qkv": lambda: attn.qkv(x),
                "proj": lambda: attn.proj(x),
                "fc1": lambda: mlp.fc1(x),
                "gelu": lambda: mlp.act(h),
                "fc2": lambda: mlp.fc2(h),
                "add": lambda: x + other,
            }
            times = {name: 1e3 * _device_time(fn, budget_s).median_ms for name, fn in ops.items()}
            times["block sum"] = 2 * times["norm"] + times["qkv"] + times["proj"] + 2 * times["add"] + times["fc1"] + times["gelu"] + times["fc2"]
            out[m] = times
    return out
