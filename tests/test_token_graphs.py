"""CUDA-graph replay of a run of blocks equals the dense blocks on each image alone, for any lengths in a bucket."""
from __future__ import annotations

import sys
import warnings
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from vit_blocks_reference import BF16_TOLERANCE, assert_close_per_token, float32_reference, tiny_blocks  # noqa: E402
from eco_m2f.modeling.token_reduction import GraphedBlocks, TokenSet, run_blocks  # noqa: E402


def _tokens_and_kept(device, dtype, keep, seed):
    """(B, 1 + 64, 64) tokens and the token set keeping ``keep[b]`` of image b's 64 patches."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randn(len(keep), 1 + 64, 64, generator=g).to(device, dtype)
    return tokens, TokenSet.from_dense(tokens, (8, 8)).keep_topk(torch.rand(len(keep) * 64, generator=g).to(device), keep)


def test_falls_back_to_eager_where_graphs_do_not_apply():
    blocks = tiny_blocks(depth=2, dim=64, heads=4).eval()
    graphed = GraphedBlocks(blocks)  # the default compiles: on CPU it runs eagerly, warning once
    ts = _tokens_and_kept("cpu", torch.float32, [64, 10, 33, 0], seed=0)[1]
    with torch.no_grad():
        ref = run_blocks(blocks, ts)
        with pytest.warns(RuntimeWarning, match="eagerly and uncompiled on cpu torch.float32"):
            out = graphed(ts)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # once per process, not once per call or per stack
            again = GraphedBlocks(blocks)(ts)
    assert torch.equal(out.x, ref.x) and torch.equal(again.x, ref.x) and out.history == ref.history and len(graphed) == 0
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # training is the eager path: no warning
        assert torch.equal(graphed(_tokens_and_kept("cpu", torch.float32, [64, 10, 33, 0], seed=0)[1]).x.detach(), ref.x)
    with pytest.raises(ValueError, match="must be one of"):
        GraphedBlocks(blocks, attention="padded")


def _check_replays(attention: str, device: str, dtype: torch.dtype, tolerance: float) -> GraphedBlocks:
    """Batches of different lengths through one GraphedBlocks against the dense blocks in float32
    on each image's kept tokens (in bf16 on CUDA below; in float32 on CPU, where it runs
    eagerly, the same check passes with float32's tolerance)."""
    blocks = tiny_blocks(depth=3, dim=64, heads=4, sharpness=3.0).to(device, dtype).eval()
    graphed = GraphedBlocks(blocks, attention=attention, row_bucket=128)
    for seed, keep in enumerate([[64, 10, 33, 5], [60, 12, 30, 7], [64, 64, 1, 0]]):
        tokens, ts = _tokens_and_kept(device, dtype, keep, seed)
        refs = float32_reference(blocks, tokens, [torch.nonzero(ts.owner[b] >= 0).view(-1) for b in range(len(keep))])
        with torch.inference_mode():
            out = graphed(ts)
        assert out.history == ts.history + (ts.layout.lengths,) * len(blocks)
        assert_close_per_token(out.x, ts.layout.lengths, refs, tolerance, keep)
    return graphed


@pytest.mark.gpu
@pytest.mark.parametrize("attention", ["flash", "varlen", "triton"])
def test_graph_replays_equal_each_image_alone_for_different_lengths(attention):
    graphed = _check_replays(attention, "cuda", torch.bfloat16, BF16_TOLERANCE)
    assert len(graphed) == 2  # the first two batches share a bucket of 128 rows
