"""The token-reduction runtime shared by PAUMER, DoViT, CTS, dCTS and DToP (DESIGN.md section 9).

A :class:`TokenSet` holds a batch's live tokens packed (images keep different numbers of
them), which grid cells each stands for, the prefix tokens and the finalised tokens' features
or logits; :func:`run_blocks` runs timm ViT blocks on it paying only for live tokens;
:class:`GraphedBlocks` replays a run of blocks as one CUDA graph in inference, as
:data:`DEFAULT_INFERENCE` (an :class:`InferenceOptions`) says; :class:`FusedBlocks` runs a stack's
token-wise work through one compiled function;
:func:`blocks_flops` turns the set's per-block lengths into per-image FLOPs.

Token-reduction methods plug into the Segmenter's encoder loop as :class:`TokenReducer` s
registered in :data:`TOKEN_REDUCTION_REGISTRY` (:mod:`.plugin`; the loop is :mod:`.encoder_loop`,
the per-image cost records :mod:`.cost`, the built-in methods :mod:`.methods`).
"""
from .attention import ATTENTION_IMPLS, DEFAULT_CUDA_ATTENTION, packed_attention, resolve_attention
from .blocks import check_block, project_qkv, run_block, run_blocks
from .flops import SDPA_FLOP_HANDLES, BlockCost, block_cost, blocks_flops
from .fused import FusedBlocks, fusable
from .graphs import GraphedBlocks
from .build import build_token_reducer
from .options import DEFAULT_INFERENCE, InferenceOptions
from .packing import PackedLayout, StaticLayout
from .plugin import TOKEN_REDUCTION_REGISTRY, ReductionState, TokenMap, TokenReducer
from .token_set import FINAL_KINDS, FinalStore, TokenSet, mean_per_group

__all__ = [
    "ATTENTION_IMPLS",
    "DEFAULT_CUDA_ATTENTION",
    "DEFAULT_INFERENCE",
    "FINAL_KINDS",
    "SDPA_FLOP_HANDLES",
    "TOKEN_REDUCTION_REGISTRY",
    "BlockCost",
    "FinalStore",
    "FusedBlocks",
    "GraphedBlocks",
    "InferenceOptions",
    "PackedLayout",
    "ReductionState",
    "TokenMap",
    "TokenReducer",
    "StaticLayout",
    "TokenSet",
    "block_cost",
    "blocks_flops",
    "build_token_reducer",
    "check_block",
    "fusable",
    "mean_per_group",
    "packed_attention",
    "project_qkv",
    "resolve_attention",
    "run_block",
    "run_blocks",
]
