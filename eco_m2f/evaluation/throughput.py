"""Forward-pass throughput: images/s and latency after warm-up, CUDA-synchronised.

Used by ``scripts/benchmark.py`` to time a model's ``network`` (and its ``benchmark_stages``)
against Hugging Face ``transformers``' Mask2Former built with the same sizes, in the same
process, so the two share one machine state.
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional

import torch
import torch.nn as nn

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class Timing:
    name: str
    batch: int
    dtype: str
    latency_ms: float  # median time of one forward pass of the batch
    images_per_s: float


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_callable(fn: Callable[[], object], warmup: int = 5, iters: int = 20, device: Optional[torch.device] = None) -> float:
    """Median wall time (ms) of ``fn()`` after ``warmup`` calls, synchronising ``device`` (default:
    the current CUDA device if any) around each timed call; NaN when ``iters`` is 0."""
    if device is None:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    for _ in range(warmup):
        fn()
    _sync(device)
    times: List[float] = []
    for _ in range(iters):
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3 if times else float("nan")


@dataclass
class CallTime:
    """Per-call time of a stream of calls: median and quartiles over timed rounds (ms)."""

    median_ms: float
    q1_ms: float
    q3_ms: float
    calls: int  # timed calls over all rounds


def time_back_to_back(
    fn: Callable[[], object],
    budget_s: float = 0.25,
    device: Optional[torch.device] = None,
    warmup: int = 3,
    min_rounds: int = 5,
    max_rounds: int = 200,
    round_ms: float = 5.0,
) -> CallTime:
    """Time ``fn()`` issued back to back: rounds of k calls between two CUDA events (host clock
    on CPU), k chosen so that a round lasts about ``round_ms``, as many rounds as ``budget_s``
    allows (at least ``min_rounds``).

    :func:`time_callable` synchronises around every call, so each figure carries one host
    launch latency and one synchronisation; for calls of a few milliseconds that fixed cost is
    a bias of its own. Here no call waits for the one before it: the figure is the rate at which
    a stream of calls completes, host-bound or device-bound, whichever is slower.
    """
    if device is None:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cuda = device.type == "cuda"
    for _ in range(warmup):
        fn()
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    calls = max(1, int(round_ms / 1e3 / max(time.perf_counter() - start, 1e-6)))
    rounds: List[float] = []
    deadline = time.perf_counter() + budget_s
    while len(rounds) < max_rounds and (len(rounds) < min_rounds or time.perf_counter() < deadline):
        if cuda:
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            begin.record()
            for _ in range(calls):
                fn()
            end.record()
            end.synchronize()
            rounds.append(begin.elapsed_time(end) / calls)
        else:
            t0 = time.perf_counter()
            for _ in range(calls):
                fn()
            rounds.append((time.perf_counter() - t0) * 1e3 / calls)
    q1, median, q3 = statistics.quantiles(rounds, n=4) if len(rounds) > 1 else (rounds[0],) * 3
    return CallTime(median, q1, q3, calls * len(rounds))


def time_graph(fn: Callable[[], object], calls: int = 10, budget_s: float = 0.1, device: Optional[torch.device] = None) -> CallTime:
    """Per-call time of ``fn()`` with ``calls`` of them captured in one CUDA graph and the graph
    replayed back to back: the device time of its kernels and the gaps between them, without the
    host's launch cost (for timing a kernel or two). ``fn`` must be capturable."""
    device = device or torch.device("cuda", torch.cuda.current_device())
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        for _ in range(2):
            fn()
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    per_replay = time_back_to_back(graph.replay, budget_s, device)
    return CallTime(per_replay.median_ms / calls, per_replay.q1_ms / calls, per_replay.q3_ms / calls, per_replay.calls * calls)


class GraphedForward:
    """``fn(images)`` as one CUDA graph per input shape: each call copies its input into the
    graph's input buffer and replays the graph (outputs are the graph's buffers, overwritten by the
    next call).

    The strongest form of a model whose shapes do not depend on the content (a dense baseline):
    no host launch cost is left in its time. Captured on the first call of each shape, under the
    caller's autocast dtype and inference mode, after one warm-up pass on a side stream. The
    capture runs with autocast's weight cache off, so the casts are inside the graph: cached casts
    would be tensors of the caller's autocast context, freed when it ends, and a replay after it
    would read freed memory.
    """

    def __init__(self, fn: Callable[[torch.Tensor], object]) -> None:
        self.fn = fn
        self._graphs: Dict[tuple, tuple] = {}  # (shape, dtype) -> (graph, input buffer, outputs)

    def __call__(self, images: torch.Tensor) -> object:
        if images.device.type != "cuda":
            raise ValueError(f"GraphedForward needs CUDA images, got them on {images.device}")
        key = (tuple(images.shape), images.dtype)
        if key not in self._graphs:
            from ..utils.cuda_graph import warm_and_capture

            static = images.clone()
            cast = torch.get_autocast_dtype("cuda") if torch.is_autocast_enabled("cuda") else None

            def forward():
                with torch.autocast("cuda", dtype=cast or torch.bfloat16, enabled=cast is not None, cache_enabled=False):
                    return self.fn(static)

            graph, out = warm_and_capture(forward, images.device, None)
            self._graphs[key] = (graph, static, out)
        graph, static, out = self._graphs[key]
        static.copy_(images)
        graph.replay()
        return out


