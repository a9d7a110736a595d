"""Where the GPU waits for the host during a pass, and which line of the package made it wait.

A pass whose latency exceeds its GPU time (``scripts/profile_token_reduction.py`` prints both)
loses the difference in gaps between kernels: the GPU has finished what was queued and the CPU
has not yet issued the next work, typically after a host sync (the counts of a threshold
decision) or over a stretch of small eager operators. The kernel table says how long the GPU
worked, not where it waited. Here one profiler trace with Python stacks is read back: the GPU's
busy time is the union of its kernels, copies and memsets; every gap is charged to the
innermost frame of the package that launched the work ending it, and marked with the host wait
(a synchronisation call) that the gap followed, if any.

The Python tracer slows the host a little, so the profiled gaps are somewhat larger than the
unprofiled ones; their places and their ranking are what this is for.
"""
from __future__ import annotations

import json
import os
import re
import tempfile
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import torch

from .throughput import DTYPES, time_forward

__all__ = ["IdleReport", "PASS_ANNOTATION", "gpu_idle", "idle_report"]

#: The profiler annotation around each traced pass.
PASS_ANNOTATION = "eco_m2f.pass"
#: Trace categories of device work: its union is the GPU's busy time.
DEVICE_CATEGORIES = ("kernel", "gpu_memcpy", "gpu_memset")
#: Host-side launch categories (runtime and driver API calls carry the correlation id).
LAUNCH_CATEGORIES = ("cuda_runtime", "cuda_driver")
#: Runtime calls that block the host until the GPU reaches a point.
WAIT_CALLS = ("cudaEventSynchronize", "cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaMemcpy", "cuEventSynchronize",
              "cuStreamSynchronize", "cuCtxSynchronize")
#: Host and device clocks of a trace agree to about this (us) when a host wait is matched to a gap.
_CLOCK_SLACK_US = 2.0
_FRAME = re.compile(r"^(?P<file>.+?)\((?P<line>\d+)\): (?P<func>.+)$")


@dataclass
class Gap:
    """One stretch of GPU idleness inside a pass (microseconds on the trace's clock)."""

    start: float
    end: float
    launched_from: str  # the package frame that launched the work ending the gap
    launch: str  # the runtime call that launched it (cudaLaunchKernel, cudaGraphLaunch, ...)
    after_wait: str  # the package frame of the host wait the gap followed ("" when none)

    @property
    def us(self) -> float:
        return self.end - self.start


@dataclass
class IdleReport:
    """GPU busy and idle time per pass, and the gaps by place."""

    passes: int
    span_us: float  # summed over passes: from the pass's host start to its last device work
    busy_us: float  # summed over passes: the union of device work
    gaps: List[Gap] = field(default_factory=list)
    device_events: int = 0  # kernels, copies and memsets, summed over passes
    min_gap_us: float = 0.0

    @property
    def idle_us(self) -> float:
        return self.span_us - self.busy_us

    def by_place(self) -> List[Tuple[str, str, str, float, int]]:
        """(launched from, launch call, after wait, idle us, gaps) summed over passes, largest first."""
        total: Dict[Tuple[str, str, str], List[float]] = defaultdict(lambda: [0.0, 0])
        for g in self.gaps:
            entry = total[(g.launched_from, g.launch, g.after_wait)]
            entry[0] += g.us
            entry[1] += 1
        rows = [(k[0], k[1], k[2], v[0], int(v[1])) for k, v in total.items()]
        return sorted(rows, key=lambda r: -r[3])

    def table(self, top: int = 15) -> str:
        """The report as text: the totals per pass, then the ``top`` places by idle time."""
        n = max(self.passes, 1)
        shown = sum(g.us for g in self.gaps)
        lines = [
            f"GPU idle {self.idle_us / n / 1e3:.2f} ms of {self.span_us / n / 1e3:.2f} ms per pass "
            f"(busy {self.busy_us / n / 1e3:.2f} ms in {self.device_events / n:.0f} kernels and copies; {self.passes} profiled "
            f"passes with Python stacks; gaps of {self.min_gap_us:g} us or more: {shown / n / 1e3:.2f} ms per pass, the rest "
            f"between back-to-back kernels)",
            f"{'idle ms/pass':>13} {'gaps/pass':>9}  next work launched from (call)  [after a host wait at]",
        ]
        for place, call, wait, us, count in self.by_place()[:top]:
            after = f"  [after a host wait at {wait}]" if wait else ""
            lines.append(f"{us / n / 1e3:>13.3f} {count / n:>9.1f}  {place} ({call}){after}")
        return "\n".join(lines)


