"""The decode head on the dense token grid, replayed as a CUDA graph.

A method whose tokens go back to the grid before the decoder (PAUMER, DoViT: ``output_kind``
"dense") hands the head a B x (P + G) x C tensor whose shape depends on the batch alone. After
the last decision of a pass the host has waited for the GPU (the decision's counts), so every
kernel the head launches eagerly is time the GPU sits idle: the mask transformer is some
hundred small kernels. Replaying them as one graph leaves one launch. Fp16/bf16 CUDA inference
only (the graphs of the blocks apply there too); anything else runs the head as it is.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Dict, Hashable, Optional

import torch
import torch.nn as nn

from ...utils.cuda_graph import warm_and_capture

__all__ = ["GraphedHead"]


@dataclass
class _Captured:
    graph: torch.cuda.CUDAGraph
    tokens: torch.Tensor  # the graph's input buffer
    outputs: Dict[str, torch.Tensor]  # its output buffers, overwritten by every replay


class GraphedHead:
    """Per head, input shape and autocast dtype, one captured graph of ``head(tokens)``.

    Not a module: it holds no parameters of its own; :meth:`reset` drops the graphs after the
    head's parameters move (a captured graph points at their memory).
    """

    def __init__(self, max_graphs: int = 8) -> None:
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
