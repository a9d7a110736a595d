"""CUDA-graph replay of a run of blocks equals the eager runtime, for any lengths in a bucket."""
from __future__ import annotations

import sys
import warnings
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from vit_blocks_reference import tiny_blocks  # noqa: E402
from eco_m2f.modeling.token_reduction import GraphedBlocks, TokenSet, run_blocks  # noqa: E402


def _ragged(device, dtype, keep, seed):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randn(len(keep), 1 + 64, 64, generator=g).to(device, dtype)
    return TokenSet.from_dense(tokens, (8, 8)).keep_topk(torch.rand(len(keep) * 64, generator=g).to(device), keep)


def test_falls_back_to_eager_where_graphs_do_not_apply():
    blocks = tiny_blocks(depth=2, dim=64, heads=4).eval()
    graphed = GraphedBlocks(blocks)  # the default compiles: on CPU it runs eagerly, warning once
    ts = _ragged("cpu", torch.float32, [64, 10, 33, 0], seed=0)
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
        assert torch.equal(graphed(_ragged("cpu", torch.float32, [64, 10, 33, 0], seed=0)).x.detach(), ref.x)
    with pytest.raises(ValueError, match="must be one of"):
        GraphedBlocks(blocks, attention="padded")


@pytest.mark.gpu
@pytest.mark.parametrize("attention", ["flash", "varlen"])
def test_graph_replays_equal_eager_for_different_lengths(attention):
    blocks = tiny_blocks(depth=3, dim=64, heads=4).cuda().to(torch.bfloat16).eval()
    graphed = GraphedBlocks(blocks, attention=attention, row_bucket=128)
    with torch.inference_mode():
        for seed, keep in enumerate([[64, 10, 33, 5], [60, 12, 30, 7], [64, 64, 1, 0]]):
            ts = _ragged("cuda", torch.bfloat16, keep, seed)
            out, ref = graphed(ts), run_blocks(blocks, ts, attention)
            assert out.history == ref.history
            assert (out.x.float() - ref.x.float()).abs().max().item() <= 1e-2, keep
    assert len(graphed) == 2  # the first two batches share a bucket of 128 rows
