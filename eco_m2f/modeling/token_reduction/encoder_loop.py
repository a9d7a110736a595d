"""The Segmenter's ViT encoder with a token reducer between its blocks, and the way back to the grid.

:class:`ReductionLoop` runs the loop of :mod:`.plugin`: the reducer's embedding, the runs of
blocks between decision layers (:func:`~.blocks.run_blocks`; in half-precision inference each
run is replayed as one CUDA graph by :class:`~.graphs.GraphedBlocks`), the reducer after each
decision layer, and the decoder's input (:class:`~eco_m2f.modeling.backbone.vit.ViTFeatures`) of
the reducer's ``output_kind``. :func:`grid_outputs` turns the head's per-token outputs on live
tokens back into dense grids, and :func:`overlay_final_logits` puts finalised logits over them.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Tuple

import torch
import torch.utils.checkpoint as tcp

from .attention import ATTENTION_IMPLS
from .blocks import check_block, run_block, run_blocks
from .graphs import GraphedBlocks
from .options import InferenceOptions, default_inference
from .plugin import ReductionState, TokenMap, TokenReducer, overlay_final_logits
from .token_set import TokenSet

if TYPE_CHECKING:
    from ..backbone.vit import ViTBackbone, ViTFeatures
    from ..heads.vit_decode_head import ViTDecodeHead

__all__ = ["ReducedPass", "ReductionLoop", "grid_outputs", "overlay_final_logits"]

#: Name of the framework's own token map: how many blocks each cell's token went through.
BLOCKS_MAP = "blocks"
_GRAPH_ATTENTION = ("auto", "flash", "varlen", "triton")  # the kernels a captured graph can replay
_INFERENCE_ONLY = ("triton",)  # kernels without a backward


@dataclass
class ReducedPass:
    """One reduced encoder pass: the decoder's input, the final token set, the reducer's state,
    and per image the tokens that the final norm and the decode head see."""

    features: "ViTFeatures"
    tokens: TokenSet
    state: ReductionState
    norm_tokens: List[int]
    head_tokens: List[int]


class ReductionLoop:
    """Encoder loop of a Segmenter whose ``reducer`` acts between the blocks of ``backbone``.

    Not a module: it holds the Segmenter's own backbone and reducer. Call :meth:`reset` after
    the blocks' parameters move (captured graphs point at their memory).

    Args:
        attention: the runtime's attention implementation (``MODEL.TOKEN_REDUCTION.ATTENTION``);
            ``triton`` (inference only) runs every pass that records gradients with ``auto``.
        cuda_graphs: replay each run of blocks as a CUDA graph in fp16/bf16 inference on CUDA
            (``MODEL.TOKEN_REDUCTION.CUDA_GRAPHS``); only with ``auto``, ``flash``, ``varlen`` or ``triton``.
        graph_decisions: with the graphs, capture a decision the reducer offers as a
            :class:`~.static_decision.StaticDecision` in the graph of the blocks before it
            (``MODEL.TOKEN_REDUCTION.GRAPH_DECISIONS``).
        compile_decisions: compile those captured decisions (``InferenceOptions.compile_decisions``,
            ``MODEL.TOKEN_REDUCTION.COMPILE_DECISIONS``).
    """

    def __init__(self, backbone: "ViTBackbone", reducer: TokenReducer, attention: str = "auto", cuda_graphs: bool = True,
                 graph_decisions: bool = True, compile_decisions: bool = False) -> None:
        if attention not in ATTENTION_IMPLS:
            raise ValueError(f"MODEL.TOKEN_REDUCTION.ATTENTION '{attention}' is not one of {list(ATTENTION_IMPLS)}")
        for block in backbone.blocks:
            check_block(block)
        self.backbone = backbone
        self.reducer = reducer
        self.attention = attention
        self.cuda_graphs = bool(cuda_graphs) and attention in _GRAPH_ATTENTION
        self.graph_decisions = bool(graph_decisions) and self.cuda_graphs
        self.compile_decisions = bool(compile_decisions)
        self.decisions = frozenset(reducer.decision_layers)
        stops = sorted(self.decisions | set(backbone.out_indices) | {backbone.depth - 1})
        #: (first, last + 1) block index of every run between two stops
        self.runs: Tuple[Tuple[int, int], ...] = tuple(zip([0] + [s + 1 for s in stops[:-1]], [s + 1 for s in stops]))
        self._graphs: Dict[Tuple[int, int], GraphedBlocks] = {}

    def reset(self) -> None:
        """Drop the captured CUDA graphs."""
        self._graphs.clear()

    def inference_options(self) -> InferenceOptions:
        """The options of this loop's graphs (and of the Segmenter's graphed head): the default
        with the configured attention (unless ``auto``) and ``compile_decisions``."""
        changes = {} if self.attention == "auto" else {"attention": self.attention}
        if self.compile_decisions:
            changes["compile_decisions"] = True
        return dataclasses.replace(default_inference(), **changes)

    # ------------------------------------------------------------------ blocks
    def _graphed(self, start: int, stop: int, tokens: TokenSet) -> Optional[GraphedBlocks]:
        """The graphs of blocks start..stop - 1 when a call with ``tokens`` replays one."""
        if not self.cuda_graphs or torch.is_grad_enabled():
            return None
        graphed = self._graphs.get((start, stop))
        if graphed is None:
            graphed = self._graphs[(start, stop)] = GraphedBlocks(list(self.backbone.blocks[start:stop]), self.inference_options())
        return graphed if graphed.applies(tokens) else None

    def _run(self, start: int, stop: int, tokens: TokenSet) -> TokenSet:
        blocks = list(self.backbone.blocks[start:stop])
        graphed = self._graphed(start, stop, tokens)
        if graphed is not None:
            return graphed(tokens)
        # an inference-only kernel (triton) leaves passes that need a backward to the default
        attention = "auto" if self.attention in _INFERENCE_ONLY and torch.is_grad_enabled() else self.attention
        if self.backbone.use_checkpoint and self.backbone.training and torch.is_grad_enabled():
            x, layout, history = tokens.x, tokens.layout, list(tokens.history)
            for block in blocks:
                x = tcp.checkpoint(run_block, block, x, layout, attention, use_reentrant=False)
                history.append(layout.lengths)
            return tokens.with_features(x, tuple(history))
        return run_blocks(blocks, tokens, attention)

    # ------------------------------------------------------------------ the pass
    def encode(self, images: torch.Tensor, targets: torch.Tensor | None = None, record_maps: bool = False) -> ReducedPass:
        """Normalised padded images B x 3 x H x W (and the training targets) -> the reduced pass."""
        patch = self.backbone.patch_size
        grid = (-(-images.shape[-2] // patch), -(-images.shape[-1] // patch))
        state = ReductionState(images=images, grid=grid, targets=targets, record_maps=record_maps)
        tokens = self.reducer.embed(self.backbone, images, state)
        if tokens.grid != grid:
            raise ValueError(f"{type(self.reducer).__name__}.embed() returned a {tokens.grid} grid for a {grid} input")
        depth = self.backbone.depth
        exits = torch.full_like(tokens.owner, depth) if record_maps else None
        captured: Dict[int, TokenSet] = {}
        for start, stop in self.runs:
            layer = stop - 1
            decision, graphed = None, None
            if self.graph_decisions and layer in self.decisions:
                graphed = self._graphed(start, stop, tokens)
                decision = None if graphed is None else self.reducer.static_decision(layer, tokens, state)
            if decision is not None:
                tokens, outputs = graphed.run_deciding(tokens, decision)
            else:
                tokens = self._run(start, stop, tokens)
            if layer in self.backbone.out_indices:
                captured[layer] = tokens
            if layer in self.decisions:
                live = tokens.live_cells() if record_maps else None
                tokens = decision.finish(tokens, outputs) if decision is not None else self.reducer.reduce(layer, tokens, state)
                if exits is not None:
                    exits = torch.where(live & ~tokens.live_cells(), layer + 1, exits)
        if exits is not None:
            state.token_maps[BLOCKS_MAP] = exits
            labels = {v: self.reducer.describe_exit(v, depth) for v in range(1, depth + 1)}
            state.token_map_labels[BLOCKS_MAP] = labels
        if self.reducer.output_kind == "dense":
            return self._dense(tokens, captured, state)
        return self._live(tokens, captured, state)

    def _dense(self, tokens: TokenSet, captured: Dict[int, TokenSet], state: ReductionState) -> ReducedPass:
        """Every cell's token back on the grid, in order: live features, else finalised features."""
        from ..backbone.vit import ViTFeatures

        p = tokens.num_prefix
        dense = tokens.to_dense(final="features")  # B x G x C
        x = self.backbone.norm(torch.cat([tokens.prefix(), dense], dim=1))  # B x (P + G) x C
        # the last block's output (Segmenter's OUT_INDICES) is the final set itself: reassembled once
        layers = {i: dense if t is tokens else t.to_dense(final="features") for i, t in captured.items()}
        features = ViTFeatures(tokens=x[:, p:], prefix=x[:, :p], grid=tokens.grid, layers=layers)
        cells = [tokens.num_cells] * tokens.batch_size
        return ReducedPass(features, tokens, state, [p + g for g in cells], cells)

    def _live(self, tokens: TokenSet, captured: Dict[int, TokenSet], state: ReductionState) -> ReducedPass:
        """The live tokens, padded to the longest image, with the padding mask of the heads."""
        from ..backbone.vit import ViTFeatures

        x = tokens.with_features(self.backbone.norm(tokens.x))
        patches, real = x.padded()  # B x L_max x C, True at real tokens
        uniform = len(set(tokens.live_counts)) == 1
        layers = {}
        for i, t in captured.items():
            # a block kept before a reduction: its features of the tokens that are still live
            layers[i] = t.padded()[0] if t.owner is tokens.owner else tokens.padded(_rows_still_live(t, tokens))[0]
        counts = list(tokens.live_counts)
        features = ViTFeatures(
            tokens=patches, prefix=x.prefix(), grid=tokens.grid, layers=layers, padding_mask=None if uniform else ~real,
            lengths=None if uniform else tuple(counts),
        )
        return ReducedPass(features, tokens, state, [tokens.num_prefix + n for n in counts], counts)

    # ------------------------------------------------------------------ pictures
    def token_maps(self, done: ReducedPass) -> List[Dict[str, TokenMap]]:
        """Per image, every token map of a pass run with ``record_maps``."""
        state, (h, w) = done.state, done.tokens.grid
        if not state.record_maps:
            raise ValueError("token maps need a pass run with record_maps=True")
        out: List[Dict[str, TokenMap]] = [{} for _ in range(state.batch_size)]
        for name, values in state.token_maps.items():
            title = "blocks per token" if name == BLOCKS_MAP else name
            for b in range(state.batch_size):
                out[b][name] = TokenMap(values[b].view(h, w).cpu(), dict(state.token_map_labels[name]), title)
        return out


