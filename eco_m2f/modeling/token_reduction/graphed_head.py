"""The decode head replayed as a CUDA graph.

A method whose tokens go back to the grid before the decoder (PAUMER, DoViT: ``output_kind``
"dense") hands the head a B x (P + G) x C tensor whose shape depends on the batch alone. After
the last decision of a pass the host has waited for the GPU (the decision's counts), so every
kernel the head launches eagerly is time the GPU sits idle: the mask transformer is some
hundred small kernels. Replaying them as one graph leaves one launch.

A method whose live tokens go to the head (CTS, dCTS, DToP, STEP: ``output_kind`` "tokens")
hands it counts that follow the content. A head with ``forward_rows`` (the mask transformer)
then runs on the packed live rows in a graph per row bucket, as the blocks' graphs do
(:mod:`.graphs`): the rows padded to a multiple of ``row_bucket`` (the padding one more image),
the image offsets in a device buffer read by the ragged attention, the longest image rounded up
to ``len_bucket``. Fp16/bf16 CUDA inference only (the graphs of the blocks apply there too);
anything else runs the head as it is.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Dict, Hashable, Optional, Sequence

import torch
import torch.nn as nn

from ...utils.cuda_graph import warm_and_capture
from .options import InferenceOptions, default_inference
from .packing import PackedLayout, StaticLayout

__all__ = ["GraphedHead"]


@dataclass
class _Captured:
    graph: Optional[torch.cuda.CUDAGraph]
    tokens: torch.Tensor  # the graph's input buffer (packed graphs: the bucketed rows)
    outputs: Dict[str, torch.Tensor]  # its output buffers, overwritten by every replay
    offsets: Optional[torch.Tensor] = None  # packed graphs: (B + 2,) int32 image offsets, the last image padding


class GraphedHead:
    """Per head, input shape and autocast dtype, one captured graph of ``head(tokens)``.

    Not a module: it holds no parameters of its own; :meth:`reset` drops the graphs after the
    head's parameters move (a captured graph points at their memory).
    """

    def __init__(self, max_graphs: int = 16, options: Optional[InferenceOptions] = None) -> None:
        #: the ragged graphs' row and length buckets and attention (default: the blocks' graphs')
        self.options = options if options is not None else default_inference()
        self.max_graphs = int(max_graphs)
        self.captures = 0
        self._graphs: "OrderedDict[Hashable, _Captured]" = OrderedDict()
        self._pool = None

    @staticmethod
    def applies(head: nn.Module, tokens: torch.Tensor) -> bool:
        """Whether ``self(head, tokens)`` replays a graph: fp16/bf16 CUDA inference."""
        dtype = torch.get_autocast_dtype("cuda") if torch.is_autocast_enabled("cuda") else tokens.dtype
        return tokens.is_cuda and not torch.is_grad_enabled() and not head.training and dtype in (torch.float16, torch.bfloat16)

    def reset(self) -> None:
        self._graphs.clear()
        self._pool = None

    def __call__(self, head: nn.Module, tokens: torch.Tensor) -> Dict[str, torch.Tensor]:
        """``head(tokens)`` (tokens B x N x C, no padding), replayed where :meth:`applies`; the
        outputs are copies, so that a later replay does not change them."""
        if not self.applies(head, tokens):
            return head(tokens)
        cast: Optional[torch.dtype] = torch.get_autocast_dtype("cuda") if torch.is_autocast_enabled("cuda") else None
        key = (id(head), tuple(tokens.shape), tokens.dtype, tokens.device, cast)
        captured = self._graphs.get(key)
        if captured is None:
            captured = self._capture(key, head, tokens, cast)
        else:
            self._graphs.move_to_end(key)
            captured.tokens.copy_(tokens)
        captured.graph.replay()
        return {name: t.clone() for name, t in captured.outputs.items()}

    @staticmethod
    def applies_packed(head: nn.Module, tokens: torch.Tensor) -> bool:
        """Whether :meth:`packed` replays a graph: :meth:`applies`, for a head with ``forward_rows``."""
        return hasattr(head, "forward_rows") and GraphedHead.applies(head, tokens)

    def packed(self, head: nn.Module, tokens: torch.Tensor, lengths: Sequence[int]) -> Dict[str, torch.Tensor]:
        """The head on image b's first ``lengths[b]`` slots of ``tokens`` (B x N x C) through
        ``head.forward_rows`` in a graph of the rows' bucket, where :meth:`applies_packed`:
        ``{"pred_tokens": B x N x K}``, empty slots 0 (a copy: later replays leave it alone)."""
        if not self.applies_packed(head, tokens):
            raise RuntimeError("packed() replays a graph: it needs a head with forward_rows, in CUDA fp16/bf16 inference")
        b, n, c = tokens.shape
        if len(lengths) != b or max(lengths) > n or min(lengths) < 0:
            raise ValueError(f"lengths {list(lengths)} do not fit {b} images of {n} token slots")
        layout = PackedLayout(lengths, 0, tokens.device)
        width = layout.max_len
        slots = layout.pad_rows(False)  # (Tp,) each real slot among the B x width padded ones
        rows = tokens[:, :width].reshape(b * width, c).index_select(0, slots)  # Tp x C
        opts = self.options
        bucket = (layout.total // opts.row_bucket + 1) * opts.row_bucket  # at least one padding row
        # the longest image rounded up (len_bucket 0, the blocks' "full length", has no full length
        # here: the head sees live tokens only, so it rounds to a row bucket)
        step = opts.len_bucket or opts.row_bucket
        longest = max(-(-width // step) * step, opts.row_bucket)  # the padding image fits the grid too
        cast: Optional[torch.dtype] = torch.get_autocast_dtype("cuda") if torch.is_autocast_enabled("cuda") else None
        key = ("packed", id(head), b, bucket, longest, c, tokens.dtype, tokens.device, cast)
        captured = self._graphs.get(key)
        if captured is None:
            captured = self._capture_packed(key, head, b, bucket, longest, rows, layout, cast)
        else:
            self._graphs.move_to_end(key)
            self._load_packed(captured, rows, layout)
        captured.graph.replay()
        out = captured.outputs["rows"][: layout.total]  # Tp x K
        pred = out.new_zeros(b * width, out.shape[1]).index_copy(0, slots, out).view(b, width, -1)
        if width < n:
            pred = torch.nn.functional.pad(pred, (0, 0, 0, n - width))
        return {"pred_tokens": pred}

    @staticmethod
    def _load_packed(captured: _Captured, rows: torch.Tensor, layout: PackedLayout) -> None:
        captured.tokens[: layout.total].copy_(rows)
        captured.offsets[: layout.batch_size + 1].copy_(layout.offsets(torch.int32))

    def _capture_packed(self, key: Hashable, head: nn.Module, batch: int, bucket: int, longest: int, rows: torch.Tensor,
                        layout: PackedLayout, cast: Optional[torch.dtype]) -> _Captured:
        while len(self._graphs) >= self.max_graphs:
            self._graphs.popitem(last=False)
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        with torch.inference_mode(False), torch.no_grad():  # plain buffers, writable in any mode
            static = rows.new_zeros(bucket, rows.shape[1])  # padding rows start finite
            offsets = torch.full((batch + 2,), bucket, dtype=torch.int32, device=rows.device)
            captured = _Captured(None, static, {}, offsets)
            self._load_packed(captured, rows, layout)
            static_layout = StaticLayout(offsets, longest, uniform=False)

            def forward() -> Dict[str, torch.Tensor]:
                with torch.autocast("cuda", dtype=cast or torch.bfloat16, enabled=cast is not None, cache_enabled=False):
                    return {"rows": head.forward_rows(static, static_layout, batch, self.options.attention)}

            captured.graph, captured.outputs = warm_and_capture(forward, rows.device, self._pool)
        self.captures += 1
        self._graphs[key] = captured
        return captured

    def _capture(self, key: Hashable, head: nn.Module, tokens: torch.Tensor, cast: Optional[torch.dtype]) -> _Captured:
        while len(self._graphs) >= self.max_graphs:
            self._graphs.popitem(last=False)
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        with torch.inference_mode(False), torch.no_grad():  # plain buffers, writable in any mode
            static = torch.empty_like(tokens).copy_(tokens)

            def forward() -> Dict[str, torch.Tensor]:
                with torch.autocast("cuda", dtype=cast or torch.bfloat16, enabled=cast is not None, cache_enabled=False):
                    return head(static)

            graph, outputs = warm_and_capture(forward, tokens.device, self._pool)
        if not all(isinstance(t, torch.Tensor) for t in outputs.values()):
            raise TypeError(f"{type(head).__name__} returned non-tensor outputs; a graphed head needs a dict of tensors")
        self.captures += 1
        captured = self._graphs[key] = _Captured(graph, static, outputs)
        return captured

    def __len__(self) -> int:
        return len(self._graphs)
