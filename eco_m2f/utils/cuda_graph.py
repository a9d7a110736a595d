"""Capturing a CUDA graph the way every graph holder of the project does it (the token runtime's
blocks, the decode head, the CTS policy): one warm-up pass on a side stream, outside the capture
(library handles, kernel choices, compilation happen there), then the capture into a shared pool."""
from __future__ import annotations

from typing import Callable, Optional, Tuple, TypeVar

import torch

__all__ = ["warm_and_capture"]

T = TypeVar("T")


def warm_and_capture(
    forward: Callable[[], T], device: torch.device, pool, warmup: Optional[Callable[[], object]] = None
) -> Tuple["torch.cuda.CUDAGraph", T]:
    """Run ``warmup`` (default ``forward``) once on a side stream, then capture ``forward`` into a
    new graph in ``pool``. Returns the graph and what ``forward`` returned while captured: the
    graph's output buffers, which every replay overwrites."""
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        (warmup or forward)()
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool):
        out = forward()
    return graph, out