def _rows_still_live(earlier: TokenSet, final: TokenSet) -> torch.Tensor:
    """(Tp_final, C) rows of ``earlier.patches()`` for the live tokens of ``final``, a set that
    ``earlier`` became by removals only (TokenSet.keep): each final token owns cells that one
    earlier token owned. No host sync."""
    owned = final.owner >= 0  # B x G
    slots = final.layout.num_patches
    target = torch.where(owned, final.owner, slots).view(-1)  # removed cells write to a spare slot
    source = earlier.owner.clamp(min=0).view(-1)
    rows = torch.zeros(slots + 1, dtype=torch.long, device=final.owner.device).scatter(0, target, source)[:slots]
    return earlier.patches().index_select(0, rows)


def grid_outputs(outputs: Dict[str, Any], head: "ViTDecodeHead", tokens: TokenSet) -> Dict[str, Any]:
    """The head's outputs on live tokens (``output_kind`` "tokens") with every per-token output
    (``head.token_outputs``, here and in ``"aux_outputs"``) copied back to all cells of its token:
    B x L_max x D -> B x G x D (cells without a live token 0, for :func:`overlay_final_logits`)."""
    out = dict(outputs)
    for key in head.token_outputs:
        if key in out:
            out[key] = tokens.to_dense(tokens.unpad(out[key]), final=None)
    if isinstance(out.get("aux_outputs"), list):
        out["aux_outputs"] = [grid_outputs(level, head, tokens) for level in out["aux_outputs"]]
    return out
