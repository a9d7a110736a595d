"""The shared warm-up-then-capture step of every CUDA graph holder, checked on CPU with stand-ins
for torch.cuda's streams and graphs: the warm-up runs once, on the side stream, before the
capture; the capture records ``forward`` and hands back its outputs."""
from __future__ import annotations

import contextlib

import torch

from eco_m2f.utils import cuda_graph


class _Stream:
    def __init__(self, name):
        self.name, self.waited = name, []

    def wait_stream(self, other):
        self.waited.append(other.name)


def test_warm_up_on_a_side_stream_then_capture(monkeypatch):
    events, current = [], {"stream": "main"}
    main = _Stream("main")

    @contextlib.contextmanager
    def on(stream):
        current["stream"] = stream.name
        yield
        current["stream"] = "main"

    class _Graph:
        pass

    @contextlib.contextmanager
    def capturing(graph, pool=None):
        events.append(("capture-begin", pool))
        current["stream"] = "capture"
        yield
        current["stream"] = "main"
        events.append(("capture-end", pool))

    monkeypatch.setattr(torch.cuda, "Stream", lambda device: _Stream("side"))
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device: main)
    monkeypatch.setattr(torch.cuda, "stream", on)
    monkeypatch.setattr(torch.cuda, "CUDAGraph", _Graph)
    monkeypatch.setattr(torch.cuda, "graph", capturing)

    def forward():
        events.append(("forward", current["stream"]))
        return {"out": len(events)}

    graph, out = cuda_graph.warm_and_capture(forward, torch.device("cpu"), "pool")
    assert isinstance(graph, _Graph)
    assert events == [("forward", "side"), ("capture-begin", "pool"), ("forward", "capture"), ("capture-end", "pool")]
    assert out == {"out": 3} and main.waited == ["side"]  # the captured call's outputs; main waits for the warm-up

    events.clear()
    cuda_graph.warm_and_capture(forward, torch.device("cpu"), None, warmup=lambda: events.append(("warmup", current["stream"])))
    assert events[0] == ("warmup", "side") and events.count(("forward", "capture")) == 1 and len(events) == 4
