"""Inference through captured CUDA graphs: a run of blocks replayed with one launch.

Eager PyTorch issues some 18 kernels per ViT block from Python. Once tokens are removed the GPU
finishes them faster than the CPU issues them, and the time saved stops following the FLOPs
saved. A CUDA graph replays the whole run of blocks with one launch. One graph serves every
batch whose packed rows fit its bucket: the image offsets live in a device buffer that the
flash varlen kernel reads at run time; rows past the last image are padding that no image
attends to and every other layer treats row by row; the longest sequence only sizes the
kernel's grid, so it is rounded up as well. Graphs are captured on first use of a bucket and
kept (least recently used first out).
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Hashable, Sequence, Tuple

import torch
import torch.nn as nn

from .blocks import check_block, run_block, run_blocks
from .token_set import TokenSet

__all__ = ["GraphedBlocks"]


class _GraphLayout:
    """The part of a :class:`~.packing.PackedLayout` that the flash backend reads, backed by
    static buffers so that a captured graph can be replayed for other lengths."""

    uniform = False  # never the dense shortcut: its shapes would depend on the lengths

    def __init__(self, offsets: torch.Tensor, max_len: int) -> None:
        self._offsets = offsets  # (B + 1,) int32, rewritten before every replay
        self.max_len = max_len  # upper bound of the lengths: sizes the kernel's grid
        self.batch_size = offsets.numel() - 1

    def offsets(self, dtype: torch.dtype = torch.int32) -> torch.Tensor:
        if dtype != torch.int32:
            raise ValueError("graph-captured attention reads int32 offsets only")
        return self._offsets


@dataclass
class _Captured:
    graph: torch.cuda.CUDAGraph
    rows_in: torch.Tensor  # (rows, C) static input
    offsets: torch.Tensor  # (B + 1,) int32 static offsets
    rows_out: torch.Tensor  # (rows, C) static output


class GraphedBlocks:
    """Run ``blocks`` (timm ViT ``Block`` s) on token sets through CUDA graphs in inference.

    Not a module: it holds the model's own blocks without registering them twice. Falls back to
    :func:`~.blocks.run_blocks` (eager) for CPU tensors, when gradients are enabled or a block is
    in training mode. Call :meth:`reset` after moving or replacing the blocks' parameters.

    Args:
        blocks: the run of blocks between two reductions.
        attention: ``flash`` or ``varlen`` (the kernels that read offsets from the device).
        row_bucket: packed row counts are rounded up to a multiple of this.
        len_bucket: the longest sequence is rounded up to a multiple of this.
        max_graphs: how many captured graphs to keep.
    """

    def __init__(
        self,
        blocks: Sequence[nn.Module],
        attention: str = "flash",
        row_bucket: int = 256,
        len_bucket: int = 128,
        max_graphs: int = 16,
    ) -> None:
        if attention not in ("flash", "varlen"):
            raise ValueError(f"graph-captured attention must be 'flash' or 'varlen', got '{attention}'")
        self.blocks = list(blocks)
        for block in self.blocks:
            check_block(block)
        self.attention = attention
        self.row_bucket, self.len_bucket, self.max_graphs = int(row_bucket), int(len_bucket), int(max_graphs)
        self._graphs: "OrderedDict[Hashable, _Captured]" = OrderedDict()
        self._pool = None

    def reset(self) -> None:
        """Drop every captured graph (they point at the parameters' current memory)."""
        self._graphs.clear()
        self._pool = None

    def applies(self, tokens: TokenSet) -> bool:
        """Whether a call with ``tokens`` replays a graph (else it runs eagerly)."""
        x = tokens.x
        half = (torch.get_autocast_dtype("cuda") if torch.is_autocast_enabled("cuda") else x.dtype) in (torch.float16, torch.bfloat16)
        return x.is_cuda and half and not torch.is_grad_enabled() and not any(b.training for b in self.blocks)

    def __call__(self, tokens: TokenSet) -> TokenSet:
        if not self.applies(tokens):
            return run_blocks(self.blocks, tokens, "auto")
        layout = tokens.layout
        key = self._key(tokens)
        captured = self._graphs.get(key)
        if captured is None:
            captured = self._capture(key, tokens)
        else:
            self._graphs.move_to_end(key)
            self._load(captured, tokens)
        captured.graph.replay()
        rows = captured.rows_out[: layout.total].clone()
        return tokens.with_features(rows, tokens.history + (layout.lengths,) * len(self.blocks))

    # ------------------------------------------------------------------ internals
    def _key(self, tokens: TokenSet) -> Tuple:
        layout, x = tokens.layout, tokens.x
        rows = -(-layout.total // self.row_bucket) * self.row_bucket
        longest = -(-layout.max_len // self.len_bucket) * self.len_bucket
        cast = torch.get_autocast_dtype("cuda") if torch.is_autocast_enabled("cuda") else None
        return (x.device, x.dtype, x.shape[1], layout.batch_size, rows, longest, cast)

    @staticmethod
    def _load(captured: _Captured, tokens: TokenSet) -> None:
        captured.rows_in[: tokens.layout.total].copy_(tokens.x)
        captured.offsets.copy_(tokens.layout.offsets(torch.int32))

    def _capture(self, key: Tuple, tokens: TokenSet) -> _Captured:
        device, dtype, channels, batch, rows, longest, cast = key
        while len(self._graphs) >= self.max_graphs:
            self._graphs.popitem(last=False)
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        # normal (not inference-mode) buffers, so that later calls may write them in any mode
        with torch.inference_mode(False), torch.no_grad():
            rows_in = torch.zeros(rows, channels, device=device, dtype=dtype)
            offsets = torch.zeros(batch + 1, device=device, dtype=torch.int32)
            captured = _Captured(torch.cuda.CUDAGraph(), rows_in, offsets, rows_in)
            self._load(captured, tokens)
            layout = _GraphLayout(offsets, longest)

            def forward() -> torch.Tensor:
                with torch.autocast("cuda", dtype=cast or torch.bfloat16, enabled=cast is not None, cache_enabled=False):
                    x = rows_in
                    for block in self.blocks:
                        x = run_block(block, x, layout, self.attention)
                    return x

            side = torch.cuda.Stream(device)
            side.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(side):  # warm-up outside the capture: library handles, lazy init
                forward()
            torch.cuda.current_stream(device).wait_stream(side)
            with torch.cuda.graph(captured.graph, pool=self._pool):
                captured.rows_out = forward()
        self._graphs[key] = captured
        return captured

    def __len__(self) -> int:
        return len(self._graphs)

    def __repr__(self) -> str:
        return f"GraphedBlocks({len(self.blocks)} blocks, attention={self.attention}, graphs={len(self._graphs)})"

