"""Small timm ViT blocks and the dense per-image reference that the token runtime must match."""
from __future__ import annotations

from typing import List, Sequence

import torch
import torch.nn as nn
from timm.models.vision_transformer import Block


def tiny_blocks(depth: int = 2, dim: int = 48, heads: int = 3, seed: int = 0, **kwargs) -> nn.ModuleList:
    """``depth`` timm Blocks with every optional module switched on by default (qkv bias, q/k
    norm, LayerScale), weights drawn so that each layer matters."""
    torch.manual_seed(seed)
    options = dict(qkv_bias=True, qk_norm=True, init_values=0.5)
    options.update(kwargs)
    blocks = nn.ModuleList([Block(dim, heads, **options) for _ in range(depth)])
    with torch.no_grad():
        for p in blocks.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return blocks


def run_dense(blocks: Sequence[nn.Module], x: torch.Tensor) -> torch.Tensor:
    for block in blocks:
        x = block(x)
    return x


def dense_on_kept(blocks: Sequence[nn.Module], tokens: torch.Tensor, kept_cells: Sequence[torch.Tensor], num_prefix: int = 1) -> List[torch.Tensor]:
    """Per image b, the dense blocks on its prefix + the tokens of ``kept_cells[b]`` alone:
    ``tokens`` (B, P + G, C) -> list of (P + n_b, C)."""
    outs = []
    for b, cells in enumerate(kept_cells):
        seq = torch.cat([tokens[b, :num_prefix], tokens[b, num_prefix + cells]], 0)
        outs.append(run_dense(blocks, seq.unsqueeze(0))[0])
    return outs