# ---------------------------------------------------------------------- the trace
def _frame_name(name: str, package: str) -> Optional[str]:
    """'.../eco_m2f/modeling/x.py(12): f' -> 'modeling/x.py:12 f' for frames of ``package``.

    ``package`` may also name a module (``probe`` for ``probe.py``): the profiler names a frame
    by its path below the ``sys.path`` entry that holds it, so a script's or a test file's frames
    carry their file name alone (``probe.py(9): f``)."""
    m = _FRAME.match(name)
    if m is None:
        return None
    path = m.group("file").replace("\\", "/")
    marker = f"{package}/"
    if path.startswith(marker):
        rel = path[len(marker):]
    elif f"/{marker}" in path:
        rel = path.split(f"/{marker}", 1)[1]
    elif path == f"{package}.py":
        rel = path
    else:
        return None
    return f"{rel}:{m.group('line')} {m.group('func')}"


class _Frames:
    """The package's Python frames of one host thread, to find the innermost one around a time."""

    def __init__(self, events: Iterable[dict], package: str) -> None:
        self.frames: List[Tuple[float, float, str]] = []
        for e in events:
            name = _frame_name(e.get("name", ""), package)
            if name is not None:
                self.frames.append((float(e["ts"]), float(e["ts"]) + float(e.get("dur", 0.0)), name))
        self.frames.sort()

    def at(self, ts: float) -> str:
        """The innermost (latest-starting) frame that contains ``ts``, or ``?``."""
        best = "?"
        for start, end, name in self.frames:
            if start > ts:
                break
            if end >= ts:
                best = name
        return best


def _merged(intervals: List[Tuple[float, float]]) -> List[Tuple[float, float]]:
    out: List[List[float]] = []
    for start, end in sorted(intervals):
        if out and start <= out[-1][1]:
            out[-1][1] = max(out[-1][1], end)
        else:
            out.append([start, end])
    return [(a, b) for a, b in out]


