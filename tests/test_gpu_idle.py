"""The GPU-idle report (evaluation/gpu_idle.py): gaps, busy time and their places on a constructed
trace; a CUDA run with a known host stall."""
from __future__ import annotations

import time

import pytest
import torch

from eco_m2f.evaluation.gpu_idle import PASS_ANNOTATION, gpu_idle, idle_report

HOST = 11  # host thread id of the constructed trace


def _x(cat, name, ts, dur, **args):
    return {"ph": "X", "cat": cat, "name": name, "pid": 1, "tid": HOST if cat not in ("kernel", "gpu_memcpy") else 7,
            "ts": ts, "dur": dur, "args": args}


def _trace():
    """Two passes. Pass 1 (0-150 us): kernel A launched at 10 runs 20-50, B 50-80; the host waits
    16-81; C, launched at 120 from finish_keep, runs 125-140; a graph kernel without a launch
    record at 140-145. Pass 2 (200-300): one kernel launched at 205 from graphs.py, running 260-290."""
    pkg = "/site/eco_m2f/modeling/token_reduction"
    return [
        _x("user_annotation", PASS_ANNOTATION, 0, 150),
        _x("python_function", f"{pkg}/encoder_loop.py(120): encode", 0, 150),
        _x("python_function", f"{pkg}/graphs.py(133): _call", 5, 10),
        _x("python_function", "torch/cuda/graphs.py(137): replay", 8, 5),  # not the package: skipped
        _x("cuda_runtime", "cudaLaunchKernel", 10, 2, correlation=1),
        _x("cuda_runtime", "cudaLaunchKernel", 15, 1, correlation=2),
        _x("python_function", f"{pkg}/packing.py(50): wait", 16, 66),
        _x("cuda_runtime", "cudaEventSynchronize", 16, 65),
        _x("python_function", f"{pkg}/static_decision.py(200): finish_keep", 82, 48),
        _x("cuda_runtime", "cudaMemcpyAsync", 120, 3, correlation=3),
        _x("kernel", "A", 20, 30, correlation=1),
        _x("kernel", "B", 50, 30, correlation=2),
        _x("gpu_memcpy", "C", 125, 15, correlation=3),
        _x("kernel", "graph node", 140, 5),
        _x("user_annotation", PASS_ANNOTATION, 200, 100),
        _x("python_function", f"{pkg}/graphs.py(133): _call", 201, 10),
        _x("cuda_runtime", "cudaGraphLaunch", 205, 4, correlation=4),
        _x("kernel", "D", 260, 30, correlation=4),
        _x("kernel", "outside every pass", 400, 50, correlation=9),
    ]


def test_the_report_finds_every_gap_its_place_and_the_wait_before_it():
    report = idle_report(_trace(), min_gap_us=5.0)
    assert report.passes == 2
    assert report.span_us == pytest.approx(145 + 90)  # pass start to its last device work
    assert report.busy_us == pytest.approx(60 + 15 + 5 + 30)
    assert report.idle_us == pytest.approx(145 + 90 - 110)
    assert report.device_events == 5
    gaps = [(g.start, g.end, g.launched_from, g.launch, g.after_wait) for g in report.gaps]
    assert gaps == [
        (0, 20, "modeling/token_reduction/graphs.py:133 _call", "cudaLaunchKernel", ""),
        (80, 125, "modeling/token_reduction/static_decision.py:200 finish_keep", "cudaMemcpyAsync",
         "modeling/token_reduction/packing.py:50 wait"),
        (200, 260, "modeling/token_reduction/graphs.py:133 _call", "cudaGraphLaunch", ""),
    ]
    places = [(place.split("/")[-1], call, us, n) for place, call, _, us, n in report.by_place()]
    assert places == [("graphs.py:133 _call", "cudaGraphLaunch", 60, 1), ("static_decision.py:200 finish_keep", "cudaMemcpyAsync", 45, 1),
                      ("graphs.py:133 _call", "cudaLaunchKernel", 20, 1)]
    text = report.table()
    assert "GPU idle 0.06 ms of 0.12 ms per pass" in text
    assert "after a host wait at modeling/token_reduction/packing.py:50 wait" in text


def test_short_gaps_count_as_idle_but_are_not_listed():
    report = idle_report(_trace(), min_gap_us=50.0)
    assert [g.end for g in report.gaps] == [260]
    assert report.idle_us == pytest.approx(125)


def test_a_trace_without_passes_or_device_work_is_refused():
    with pytest.raises(ValueError, match="no 'eco_m2f.pass' annotations"):
        idle_report([e for e in _trace() if e["cat"] != "user_annotation"])
    with pytest.raises(ValueError, match="no device events"):
        idle_report([e for e in _trace() if e["cat"] not in ("kernel", "gpu_memcpy")])


def test_gpu_idle_needs_cuda():
    with pytest.raises(ValueError, match="needs a CUDA device"):
        gpu_idle(lambda x: x * 2, torch.zeros(2), "fp32")


def test_a_module_s_frames_are_found_by_its_file_name():
    """A script's or test file's frames carry the file name alone (as a CUDA trace on an H100 named
    them): ``package`` naming the module finds them, not a same-named file elsewhere (torch/cuda/graphs.py),
    and a package name does not."""
    events = [dict(e, name=e["name"].replace("/site/eco_m2f/modeling/token_reduction/graphs.py", "graphs.py"))
              for e in _trace()]
    places = {g.launched_from for g in idle_report(events, package="graphs", min_gap_us=5.0).gaps}
    assert places == {"graphs.py:133 _call", "?"}
    assert "graphs.py:133 _call" not in {g.launched_from for g in idle_report(events, min_gap_us=5.0).gaps}


def _stalled(x: torch.Tensor) -> torch.Tensor:
    y = x @ x
    y.sum().item()  # the host waits for the GPU here
    time.sleep(0.003)  # and then keeps it idle for 3 ms
    return y @ y


@pytest.mark.gpu
def test_a_host_stall_after_a_sync_is_found_on_cuda():
    x = torch.randn(512, 512, device="cuda")
    # the profiler names this file's frames 'test_gpu_idle.py(N): f' (its folder is on sys.path)
    report = gpu_idle(_stalled, x, "fp32", iters=2, package="test_gpu_idle")
    top = report.by_place()[0]
    assert top[3] / report.passes > 2500  # microseconds
    assert "test_gpu_idle.py" in top[0] and "_stalled" in top[0]
    assert "test_gpu_idle.py" in top[2]  # the .item() wait before it
    assert report.idle_us / report.passes > 2500
