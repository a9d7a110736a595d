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
from typing import Callable, Dict, Hashable, Optional, Sequence, Tuple, TypeVar

import torch
import torch.nn as nn

from ...utils.cuda_graph import warm_and_capture
from .options import InferenceOptions, default_inference
from .packing import StaticLayout, pack_slots, unpack_slots

__all__ = ["GraphedHead"]

T = TypeVar("T")


def _autocast_dtype() -> Optional[torch.dtype]:
    """The CUDA autocast dtype in effect, or None."""
    return torch.get_autocast_dtype("cuda") if torch.is_autocast_enabled("cuda") else None


def _under(cast: Optional[torch.dtype], fn: Callable[[], T]) -> T:
    """``fn()`` under the autocast of the call that captured it (weights cast inside the graph)."""
    with torch.autocast("cuda", dtype=cast or torch.bfloat16, enabled=cast is not None, cache_enabled=False):
        return fn()


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
        dtype = _autocast_dtype() or tokens.dtype
        return tokens.is_cuda and not torch.is_grad_enabled() and not head.training and dtype in (torch.float16, torch.bfloat16)

    def reset(self) -> None:
        self._graphs.clear()
        self._pool = None

    def __call__(self, head: nn.Module, tokens: torch.Tensor) -> Dict[str, torch.Tensor]:
        """``head(tokens)`` (tokens B x N x C, no padding), replayed where :meth:`applies`; the
        outputs are copies, so that a later replay does not change them."""
        if not self.applies(head, tokens):
            return head(tokens)
        cast = _autocast_dtype()

        def build() -> Tuple[_Captured, Callable[[], Dict[str, torch.Tensor]]]:
            static = torch.empty_like(tokens).copy_(tokens)
            return _Captured(None, static, {}), lambda: _under(cast, lambda: head(static))

        captured = self._replay((id(head), tuple(tokens.shape), tokens.dtype, tokens.device, cast), tokens.device, build,
                                lambda c: c.tokens.copy_(tokens))
        if not all(isinstance(t, torch.Tensor) for t in captured.outputs.values()):
            raise TypeError(f"{type(head).__name__} returned non-tensor outputs; a graphed head needs a dict of tensors")
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
        rows, layout = pack_slots(tokens, lengths)  # Tp x C
        b, opts = layout.batch_size, self.options
        bucket = (layout.total // opts.row_bucket + 1) * opts.row_bucket  # at least one padding row
        # the longest image rounded up (len_bucket 0, the blocks' "full length", has no full length
        # here: the head sees live tokens only, so it rounds to a row bucket)
        step = opts.len_bucket or opts.row_bucket
        longest = max(-(-layout.max_len // step) * step, opts.row_bucket)  # the padding image fits the grid too
        cast = _autocast_dtype()

        def load(captured: _Captured) -> None:
            captured.tokens[: layout.total].copy_(rows)
            captured.offsets[: b + 1].copy_(layout.offsets(torch.int32))

        def build() -> Tuple[_Captured, Callable[[], Dict[str, torch.Tensor]]]:
            static = rows.new_zeros(bucket, rows.shape[1])  # padding rows start finite
            offsets = torch.full((b + 2,), bucket, dtype=torch.int32, device=rows.device)
            captured = _Captured(None, static, {}, offsets)
            load(captured)
            static_layout = StaticLayout(offsets, longest, uniform=False)
            return captured, lambda: _under(cast, lambda: {"rows": head.forward_rows(static, static_layout, b, opts.attention)})

        key = ("packed", id(head), b, bucket, longest, rows.shape[1], tokens.dtype, tokens.device, cast)
        captured = self._replay(key, tokens.device, build, load)
        return {"pred_tokens": unpack_slots(captured.outputs["rows"][: layout.total], layout, tokens.shape[1])}

    def _replay(self, key: Hashable, device: torch.device, build: Callable[[], Tuple[_Captured, Callable[[], Dict[str, torch.Tensor]]]],
                load: Callable[[_Captured], None]) -> _Captured:
        """Replay the graph of ``key``: ``load`` the input into its buffers, or, on first use,
        ``build`` the buffers and the function (outside inference mode, so that the buffers are
        writable in any mode) and capture it after a warm-up (least recently used graph out)."""
        captured = self._graphs.get(key)
        if captured is not None:
            self._graphs.move_to_end(key)
            load(captured)
        else:
            while len(self._graphs) >= self.max_graphs:
                self._graphs.popitem(last=False)
            if self._pool is None:
                self._pool = torch.cuda.graph_pool_handle()
            with torch.inference_mode(False), torch.no_grad():
                captured, forward = build()
                captured.graph, captured.outputs = warm_and_capture(forward, device, self._pool)
            self.captures += 1
            self._graphs[key] = captured
        captured.graph.replay()
        return captured

    def __len__(self) -> int:
        return len(self._graphs)