def time_forward(
    fn: Callable[[torch.Tensor], object],
    images: torch.Tensor,
    dtype: str,
    warmup: int = 10,
    iters: int = 30,
) -> tuple[float, float]:
    """(median latency in ms, images/s) of ``fn(images)`` under autocast to ``dtype``."""
    if dtype not in DTYPES:
        raise ValueError(f"Unknown dtype '{dtype}'; choose from {sorted(DTYPES)}")
    device = images.device
    with torch.inference_mode(), torch.autocast(device.type, dtype=DTYPES[dtype], enabled=dtype != "fp32"):
        latency = time_callable(lambda: fn(images), warmup, iters, device)
    return latency, images.shape[0] / latency * 1e3


def stage_times(
    fn: Callable[[torch.Tensor], object],
    images: torch.Tensor,
    dtype: str,
    stages: Dict[str, tuple],
    iters: int = 10,
) -> Dict[str, float]:
    """Mean GPU time (ms) inside each stage per ``fn(images)``; ``stages``: name -> (object, method name).

    Each method is wrapped for the duration with CUDA events around the call, so the figure is
    GPU time between the stage's first and last kernel; when a pass is launch-bound the stages
    add up to less than its latency.
    """
    if images.device.type != "cuda":
        raise ValueError("stage_times needs a CUDA device (it times with CUDA events)")
    events: Dict[str, list] = {name: [] for name in stages}

    def timed(name: str, method: Callable) -> Callable:
        def run(*args, **kwargs):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            out = method(*args, **kwargs)
            end.record()
            events[name].append((start, end))
            return out

        return run

    patched = []
    for name, (obj, attr) in stages.items():
        if attr in vars(obj):
            raise ValueError(f"stage '{name}': {type(obj).__name__}.{attr} is already overridden on the instance")
        setattr(obj, attr, timed(name, getattr(obj, attr)))
        patched.append((obj, attr))
    try:
        time_forward(fn, images, dtype, warmup=2, iters=0)
        for ev in events.values():
            ev.clear()
        time_forward(fn, images, dtype, warmup=0, iters=iters)
    finally:
        for obj, attr in patched:
            delattr(obj, attr)
    torch.cuda.synchronize(images.device)
    return {name: sum(s.elapsed_time(e) for s, e in ev) / iters for name, ev in events.items()}


def profile_kernels(fn: Callable[[torch.Tensor], object], images: torch.Tensor, dtype: str, top: int = 15, iters: int = 3) -> str:
    """torch.profiler's table of the ``top`` operators by GPU time over ``iters`` passes (after warm-up)."""
    from torch.profiler import ProfilerActivity, profile

    time_forward(fn, images, dtype, warmup=2, iters=0)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if images.device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        time_forward(fn, images, dtype, warmup=0, iters=iters)
    sort = "self_cuda_time_total" if images.device.type == "cuda" else "self_cpu_time_total"
    return prof.key_averages().table(sort_by=sort, row_limit=top)


def hf_stages(model: nn.Module) -> Dict[str, tuple]:
    """The stages of transformers' Mask2Former that match MaskFormer's ``benchmark_stages()``."""
    m = model.model
    return {
        "backbone": (m.pixel_level_module.encoder, "forward"),
        "pixel decoder": (m.pixel_level_module.decoder, "forward"),
        "transformer decoder": (m.transformer_module, "forward"),
    }


