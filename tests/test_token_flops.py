"""Per-image FLOPs from live counts equal fvcore's count of the same dense computation."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

from vit_blocks_reference import tiny_blocks  # noqa: E402
from eco_m2f.modeling.token_reduction import SDPA_FLOP_HANDLES, TokenSet, block_cost, blocks_flops, run_blocks  # noqa: E402

fvcore_nn = pytest.importorskip("fvcore.nn")


def _fvcore(module: nn.Module, x: torch.Tensor) -> int:
    analysis = fvcore_nn.FlopCountAnalysis(module, (x,)).set_op_handle(**SDPA_FLOP_HANDLES)
    analysis.unsupported_ops_warnings(False)
    return int(analysis.total())


class _Stack(nn.Module):
    def __init__(self, blocks: nn.ModuleList) -> None:
        super().__init__()
        self.blocks = blocks

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return x


@pytest.mark.parametrize(
    "options",
    [
        dict(),  # the ViT default: no q/k norm, no LayerScale
        dict(qk_norm=True, init_values=0.1, mlp_ratio=2.0),
        dict(scale_attn_norm=True, scale_mlp_norm=True, qkv_bias=True),
    ],
)
@pytest.mark.parametrize("fused", [True, False])
def test_block_cost_equals_fvcore(options, fused):
    """fused: attention through scaled_dot_product_attention (counted by our handle);
    unfused: timm's explicit matmuls (counted by fvcore itself)."""
    plain = dict(qkv_bias=False, qk_norm=False, init_values=None)
    block = tiny_blocks(depth=1, dim=32, heads=4, **{**plain, **options})[0]
    block.attn.fused_attn = fused
    block.eval()
    for n in (1, 7, 17):
        assert block_cost(block)(n) == _fvcore(block, torch.randn(1, n, 32)), n


def test_per_image_flops_of_a_reduced_run_equal_fvcore_on_each_image_alone():
    blocks = tiny_blocks(depth=3, dim=32, heads=4).eval()
    tokens = torch.randn(3, 1 + 12, 32)
    ts = TokenSet.from_dense(tokens, (3, 4))
    with torch.no_grad():
        ts = run_blocks(blocks[:1], ts)
        ts = ts.keep_topk(torch.rand(36), [12, 4, 1])
        ts = run_blocks(blocks[1:], ts)
    assert ts.history == ((13, 13, 13), (13, 5, 2), (13, 5, 2))
    per_image = blocks_flops(blocks, ts.history)
    for b, (kept, total) in enumerate(zip([12, 4, 1], per_image)):
        expected = _fvcore(blocks[0], torch.randn(1, 13, 32)) + _fvcore(_Stack(blocks[1:]), torch.randn(1, 1 + kept, 32))
        assert total == expected, b
    assert per_image[0] == _fvcore(_Stack(blocks), tokens[:1])  # image 0 kept everything


def test_refuses_what_it_cannot_count():
    block = tiny_blocks(depth=1, dim=32, heads=4)[0]
    block.norm2 = nn.GroupNorm(1, 32)
    with pytest.raises(TypeError, match="GroupNorm"):
        block_cost(block)
    with pytest.raises(ValueError, match="2 blocks but lengths for 1"):
        blocks_flops(tiny_blocks(depth=2, dim=32, heads=4), [(5, 5)])
