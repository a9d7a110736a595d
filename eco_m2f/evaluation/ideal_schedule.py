"""The dense Segmenter's own modules on a token-reduction method's token schedule, with every
decision and every move of tokens left out: what that schedule would cost if they were free.

Why: a method's time above the FLOPs it saves is spent in two places, its machinery (auxiliary
heads, scores, top-k, gathers and scatters, the way back to the grid) and the lower efficiency of
the kernels on fewer tokens. Timing this pass beside the method's (``scripts/profile_token_reduction.py
--ideal``) separates the two: the method minus the ideal is the machinery, the ideal against the
FLOPs is what fewer tokens give at best on this GPU.

The schedule is one count per block (``schedule_from_records``: the batch's mean live patch
tokens entering it, as the cost records give them), the same for every image, so that every
block is a plain dense batch (timm's attention on B x (P + n) x C). Block i runs on the first
``P + counts[i]`` tokens of the previous block's output; the tokens a block no longer sees keep
their last features and return to the sequence, in one concatenation, before the final norm and
the decode head, which see the whole grid (as PAUMER's and DoViT's do). It is a model of the
cost, not of the method's output: which tokens stay is not modelled.
"""
from __future__ import annotations

from typing import Any, Callable, Dict, List, Mapping, Sequence

import torch

from ..modeling.heads.vit_decode_head import tokens_to_map

__all__ = ["ideal_network", "schedule_from_records"]


def schedule_from_records(records: Sequence[Mapping[str, Any]]) -> List[int]:
    """One count per block: the mean over ``records`` (one per image) of the live patch tokens
    entering it (the records' ``tokens``), rounded to the nearest integer."""
    if not records:
        raise ValueError("schedule_from_records needs at least one cost record")
    lists = [list(r["tokens"]) if "tokens" in r else None for r in records]
    if any(t is None for t in lists):
        raise ValueError("a cost record has no 'tokens' (live patch tokens per block)")
    depths = {len(t) for t in lists}
    if len(depths) != 1:
        raise ValueError(f"the cost records hold token lists of different lengths {sorted(depths)}")
    return [int(round(sum(float(t[i]) for t in lists) / len(lists))) for i in range(depths.pop())]


def ideal_network(model, counts: Sequence[int]) -> Callable[[torch.Tensor], torch.Tensor]:
    """``fn(images) -> B x K x H x W`` logits: ``model``'s embedding, blocks on ``counts`` (see the
    module docstring), final norm, decode head and upsampling, with no token reducer involved."""
    backbone, head = model.backbone, model.sem_seg_head
    counts = [int(n) for n in counts]
    if len(counts) != len(backbone.blocks):
        raise ValueError(f"the schedule has {len(counts)} counts for {len(backbone.blocks)} blocks")
    if any(b > a for a, b in zip(counts, counts[1:])) or (counts and counts[-1] < 1):
        raise ValueError(f"a schedule's counts must be positive and never grow from one block to the next, got {counts}")
    if head.input_kind == "levels":
        raise ValueError(f"{type(head).__name__} reads the blocks' outputs: the ideal schedule has none to give it")

    def run(images: torch.Tensor) -> torch.Tensor:
        x, grid = backbone.prepare_tokens(images)  # B x (P + N) x C
        p, cells = backbone.num_prefix_tokens, x.shape[1] - backbone.num_prefix_tokens
        if counts[0] > cells:
            raise ValueError(f"the schedule starts at {counts[0]} tokens; these images have {cells} patches")
        left: List[torch.Tensor] = []  # the tokens blocks stopped seeing, last features, in order
        for i, n in enumerate(counts):
            if p + n < x.shape[1]:
                left.insert(0, x[:, p + n:])
                x = x[:, : p + n].contiguous()
            x = backbone.run_block(i, x)
        x = backbone.norm(torch.cat([x] + left, dim=1) if left else x)  # B x (P + N) x C
        tokens = x[:, p:]
        # the head itself, not Segmenter.run_head: that may replay a graphed head, which cannot
        # happen inside the capture of this whole pass
        if head.input_kind == "tokens":
            outputs: Dict[str, Any] = head(tokens, None)
        else:
            outputs = head(tokens_to_map(tokens, grid))
        return head.semantic_logits(outputs, grid, images.shape[-2:])

    return run