def build_hf_mask2former(cfg) -> nn.Module:
    """transformers' Mask2FormerForUniversalSegmentation with the sizes of ``cfg`` (random weights).

    Swin backbones map MODEL.SWIN.*; ResNet ones use transformers' ResNetConfig of the same depth.
    """
    from transformers import Mask2FormerConfig, Mask2FormerForUniversalSegmentation, ResNetConfig, SwinConfig

    mf, head = cfg.MODEL.MASK_FORMER, cfg.MODEL.SEM_SEG_HEAD
    if cfg.MODEL.BACKBONE.NAME == "D2SwinTransformer":
        sw = cfg.MODEL.SWIN
        backbone = SwinConfig(
            embed_dim=sw.EMBED_DIM,
            depths=list(sw.DEPTHS),
            num_heads=list(sw.NUM_HEADS),
            window_size=sw.WINDOW_SIZE,
            mlp_ratio=sw.MLP_RATIO,
            drop_path_rate=sw.DROP_PATH_RATE,
            out_features=["stage1", "stage2", "stage3", "stage4"],
        )
    else:
        depths = {50: [3, 4, 6, 3], 101: [3, 4, 23, 3]}[cfg.MODEL.RESNETS.DEPTH]
        backbone = ResNetConfig(depths=depths, layer_type="bottleneck", out_features=["stage1", "stage2", "stage3", "stage4"])
    config = Mask2FormerConfig(
        backbone_config=backbone,
        num_labels=head.NUM_CLASSES,
        feature_size=head.CONVS_DIM,
        mask_feature_size=head.MASK_DIM,
        hidden_dim=mf.HIDDEN_DIM,
        encoder_feedforward_dim=head.DEFORMABLE_TRANSFORMER_ENCODER_DIM_FEEDFORWARD,
        encoder_layers=head.TRANSFORMER_ENC_LAYERS,
        decoder_layers=mf.DEC_LAYERS,
        num_attention_heads=mf.NHEADS,
        dim_feedforward=mf.DIM_FEEDFORWARD,
        num_queries=mf.NUM_OBJECT_QUERIES,
        common_stride=head.COMMON_STRIDE,
    )
    return Mask2FormerForUniversalSegmentation(config)


def hf_forward(model: nn.Module) -> Callable[[torch.Tensor], object]:
    def run(images: torch.Tensor):
        return model(pixel_values=images)

    return run


def format_timings(rows: List[Timing], baseline: str, ours) -> str:
    """A table of the timings with the speed ratio ours / baseline per (batch, dtype).

    ``ours``: the name (or list of names) of the rows that get a ratio.
    """
    ours = {ours} if isinstance(ours, str) else set(ours)
    width = max([28] + [len(r.name) + 2 for r in rows])
    lines = [f"{'model':<{width}}{'batch':>6}{'dtype':>7}{'latency ms':>12}{'images/s':>11}{'speed-up':>10}"]
    index: Dict[tuple, Timing] = {(r.name, r.batch, r.dtype): r for r in rows}
    for r in rows:
        ratio = ""
        if r.name in ours and (baseline, r.batch, r.dtype) in index:
            ratio = f"{r.images_per_s / index[(baseline, r.batch, r.dtype)].images_per_s:.2f}x"
        lines.append(f"{r.name:<{width}}{r.batch:>6}{r.dtype:>7}{r.latency_ms:>12.2f}{r.images_per_s:>11.1f}{ratio:>10}")
    return "\n".join(lines)


def host_profile(fn: Callable[[torch.Tensor], object], images: torch.Tensor, dtype: str, top: int = 20, iters: int = 5) -> str:
    """Where the CPU spends a pass: cProfile's table of the ``top`` Python functions by their own
    time over ``iters`` passes (after warm-up). A pass whose latency exceeds its GPU time is
    host-bound; this names the functions that keep the GPU waiting."""
    import cProfile
    import io
    import pstats

    time_forward(fn, images, dtype, warmup=2, iters=0)
    profiler = cProfile.Profile()
    with torch.inference_mode(), torch.autocast(images.device.type, dtype=DTYPES[dtype], enabled=dtype != "fp32"):
        profiler.enable()
        for _ in range(iters):
            fn(images)
        _sync(images.device)
        profiler.disable()
    text = io.StringIO()
    stats = pstats.Stats(profiler, stream=text)
    stats.sort_stats("tottime").print_stats(top)
    return f"host time of {iters} passes (cProfile, sorted by own time)\n" + text.getvalue().split("Ordered by:", 1)[-1]


def sync_points(fn: Callable[[torch.Tensor], object], images: torch.Tensor, dtype: str, package: str = "eco_m2f") -> List[str]:
    """The host syncs of one pass (after warm-up): for every CUDA operation that made the CPU
    wait for the GPU, the innermost frame of ``package`` that called it ("file:line function")."""
    import traceback
    import warnings

    if images.device.type != "cuda":
        raise ValueError("sync_points needs a CUDA device")
    time_forward(fn, images, dtype, warmup=2, iters=0)
    found: List[str] = []

    def record(message, category, filename, lineno, file=None, line=None) -> None:
        if "synchronizing" not in str(message):
            return
        frames = [f for f in traceback.extract_stack() if f"/{package}/" in f.filename.replace("\\", "/")]
        where = frames[-1] if frames else traceback.extract_stack()[-3]
        found.append(f"{where.filename.split(f'/{package}/')[-1]}:{where.lineno} {where.name}")

    old_show = warnings.showwarning
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = record
        torch.cuda.set_sync_debug_mode("warn")
        try:
            with torch.inference_mode(), torch.autocast("cuda", dtype=DTYPES[dtype], enabled=dtype != "fp32"):
                fn(images)
        finally:
            torch.cuda.set_sync_debug_mode("default")
            warnings.showwarning = old_show
    return found
