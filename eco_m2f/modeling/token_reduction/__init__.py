"""The token-reduction runtime shared by PAUMER, DoViT, CTS, dCTS and DToP (DESIGN.md section 9).

A :class:`TokenSet` holds a batch's live tokens packed (images keep different numbers of
them), which grid cells each stands for, the prefix tokens and the finalised tokens' features
or logits; :func:`run_blocks` runs timm ViT blocks on it paying only for live tokens;
:class:`GraphedBlocks` replays a run of blocks as one CUDA graph in inference;
:func:`blocks_flops` turns the set's per-block lengths into per-image FLOPs.
"""
from .attention import ATTENTION_IMPLS, DEFAULT_CUDA_ATTENTION, packed_attention, resolve_attention
from .blocks import check_block, run_block, run_blocks
from .flops import SDPA_FLOP_HANDLES, BlockCost, block_cost, blocks_flops
from .graphs import GraphedBlocks
from .packing import PackedLayout
from .token_set import FINAL_KINDS, FinalStore, TokenSet, mean_per_group

__all__ = [
    "ATTENTION_IMPLS",
    "DEFAULT_CUDA_ATTENTION",
    "FINAL_KINDS",
    "SDPA_FLOP_HANDLES",
    "BlockCost",
    "FinalStore",
    "GraphedBlocks",
    "PackedLayout",
    "TokenSet",
    "block_cost",
    "blocks_flops",
    "check_block",
    "mean_per_group",
    "packed_attention",
    "resolve_attention",
    "run_block",
    "run_blocks",
]
