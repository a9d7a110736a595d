"""The token-reduction runtime shared by PAUMER, DoViT, CTS, dCTS and DToP (DESIGN.md section 9).

A :class:`TokenSet` holds a batch's live tokens packed (images keep different numbers of
them), which grid cells each stands for, the prefix tokens and the finalised tokens' features
or logits; :func:`run_blocks` runs timm ViT blocks on it paying only for live tokens;
:class:`GraphedBlocks` replays a run of blocks as one CUDA graph in inference;
:func:`blocks_flops` turns the set's per-block lengths into per-image FLOPs.

Token-reduction methods plug into the Segmenter's encoder loop as :class:`TokenReducer` s
registered in :data:`TOKEN_REDUCTION_REGISTRY` (:mod:`.plugin`; the loop is :mod:`.encoder_loop`,
the per-image cost records :mod:`.cost`, the built-in methods :mod:`.methods`).
"""
from .attention import ATTENTION_IMPLS, DEFAULT_CUDA_ATTENTION, packed_attention, resolve_attention
from .blocks import check_block, run_block, run_blocks
from .flops import SDPA_FLOP_HANDLES, BlockCost, block_cost, blocks_flops
from .graphs import GraphedBlocks
from .packing import PackedLayout
from .build import build_token_reducer
from .plugin import TOKEN_REDUCTION_REGISTRY, ReductionState, TokenMap, TokenReducer
from .token_set import FINAL_KINDS, FinalStore, TokenSet, mean_per_group

__all__ = [
    "ATTENTION_IMPLS",
    "DEFAULT_CUDA_ATTENTION",
    "FINAL_KINDS",
    "SDPA_FLOP_HANDLES",
    "TOKEN_REDUCTION_REGISTRY",
    "BlockCost",
    "FinalStore",
    "GraphedBlocks",
    "PackedLayout",
    "ReductionState",
    "TokenMap",
    "TokenReducer",
    "TokenSet",
    "block_cost",
    "blocks_flops",
    "build_token_reducer",
    "check_block",
    "mean_per_group",
    "packed_attention",
    "resolve_attention",
    "run_block",
    "run_blocks",
]
