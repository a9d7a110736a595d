"""Inference through captured CUDA graphs: a run of blocks replayed with one launch.

Eager PyTorch issues some 18 kernels per ViT block from Python. Once tokens are removed the GPU
finishes them faster than the CPU issues them, and the time saved stops following the FLOPs
saved. A CUDA graph replays the whole run of blocks with one launch. One graph serves every
batch whose packed rows fit its bucket: the image offsets live in a device buffer that the
ragged attention kernel reads at run time; the rows past the last image form one more image of
padding, attended within itself like the others (so that every row of every layer holds finite
values) and cut off at the end; the longest sequence only sizes the
kernel's grid, so it is rounded up as well. A batch of several images that all hold the same
number of tokens (or one image holding all of them) replays a graph of the dense attention at
its exact shape instead. A threshold decision after the blocks can be captured in the same
graph (:meth:`GraphedBlocks.run_deciding`, :mod:`.static_decision`). Graphs are captured
on first use of a bucket and kept (least recently used first out). How rows and lengths are
bucketed, which attention runs and whether the token-wise work is compiled are
:class:`~.options.InferenceOptions`; the default is :data:`~.options.DEFAULT_INFERENCE`.
"""
from __future__ import annotations

import dataclasses
import time
import warnings
from collections import OrderedDict
from dataclasses import dataclass
from typing import Dict, Hashable, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from ...utils.cuda_graph import warm_and_capture
from .blocks import check_block, run_block, run_blocks
from .fused import FusedBlocks, compile_failure, fusable
from .options import InferenceOptions, default_inference
from .packing import StaticLayout
from .static_decision import StaticDecision
from .token_set import TokenSet

__all__ = ["GraphedBlocks"]

_WARNED = set()
#: torch.compile backend of captured decisions (tests put a counting backend here)
_DECISION_BACKEND = "inductor"
#: why compiling a decision failed in this process (then none is compiled again)
_DECISION_COMPILE_FAILURES: list = []


def _warn_once(key: Hashable, message: str) -> None:
    """One warning per process and cause (a model holds several runs of blocks)."""
    if key not in _WARNED:
        _WARNED.add(key)
        warnings.warn(message, RuntimeWarning, stacklevel=3)


@dataclass
class _Captured:
    graph: Optional[torch.cuda.CUDAGraph]  # set once captured
    rows_in: torch.Tensor  # (rows, C) static input
    offsets: torch.Tensor  # (B + 2,) int32 static offsets; the last image is padding (ragged graphs)
    rows_out: torch.Tensor  # (rows, C) static output
    inputs: Dict[str, torch.Tensor] = dataclasses.field(default_factory=dict)  # a decision's static inputs
    outputs: Dict[str, torch.Tensor] = dataclasses.field(default_factory=dict)  # and its static outputs