def idle_report(events: Sequence[dict], package: str = "eco_m2f", min_gap_us: float = 5.0,
                annotation: str = PASS_ANNOTATION) -> IdleReport:
    """The GPU idle report of a chrome trace's ``traceEvents`` holding passes annotated with
    ``annotation`` (host user annotations). A pass's device work is what its host window
    launched (matched by correlation id); its span runs from the host start of the pass to the
    end of that work. Gaps shorter than ``min_gap_us`` count as idle time but are not listed."""
    complete = [e for e in events if e.get("ph") == "X" and "ts" in e]
    passes = sorted((float(e["ts"]), float(e["ts"]) + float(e.get("dur", 0.0)), e.get("tid"))
                    for e in complete if e.get("cat") == "user_annotation" and e.get("name") == annotation)
    if not passes:
        raise ValueError(f"the trace holds no '{annotation}' annotations: nothing to report")
    launches: Dict[int, dict] = {}
    waits: List[dict] = []
    host_events: Dict[object, List[dict]] = defaultdict(list)
    device: List[dict] = []
    for e in complete:
        cat = e.get("cat")
        if cat in DEVICE_CATEGORIES:
            device.append(e)
        elif cat in LAUNCH_CATEGORIES:
            corr = e.get("args", {}).get("correlation")
            if corr is not None:
                launches[int(corr)] = e
            if e.get("name") in WAIT_CALLS:
                waits.append(e)
        elif cat == "python_function":
            host_events[e.get("tid")].append(e)
    if not device:
        raise ValueError("the trace holds no device events (kernels, copies): a CUDA trace is needed")
    frames = {tid: _Frames(evs, package) for tid, evs in host_events.items()}
    waits.sort(key=lambda e: float(e["ts"]) + float(e.get("dur", 0.0)))

    def frame(tid: object, ts: float) -> str:
        f = frames.get(tid)
        return f.at(ts) if f is not None else "?"

    # each device event with the host event that launched it (None where the trace has no record)
    spans: List[Tuple[float, float, Optional[dict]]] = []
    for e in device:
        corr = e.get("args", {}).get("correlation")
        host = launches.get(int(corr)) if corr is not None else None
        spans.append((float(e["ts"]), float(e["ts"]) + float(e.get("dur", 0.0)), host))
    spans.sort(key=lambda s: s[0])
    report = IdleReport(passes=len(passes), span_us=0.0, busy_us=0.0, min_gap_us=float(min_gap_us))
    for start, end, _ in passes:
        # the pass's device work: what ran inside its host window (which ends with a synchronisation)
        mine = [s for s in spans if s[0] >= start and s[1] <= end]
        if not mine:
            continue
        busy = _merged([(a, b) for a, b, _ in mine])
        report.device_events += len(mine)
        report.span_us += busy[-1][1] - start
        report.busy_us += sum(b - a for a, b in busy)
        opener: Dict[float, Optional[dict]] = {}
        for a, _, h in mine:  # the work that starts each busy stretch, and who launched it
            if opener.get(a) is None:
                opener[a] = h
        previous_end = start
        for a, b in busy:
            if a - previous_end >= min_gap_us:
                h = opener[a]
                if h is None:
                    report.gaps.append(Gap(previous_end, a, "?", "no launch record", ""))
                else:
                    launch_ts = float(h["ts"])
                    after = ""
                    for w in waits:  # the last host wait that ended inside the gap, before the launch
                        w_end = float(w["ts"]) + float(w.get("dur", 0.0))
                        if previous_end - _CLOCK_SLACK_US <= w_end <= launch_ts and w.get("tid") == h.get("tid"):
                            after = frame(w.get("tid"), float(w["ts"]))
                    report.gaps.append(Gap(previous_end, a, frame(h.get("tid"), launch_ts), str(h.get("name", "?")), after))
            previous_end = b
    return report


# ---------------------------------------------------------------------- the run
def gpu_idle(fn: Callable[[torch.Tensor], object], images: torch.Tensor, dtype: str, iters: int = 3,
             package: str = "eco_m2f", min_gap_us: float = 5.0) -> IdleReport:
    """Profile ``iters`` passes of ``fn(images)`` (after warm-up) under autocast to ``dtype``, each
    synchronised as :func:`~.throughput.time_forward` times them, and report where the GPU idled."""
    from torch.profiler import ProfilerActivity, profile, record_function

    if images.device.type != "cuda":
        raise ValueError("gpu_idle needs a CUDA device (it reads the GPU's kernels from the trace)")
    time_forward(fn, images, dtype, warmup=3, iters=0)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], with_stack=True) as prof:
        with torch.inference_mode(), torch.autocast("cuda", dtype=DTYPES[dtype], enabled=dtype != "fp32"):
            for _ in range(iters):
                with record_function(PASS_ANNOTATION):
                    fn(images)
                    torch.cuda.synchronize(images.device)
    fd, path = tempfile.mkstemp(suffix=".json")
    os.close(fd)
    try:
        prof.export_chrome_trace(path)
        with open(path) as f:
            events = json.load(f)["traceEvents"]
    finally:
        os.unlink(path)
    return idle_report(events, package, min_gap_us)
