"""How the runtime runs blocks in inference: the options of :class:`~.graphs.GraphedBlocks` and
the one default every model gets.

Models built on the runtime construct ``GraphedBlocks(blocks)`` and get
:data:`DEFAULT_INFERENCE`; a caller that wants something else passes ``options=`` (or single
fields as keywords). ``scripts/benchmark_token_runtime.py`` times each choice against the dense
stack and prints the line to put here.
"""
from __future__ import annotations

import importlib.util
from dataclasses import dataclass

from .attention import DEVICE_OFFSET_IMPLS

__all__ = ["DEFAULT_INFERENCE", "InferenceOptions", "default_inference"]


@dataclass(frozen=True)
class InferenceOptions:
    """Options of graph-replayed inference.

    Attributes:
        attention: ragged attention inside the graphs, one that reads the image offsets from the
            device: ``flash`` (flash varlen), ``varlen`` (``torch.nn.attention.varlen``) or ``triton``
            (:mod:`.triton_attention`).
        row_bucket: packed row counts are rounded up to a multiple of this (1: exact rows, one
            graph per total). Padding rows cost what real rows cost in every token-wise layer;
            a smaller bucket wastes less and captures more graphs.
        len_bucket: the longest image is rounded up to a multiple of this (1: exact); 0 uses the
            full sequence length (prefix + grid cells) for every batch, so the longest image no
            longer splits graphs. It only sizes the attention kernel's grid.
        dense_when_uniform: batches of several images that all hold the same number of tokens,
            and a single image holding all its tokens, replay a graph of the dense
            ``scaled_dot_product_attention`` (the kernel timm's own blocks run) at their exact
            shape, instead of ragged attention in a row bucket. (A single image with tokens
            removed keeps the bucket: its length changes from image to image.)
        compile: run the token-wise work between attentions (projection, residuals, norms, MLP)
            through one function compiled with ``torch.compile`` and shared by every block
            (:mod:`.fused`). Where compiling fails, or the blocks are not the standard block
            that function covers, the blocks run uncompiled, with one warning.
        compile_decisions: compile (``torch.compile``, inductor) a decision captured after the
            blocks (:mod:`.static_decision`), so that its many small kernels (head, masks,
            partition, owners) replay as fewer fused ones; a compilation that fails runs it
            uncompiled, with one warning. Off until timed.
        copy_output: return a copy of the graph's output rows; False returns a view that the
            next call overwrites.
        max_graphs: captured graphs kept (least recently used first out).
    """

    attention: str = "flash"
    row_bucket: int = 64
    len_bucket: int = 128
    dense_when_uniform: bool = True
    compile: bool = True
    compile_decisions: bool = False
    copy_output: bool = True
    max_graphs: int = 16

    def __post_init__(self) -> None:
        if self.attention not in DEVICE_OFFSET_IMPLS:
            raise ValueError(f"graph-captured attention must be one of {list(DEVICE_OFFSET_IMPLS)}, got '{self.attention}'")
        if self.row_bucket < 1:
            raise ValueError(f"row_bucket must be >= 1 (1: exact rows), got {self.row_bucket}")
        if self.len_bucket < 0:
            raise ValueError(f"len_bucket must be >= 0 (0: the full sequence length, 1: exact), got {self.len_bucket}")
        if self.max_graphs < 1:
            raise ValueError(f"max_graphs must be >= 1, got {self.max_graphs}")

    def label(self) -> str:
        """Short name for tables, e.g. ``flash rows/64 len/128 compiled``."""
        length = "len/full" if self.len_bucket == 0 else ("len/exact" if self.len_bucket == 1 else f"len/{self.len_bucket}")
        rows = "rows/exact" if self.row_bucket == 1 else f"rows/{self.row_bucket}"
        parts = [self.attention, rows, length]
        if not self.dense_when_uniform:
            parts.append("ragged-always")
        if self.compile:
            parts.append("compiled")
        if self.compile_decisions:
            parts.append("compiled-decisions")
        if not self.copy_output:
            parts.append("no-copy")
        return " ".join(parts)


def _graph_attention() -> str:
    """``triton`` where the package is installed, else ``flash``: inside the graphs the runtime's
    own kernel took 51 us per call against flash varlen's 69 us at mixed lengths on one H200
    (``results/token_runtime_h200/NOTES.md``, run 3)."""
    return "triton" if importlib.util.find_spec("triton") is not None else "flash"


#: The options every ``GraphedBlocks(blocks)`` gets: the recommendation of
#: ``scripts/benchmark_token_runtime.py`` on one H200 (``results/token_runtime_h200/NOTES.md``, run 3).
DEFAULT_INFERENCE = InferenceOptions(attention=_graph_attention(), row_bucket=64, len_bucket=128, dense_when_uniform=True, compile=True)


def default_inference() -> InferenceOptions:
    """:data:`DEFAULT_INFERENCE` as the module holds it now (read at call time, so that assigning
    ``options.DEFAULT_INFERENCE`` changes what later ``GraphedBlocks`` get)."""
    return DEFAULT_INFERENCE