class GraphedBlocks:
    """Run ``blocks`` (timm ViT ``Block`` s) on token sets through CUDA graphs in inference.

    Not a module: it holds the model's own blocks without registering them twice. Falls back to
    :func:`~.blocks.run_blocks` (eager, uncompiled) when gradients are enabled or a block is in
    training mode (the training path), and, with one warning per process, for inference on
    CPU tensors or CUDA tensors outside fp16/bf16 (and autocast). With ``compile`` the
    token-wise work runs compiled where it can; blocks outside what :func:`~.fused.fusable`
    accepts, and a compilation that fails, run uncompiled, with one warning. Call
    :meth:`reset` after moving or replacing the blocks' parameters.

    Args:
        blocks: the run of blocks between two reductions.
        options: :class:`~.options.InferenceOptions` (default: :data:`~.options.DEFAULT_INFERENCE`).
        **changes: single option fields to change, e.g. ``row_bucket=128``.

    ``stats`` counts captures and their seconds (warm-up, which includes any compilation, and
    capture) for benchmarks.
    """

    def __init__(self, blocks: Sequence[nn.Module], options: Optional[InferenceOptions] = None, **changes) -> None:
        self.options = dataclasses.replace(options if options is not None else default_inference(), **changes)
        self.blocks = list(blocks)
        for block in self.blocks:
            check_block(block)
        self._fused = None
        if self.options.compile:
            reason = next((why for why in map(fusable, self.blocks) if why), "")
            if reason:
                _warn_once(("not fusable", reason), f"GraphedBlocks runs these blocks uncompiled: {reason}")
            else:
                self._fused = FusedBlocks(self.blocks, compile=True)
        self._graphs: "OrderedDict[Hashable, _Captured]" = OrderedDict()
        self._pool = None
        self.stats: Dict[str, float] = {"captures": 0, "warmup_s": 0.0, "capture_s": 0.0, "first_warmup_s": float("nan")}

    def reset(self) -> None:
        """Drop every captured graph (they point at the parameters' current memory)."""
        self._graphs.clear()
        self._pool = None

    @property
    def compiled(self) -> bool:
        """Whether graphs run the compiled token-wise function (False when not asked for, for
        blocks it does not cover, or after compiling failed)."""
        return self._fused is not None and self._fused.compiled

    def _inference(self) -> bool:
        return not torch.is_grad_enabled() and not any(b.training for b in self.blocks)

    @staticmethod
    def _graphable(x: torch.Tensor) -> bool:
        dtype = torch.get_autocast_dtype("cuda") if torch.is_autocast_enabled("cuda") else x.dtype
        return x.is_cuda and dtype in (torch.float16, torch.bfloat16)

    def applies(self, tokens: TokenSet) -> bool:
        """Whether a call with ``tokens`` replays a graph (else it runs eagerly)."""
        return self._graphable(tokens.x) and self._inference()

    def __call__(self, tokens: TokenSet) -> TokenSet:
        return self._call(tokens, None)[0]

    def run_deciding(self, tokens: TokenSet, decision: StaticDecision) -> Tuple[TokenSet, Dict[str, torch.Tensor]]:
        """The blocks, then ``decision.compute`` in the same graph: (the tokens after the blocks,
        the decision's outputs, the graph's buffers until its next replay). Only where
        :meth:`applies`."""
        if not self.applies(tokens):
            raise RuntimeError("run_deciding replays a graph: it needs CUDA inference in fp16/bf16 (see applies())")
        return self._call(tokens, decision)

    def _call(self, tokens: TokenSet, decision: Optional[StaticDecision]) -> Tuple[TokenSet, Dict[str, torch.Tensor]]:
        if not self.applies(tokens):
            if self._inference():
                x = tokens.x
                _warn_once(("eager", x.device.type, x.dtype), f"GraphedBlocks runs eagerly and uncompiled on {x.device.type} {x.dtype}: "
                           "CUDA graphs and the compiled block function apply to CUDA inference in fp16/bf16 (or under autocast)")
            return run_blocks(self.blocks, tokens, "auto"), {}
        layout = tokens.layout
        key = self._key(tokens, decision)
        captured = self._graphs.get(key)
        if captured is None:
            captured = self._capture(key, tokens, decision)
        else:
            self._graphs.move_to_end(key)
            self._load(captured, tokens, decision)
        captured.graph.replay()
        rows = captured.rows_out[: layout.total]
        if self.options.copy_output:
            rows = rows.clone()
        return tokens.with_features(rows, tokens.history + (layout.lengths,) * len(self.blocks)), captured.outputs

    # ------------------------------------------------------------------ internals
    def _key(self, tokens: TokenSet, decision: Optional[StaticDecision] = None) -> Tuple:
        layout, x, opts = tokens.layout, tokens.x, self.options
        cast = torch.get_autocast_dtype("cuda") if torch.is_autocast_enabled("cuda") else None
        # a single image with tokens removed is "uniform" at a new length nearly every call: it
        # takes a row bucket instead of an exact-shape graph per length
        whole = layout.max_len == tokens.num_prefix + tokens.num_cells
        uniform = layout.uniform and opts.dense_when_uniform and (layout.batch_size > 1 or whole)
        if uniform:
            rows, longest = layout.total, layout.max_len
        else:
            # at least one padding row, so that the padding image is never empty
            rows = (layout.total // opts.row_bucket + 1) * opts.row_bucket
            if opts.len_bucket == 0:
                longest = max(layout.max_len, tokens.num_prefix + tokens.num_cells)
            else:
                longest = -(-layout.max_len // opts.len_bucket) * opts.len_bucket
            longest = max(longest, opts.row_bucket)  # the padding image fits the grid too
        decided = None
        if decision is not None:  # its own graph per decision and per shape of what it reads
            decided = (decision.key,) + tuple((name, tuple(t.shape), t.dtype) for name, t in sorted(decision.inputs.items()))
        return (x.device, x.dtype, x.shape[1], layout.batch_size, rows, longest, uniform, cast, decided)

    @staticmethod
    def _load(captured: _Captured, tokens: TokenSet, decision: Optional[StaticDecision] = None) -> None:
        layout = tokens.layout
        captured.rows_in[: layout.total].copy_(tokens.x)
        captured.offsets[: layout.batch_size + 1].copy_(layout.offsets(torch.int32))
        if decision is not None:
            for name, t in decision.inputs.items():
                captured.inputs[name].copy_(t)

    def _capture(self, key: Tuple, tokens: TokenSet, decision: Optional[StaticDecision] = None) -> _Captured:
        device, dtype, channels, batch, rows, longest, uniform, cast, _ = key
        opts = self.options
        while len(self._graphs) >= opts.max_graphs:
            self._graphs.popitem(last=False)
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        # normal (not inference-mode) buffers, so that later calls may write them in any mode
        with torch.inference_mode(False), torch.no_grad():
            rows_in = torch.zeros(rows, channels, device=device, dtype=dtype)  # padding rows start finite
            offsets = torch.full((batch + 1 + (not uniform),), rows, device=device, dtype=torch.int32)
            inputs = {} if decision is None else {name: torch.empty_like(t) for name, t in decision.inputs.items()}
            captured = _Captured(None, rows_in, offsets, rows_in, inputs)
            self._load(captured, tokens, decision)
            layout = StaticLayout(offsets, longest, uniform)

            def forward() -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
                with torch.autocast("cuda", dtype=cast or torch.bfloat16, enabled=cast is not None, cache_enabled=False):
                    if self._fused is not None:
                        x = self._fused(rows_in, layout, opts.attention)
                    else:
                        x = rows_in
                        for block in self.blocks:
                            x = run_block(block, x, layout, opts.attention)
                    return x, ({} if decision is None else self._decide(decision, x, layout, inputs))

            start, warmed = time.perf_counter(), []

            def warmup() -> None:  # library handles, lazy init, compilation; timed apart from the capture
                forward()
                torch.cuda.synchronize(device)
                warmed.append(time.perf_counter() - start)

            captured.graph, (captured.rows_out, captured.outputs) = warm_and_capture(forward, device, self._pool, warmup)
            torch.cuda.synchronize(device)
        self._record(warmed[0], time.perf_counter() - start - warmed[0])
        self._graphs[key] = captured
        return captured

    def _decide(self, decision: StaticDecision, x: torch.Tensor, layout: StaticLayout,
                inputs: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        """``decision.compute`` inside the graph: compiled with ``compile_decisions`` (it runs at
        warm-up first, where inductor compiles; the capture records its kernels). A second row
        bucket recompiles it once with dynamic shapes (torch.compile's default), later ones reuse
        that."""
        if not self.options.compile_decisions or _DECISION_COMPILE_FAILURES:
            return decision.compute(x, layout, inputs)
        try:
            return torch.compile(decision.compute, backend=_DECISION_BACKEND)(x, layout, inputs)
        except Exception as exc:  # the compiler failed (or the call itself, which then fails again below)
            out = decision.compute(x, layout, inputs)
            _DECISION_COMPILE_FAILURES.append(compile_failure(exc))
            warnings.warn(f"compiling a captured decision failed ({_DECISION_COMPILE_FAILURES[0]}); decisions run "
                          "uncompiled in this process", RuntimeWarning, stacklevel=2)
            return out

    def _record(self, warmup: float, capture: float) -> None:
        if not self.stats["captures"]:
            self.stats["first_warmup_s"] = warmup
        self.stats["captures"] += 1
        self.stats["warmup_s"] += warmup
        self.stats["capture_s"] += capture

    def __len__(self) -> int:
        return len(self._graphs)

    def __repr__(self) -> str:
        uncompiled = " (running uncompiled)" if self.options.compile and not self.compiled else ""
        return f"GraphedBlocks({len(self.blocks)} blocks, {self.options.label()}{uncompiled}, graphs={len(self._graphs)})"
