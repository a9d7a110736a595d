"""Per-image cost records of a Segmenter pass: live tokens per block and exact GFLOPs.

Nothing is traced: the FLOPs of an image are the sum of what its pass really ran, counted
analytically with fvcore's conventions (one multiply-add is one flop; see :mod:`.flops`), so
that they equal fvcore's count of ``model.network`` on that image alone:

* ``backbone``: the embedding (patch projection, and the bilinear resize of the position
  embedding when the grid differs from the stored one: 4 flops per output element), every
  block on the tokens it saw (:func:`~.flops.blocks_flops` over ``TokenSet.history``) and the
  final norm on the tokens it normalised (none for a head on block outputs, ATM: nothing reads it);
* ``decode_head``: the head on the tokens it saw and the upsampling of its logits
  (:meth:`~eco_m2f.modeling.heads.vit_decode_head.ViTDecodeHead.flops`);
* ``token_reducer``: what the method charged itself (auxiliary heads, a policy network).

A record (``"cost"`` of each eval output) holds ``gflops`` and ``gflops_<scope>`` for the three
scopes, ``tokens`` (live patch tokens entering each block, a list), ``cells`` (the grid cells,
i.e. the dense model's tokens per block), the method's own additive fields, and three derived
ones: ``final_tokens`` (the last block's live tokens, an integer, so that an efficiency
evaluator histograms it), ``live_tokens`` (mean of ``tokens``) and ``token_fraction``
(``sum(tokens)`` over ``depth * cells``: the share of the dense model's patch-token work
done). The dense Segmenter's records (:func:`dense_cost_records`) have the same fields, with
every cell's token through every block.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Dict, List, Mapping, Sequence, Tuple

from .flops import blocks_flops, token_wise_flops
from .token_set import TokenSet

if TYPE_CHECKING:
    from ..backbone.vit import ViTBackbone
    from ..heads.vit_decode_head import ViTDecodeHead
    from .plugin import ReductionState

__all__ = ["DERIVED_FIELDS", "cost_records", "dense_cost_records", "merge_cost_records", "patch_embedding_flops"]

#: Fields recomputed from the others after records are summed.
DERIVED_FIELDS = ("final_tokens", "live_tokens", "token_fraction")
_FRAMEWORK_FIELDS = ("gflops", "gflops_backbone", "gflops_decode_head", "gflops_token_reducer", "tokens", "cells")


def patch_embedding_flops(backbone: "ViTBackbone", grid: Tuple[int, int]) -> int:
    """FLOPs of ``backbone.prepare_tokens`` for one image of an h x w patch grid."""
    cells = int(grid[0]) * int(grid[1])
    proj = backbone.patch_embed.proj  # Conv2d(in, C, p, stride p): one output pixel per cell
    per_cell = proj.out_channels * (proj.in_channels // proj.groups) * proj.kernel_size[0] * proj.kernel_size[1]
    flops = cells * (per_cell + token_wise_flops(backbone.patch_embed.norm))
    if tuple(grid) != tuple(backbone.pos_grid):
        flops += 4 * backbone.embed_dim * cells  # bilinear resize of the position embedding
    return flops


def cost_records(
    backbone: "ViTBackbone",
    head: "ViTDecodeHead",
    tokens: TokenSet,
    state: "ReductionState",
    size: Sequence[int],
    norm_tokens: Sequence[int],
    head_tokens: Sequence[int],
) -> List[Dict[str, Any]]:
    """One record per image of a finished reduced pass: ``tokens`` after the last block, ``size``
    the network's output size (H, W), ``norm_tokens`` / ``head_tokens`` per image the tokens that
    the final norm and the decode head saw."""
    depth = len(backbone.blocks)
    if len(tokens.history) != depth:
        raise ValueError(f"the pass ran {len(tokens.history)} block(s) of {depth}: cost records need the whole encoder")
    batch = state.batch_size
    for fields in state.cost:
        clash = sorted(set(fields) & (set(_FRAMEWORK_FIELDS) | set(DERIVED_FIELDS)))
        if clash:
            raise ValueError(f"a token-reduction method may not set the framework's cost fields {clash}")
    if head.input_kind == "levels":
        norm_tokens = [0] * batch  # a head on block outputs never reads the final norm
    return _records(
        backbone, head, tokens.grid, size, tokens.history, tokens.num_prefix, norm_tokens, head_tokens,
        state.flops.get("backbone", [0] * batch), state.flops.get("token_reducer", [0] * batch), state.cost,
    )


def dense_cost_records(backbone: "ViTBackbone", head: "ViTDecodeHead", batch: int, grid: Tuple[int, int], size: Sequence[int]) -> List[Dict[str, Any]]:
    """The records of the dense Segmenter (every cell's token through every block) for a batch;
    without the GFLOPs fields when the head has no FLOP count of its own (a FLOP counter then
    counts them)."""
    cells = int(grid[0]) * int(grid[1])
    p = backbone.num_prefix_tokens
    try:
        head.flops(cells, grid, size)
        counted = True
    except NotImplementedError:
        counted = False
    history = ((p + cells,) * batch,) * len(backbone.blocks)
    embed = [patch_embedding_flops(backbone, grid)] * batch
    normed = 0 if head.input_kind == "levels" else p + cells  # a head on block outputs never reads the final norm
    records = _records(backbone, head if counted else None, grid, size, history, p, [normed] * batch, [cells] * batch,
                       embed, [0] * batch, None)
    return records if counted else [{k: v for k, v in r.items() if not k.startswith("gflops")} for r in records]


def _records(backbone, head, grid, size, history, num_prefix, norm_tokens, head_tokens, embed, reducer, fields) -> List[Dict[str, Any]]:
    """Records from per-image counts: ``history`` lengths per block (prefix included), the tokens
    of the final norm and of the head, FLOPs of the embedding and the method, its fields."""
    blocks = blocks_flops(backbone.blocks, history)
    norm = token_wise_flops(backbone.norm)
    cells = int(grid[0]) * int(grid[1])
    head_cost: Dict[int, int] = {}  # head FLOPs depend only on the token count here
    records = []
    for b in range(len(history[0])):
        n = int(head_tokens[b])
        if n not in head_cost:
            head_cost[n] = 0 if head is None else int(head.flops(n, grid, size))
        backbone_flops = embed[b] + blocks[b] + norm * int(norm_tokens[b])
        record = {
            "gflops": (backbone_flops + head_cost[n] + reducer[b]) / 1e9,
            "gflops_backbone": backbone_flops / 1e9,
            "gflops_decode_head": head_cost[n] / 1e9,
            "gflops_token_reducer": reducer[b] / 1e9,
            "tokens": [int(lengths[b]) - num_prefix for lengths in history],
            "cells": cells,
        }
        record.update(fields[b] if fields is not None else {})
        records.append(_with_derived(record))
    return records


def _with_derived(record: Dict[str, Any]) -> Dict[str, Any]:
    tokens = record["tokens"]
    record["final_tokens"] = int(tokens[-1])
    record["live_tokens"] = sum(tokens) / len(tokens)
    record["token_fraction"] = sum(tokens) / (len(tokens) * record["cells"])
    return record


def _add(a: Any, b: Any, name: str) -> Any:
    if isinstance(a, list) or isinstance(b, list):
        if not (isinstance(a, list) and isinstance(b, list)) or len(a) != len(b):
            raise ValueError(f"cost field '{name}' cannot be summed: {a!r} and {b!r}")
        return [x + y for x, y in zip(a, b)]
    return a + b


def merge_cost_records(records: Sequence[Mapping[str, Any]]) -> Dict[str, Any]:
    """The record of one image from those of its passes (sliding windows, test-time variants):
    every field summed (lists element-wise), the derived fields recomputed."""
    if not records:
        raise ValueError("no cost records to merge")
    merged = {k: (list(v) if isinstance(v, list) else v) for k, v in records[0].items() if k not in DERIVED_FIELDS}
    for record in records[1:]:
        if set(record) != set(records[0]):
            raise ValueError(f"cost records with different fields cannot be merged: {sorted(records[0])} vs {sorted(record)}")
        for name in merged:
            merged[name] = _add(merged[name], record[name], name)
    return _with_derived(merged)
