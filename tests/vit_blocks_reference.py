"""Small timm ViT blocks and the dense per-image reference that the token runtime must match."""
from __future__ import annotations

import copy
from typing import List, Sequence

import torch
import torch.nn as nn
from timm.models.vision_transformer import Block

#: Largest ||got - ref|| / ||ref|| of a token (a row of the output) against
#: :func:`float32_reference`, for bf16 arithmetic. bf16 keeps 8 significant bits: every residual
#: add rounds the stream to half an ulp (2^-9 relative) and each layer's output carries a few such
#: roundings, so a stack of 2-3 blocks lands near 1e-2 at worst (measured on CPU in bf16 over 3
#: seeds and the shapes of these tests, with ``sharpness=3``: at most 1.0e-2, gradients too).
#: Wrong attention or indexing (attending across images, dropping one key, image offsets off by
#: one row, two rows swapped, a wrong scale) gave 9e-2 and more on the same blocks.
BF16_TOLERANCE = 3e-2
#: The same for float32 arithmetic (measured: below 1e-6).
FLOAT32_TOLERANCE = 1e-5


def tiny_blocks(depth: int = 2, dim: int = 48, heads: int = 3, seed: int = 0, sharpness: float = 1.0, **kwargs) -> nn.ModuleList:
    """``depth`` timm Blocks with every optional module switched on by default (qkv bias, q/k
    norm, LayerScale), weights drawn so that each layer matters. ``sharpness`` scales the
    queries: above 1, each token attends to a few others rather than evenly to all, so that
    attention over the wrong tokens changes every token's output (on random tokens, even
    attention over hundreds of them gives nearly the mean for every token)."""
    torch.manual_seed(seed)
    options = dict(qkv_bias=True, qk_norm=True, init_values=0.5)
    options.update(kwargs)
    blocks = nn.ModuleList([Block(dim, heads, **options) for _ in range(depth)])
    with torch.no_grad():
        for p in blocks.parameters():
            p.add_(0.05 * torch.randn_like(p))
        for block in blocks:
            q_norm, qkv = block.attn.q_norm, block.attn.qkv
            if isinstance(q_norm, nn.LayerNorm):
                q_norm.weight.mul_(sharpness)
                q_norm.bias.mul_(sharpness)
            else:  # the query third of the fused projection
                qkv.weight[:dim].mul_(sharpness)
                if qkv.bias is not None:
                    qkv.bias[:dim].mul_(sharpness)
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


def float32_reference(blocks: Sequence[nn.Module], tokens: torch.Tensor, kept_cells: Sequence[torch.Tensor], num_prefix: int = 1) -> List[torch.Tensor]:
    """:func:`dense_on_kept` in float32 on the CPU, from the same values as ``blocks`` and
    ``tokens`` hold (bf16 weights and tokens widened exactly): what a run in lower precision
    would give without its rounding. Keeps the blocks' training mode."""
    wide = copy.deepcopy(nn.ModuleList(blocks)).cpu().float()
    with torch.no_grad():
        return dense_on_kept(wide, tokens.detach().cpu().float(), [c.cpu() for c in kept_cells], num_prefix)


def assert_close_per_token(rows: torch.Tensor, lengths: Sequence[int], refs: Sequence[torch.Tensor], tolerance: float, label: object = "") -> None:
    """Packed rows (T, C) against one reference (P + n_b, C) per image: finite, and
    ||got - ref|| / ||ref|| <= ``tolerance`` for every row (a row whose reference is zero must be
    zero). Per token, so that one wrong token among hundreds still shows."""
    got = rows.detach().cpu().float()
    ref = torch.cat(list(refs), 0)
    assert got.shape == ref.shape and got.shape[0] == sum(lengths), (label, tuple(got.shape), tuple(ref.shape))
    assert torch.isfinite(got).all(), f"{label}: non-finite output"
    err = (got - ref).norm(dim=1) / ref.norm(dim=1).clamp(min=1e-30)  # (T,)
    worst = int(err.argmax())
    image = int((torch.tensor(list(lengths)).cumsum(0) <= worst).sum())
    assert err[worst] <= tolerance, f"{label}: relative error {err[worst]:.2e} > {tolerance:.1e} at row {worst} (image {image})"
