"""The inference paths of the token runtime: the fused (compilable) block function, static
layouts and the inference options, against the eager blocks."""
from __future__ import annotations

import importlib.util
import sys
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from timm.models.vision_transformer import Block, ResPostBlock

sys.path.insert(0, str(Path(__file__).resolve().parent))

from vit_blocks_reference import BF16_TOLERANCE, assert_close_per_token, dense_on_kept, float32_reference, tiny_blocks  # noqa: E402
from eco_m2f.modeling.token_reduction import (  # noqa: E402
    FusedBlocks,
    GraphedBlocks,
    InferenceOptions,
    StaticLayout,
    TokenSet,
    fusable,
    packed_attention,
    resolve_attention,
    run_blocks,
)
from eco_m2f.modeling.token_reduction import options as options_module  # noqa: E402

GRID = (3, 4)
KEEP = [12, 5, 0, 8]


def _tokens(dim: int = 48, seed: int = 1) -> torch.Tensor:
    return torch.randn(len(KEEP), 1 + GRID[0] * GRID[1], dim, generator=torch.Generator().manual_seed(seed))


def _reduced(tokens: torch.Tensor, keep=KEEP) -> tuple:
    scores = torch.rand(tokens.shape[0] * GRID[0] * GRID[1], generator=torch.Generator().manual_seed(2)).to(tokens.device)
    ts = TokenSet.from_dense(tokens, GRID).keep_topk(scores, keep)
    return ts, [torch.nonzero(ts.owner[b] >= 0).view(-1) for b in range(len(keep))]


@pytest.mark.parametrize("options", [dict(), dict(init_values=None, qk_norm=False, qkv_bias=False)])
def test_fused_blocks_equal_the_eager_blocks_and_each_image_alone(options):
    blocks = tiny_blocks(depth=3, **options).eval()
    tokens = _tokens()
    ts, cells = _reduced(tokens)
    full = TokenSet.from_dense(tokens, GRID)
    with torch.no_grad():
        for tokenset in (ts, full):  # ragged and uniform
            fused = FusedBlocks(blocks)(tokenset.x, tokenset.layout, "padded")
            assert torch.equal(fused, run_blocks(blocks, tokenset, "padded").x)
        fused = FusedBlocks(blocks)(ts.x, ts.layout, "padded")
        refs = dense_on_kept(blocks, tokens, cells)
    for got, ref in zip(fused.split(list(ts.layout.lengths), 0), refs):
        assert (got - ref).abs().max().item() <= 1e-5


def test_fused_blocks_compile_once_for_every_block_and_row_count():
    from torch._dynamo.testing import CompileCounter

    torch._dynamo.reset()
    counter = CompileCounter()
    blocks = tiny_blocks(depth=4).eval()
    tokens = _tokens()
    with torch.no_grad():
        for keep in ([12, 5, 0, 8], [10, 5, 3, 8], [12, 12, 12, 12]):
            ts, _ = _reduced(tokens, keep)
            got = FusedBlocks(blocks, compile=counter)(ts.x, ts.layout, "padded")
            assert torch.equal(got, FusedBlocks(blocks)(ts.x, ts.layout, "padded"))
    # one graph for blocks followed by another block, one for the last: not one per block or size
    assert counter.frame_count == 2


def test_blocks_the_fused_path_cannot_run_are_refused_by_name():
    assert fusable(tiny_blocks(depth=1)[0]) == ""
    assert "ResPostBlock" in fusable(ResPostBlock(48, 3))
    assert "mlp.norm" in fusable(Block(48, 3, scale_mlp_norm=True))
    assert "nn.GELU" in fusable(Block(48, 3, act_layer=nn.ReLU))
    with pytest.raises(TypeError, match="nn.GELU"):
        FusedBlocks([Block(48, 3, act_layer=nn.ReLU)])
    # the graphs run such blocks uncompiled, and say why once
    with pytest.warns(RuntimeWarning, match="uncompiled: Block: attn.norm"):
        graphed = GraphedBlocks([Block(48, 3, scale_attn_norm=True)], compile=True)
    assert not graphed.compiled and "running uncompiled" in repr(graphed)


def test_a_failing_compiler_falls_back_to_the_uncompiled_function_with_one_warning():
    def no_compiler(graph_module, example_inputs):
        raise RuntimeError("no compiler on this machine")

    blocks = tiny_blocks(depth=2).eval()
    ts, _ = _reduced(_tokens())
    with torch.no_grad():
        ref = FusedBlocks(blocks)(ts.x, ts.layout, "padded")
        fused = FusedBlocks(blocks, compile=no_compiler)
        assert fused.compiled
        with pytest.warns(RuntimeWarning, match="no compiler on this machine") as record:
            got = fused(ts.x, ts.layout, "padded")
        assert len(record) == 1 and not fused.compiled and torch.equal(got, ref)
        # later stacks in the process do not try again, and do not warn again
        again = FusedBlocks(blocks, compile=no_compiler)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert not again.compiled and torch.equal(again(ts.x, ts.layout, "padded"), ref)
        # an error that is not the compiler's still raises
        with pytest.raises(ValueError, match="unknown attention implementation"):
            FusedBlocks(blocks, compile=lambda gm, inputs: gm.forward)(ts.x, ts.layout, "fast")


def test_inference_options_default_and_overrides(monkeypatch):
    blocks = tiny_blocks(depth=1)
    graphed = GraphedBlocks(blocks)
    assert graphed.options == options_module.DEFAULT_INFERENCE and graphed.compiled
    # the runtime's own kernel where triton is installed (faster than flash varlen in the graphs), flash otherwise
    installed = importlib.util.find_spec("triton") is not None
    assert graphed.options.label() == f"{'triton' if installed else 'flash'} rows/64 len/128 compiled"
    monkeypatch.setattr(options_module.importlib.util, "find_spec", lambda name: None)
    assert options_module._graph_attention() == "flash"
    monkeypatch.setattr(options_module.importlib.util, "find_spec", lambda name: object() if name == "triton" else None)
    assert options_module._graph_attention() == "triton"
    monkeypatch.setattr(options_module, "DEFAULT_INFERENCE", InferenceOptions(attention="varlen", row_bucket=16, compile=False))
    graphed = GraphedBlocks(blocks, len_bucket=0)
    assert (graphed.options.attention, graphed.options.row_bucket, graphed.options.len_bucket) == ("varlen", 16, 0)
    assert graphed.options.label() == "varlen rows/16 len/full" and not graphed.compiled
    assert GraphedBlocks(blocks, InferenceOptions(row_bucket=1, len_bucket=1, compile=True)).options.label() == "flash rows/exact len/exact compiled"
    for bad, match in [(dict(attention="padded"), "must be one of"), (dict(row_bucket=0), "row_bucket"), (dict(len_bucket=-1), "len_bucket")]:
        with pytest.raises(ValueError, match=match):
            InferenceOptions(**bad)


def test_static_layouts_take_the_ragged_kernel_at_equal_lengths():
    ts = TokenSet.from_dense(_tokens(), GRID)
    q, k, v = torch.randn(3, ts.layout.total, 3, 16).unbind(0)
    static = StaticLayout(ts.layout.offsets(torch.int32), ts.layout.max_len)
    uniform = StaticLayout(ts.layout.offsets(torch.int32), ts.layout.max_len, uniform=True)
    with torch.no_grad():
        dense = packed_attention(q, k, v, ts.layout, "flash")  # equal lengths: the dense kernel on CPU too
        assert torch.equal(packed_attention(q, k, v, uniform, "flash"), dense)
        with pytest.raises(ValueError, match="'flash' needs CUDA"):  # no shortcut: the ragged kernel itself
            packed_attention(q, k, v, static, "flash")
    with pytest.raises(ValueError, match="int32"):
        static.offsets(torch.long)


def _kept_cells(ts: TokenSet) -> list:
    return [torch.nonzero(ts.owner[b] >= 0).view(-1) for b in range(ts.batch_size)]


def _wide_tokens(batch: int, device: str, dtype: torch.dtype, seed: int) -> torch.Tensor:
    """(batch, 1 + 300, 128) tokens: images longer than one 128-row attention tile."""
    return torch.randn(batch, 1 + 300, 128, generator=torch.Generator().manual_seed(seed)).to(device, dtype)


def _scores(n: int, device: str, g: torch.Generator) -> torch.Tensor:
    return torch.rand(n, generator=g).to(device)


# The GPU tests below are these checks run in bf16 on CUDA; each passes in float32 on CPU with
# float32's tolerance (where GraphedBlocks runs eagerly), so the checks themselves are right.
def _check_eager_kernels(impls, device: str, dtype: torch.dtype, tolerance: float) -> None:
    blocks = tiny_blocks(depth=2, dim=128, heads=2, sharpness=3.0).to(device, dtype).eval()
    tokens = _wide_tokens(4, device, dtype, seed=0)
    ts = TokenSet.from_dense(tokens, (15, 20)).keep_topk(_scores(1200, device, torch.Generator().manual_seed(1)), [300, 200, 129, 40])
    refs = float32_reference(blocks, tokens, _kept_cells(ts))
    with torch.no_grad():
        for impl in impls:
            assert_close_per_token(run_blocks(blocks, ts, impl).x, ts.layout.lengths, refs, tolerance, impl)


def _check_graph_options(changes: dict, device: str, dtype: torch.dtype, tolerance: float) -> GraphedBlocks:
    blocks = tiny_blocks(depth=3, dim=128, heads=2, sharpness=3.0).to(device, dtype).eval()
    graphed = GraphedBlocks(blocks, **changes)
    tokens = _wide_tokens(4, device, dtype, seed=0)
    g = torch.Generator().manual_seed(1)
    for keep in ([300, 200, 129, 40], [290, 210, 100, 50], [300, 300, 300, 300], [10, 300, 0, 150], [100, 60, 20, 0]):
        ts = TokenSet.from_dense(tokens, (15, 20)).keep_topk(_scores(1200, device, g), keep)
        refs = float32_reference(blocks, tokens, _kept_cells(ts))
        with torch.inference_mode():
            out = graphed(ts)
        assert out.history == ts.history + (ts.layout.lengths,) * len(blocks)
        assert_close_per_token(out.x, ts.layout.lengths, refs, tolerance, (changes, keep))
    return graphed


def _check_single_images(device: str, dtype: torch.dtype, tolerance: float) -> GraphedBlocks:
    blocks = tiny_blocks(depth=2, dim=128, heads=2, sharpness=3.0).to(device, dtype).eval()
    graphed = GraphedBlocks(blocks, attention="flash", row_bucket=64)
    tokens = _wide_tokens(1, device, dtype, seed=2)
    g = torch.Generator().manual_seed(3)
    for keep in (300, 200, 170, 180, 300):
        ts = TokenSet.from_dense(tokens, (15, 20)).keep_topk(_scores(300, device, g), [keep])
        refs = float32_reference(blocks, tokens, _kept_cells(ts))
        with torch.inference_mode():
            out = graphed(ts)
        assert_close_per_token(out.x, ts.layout.lengths, refs, tolerance, keep)
    return graphed


@pytest.mark.gpu
def test_ragged_kernels_equal_each_image_alone_over_several_tiles_on_cuda():
    _check_eager_kernels(("flash", "varlen"), "cuda", torch.bfloat16, BF16_TOLERANCE)


@pytest.mark.gpu
@pytest.mark.parametrize(
    "changes",
    [
        dict(attention="flash", row_bucket=128, compile=False),
        dict(attention="flash", row_bucket=1, len_bucket=1, compile=False),
        dict(attention="flash", row_bucket=64, len_bucket=0),
        dict(attention="flash", row_bucket=64, compile=True),
        dict(attention="varlen", row_bucket=64, compile=True, copy_output=False),
    ],
)
def test_graph_options_replay_equal_each_image_alone(changes):
    graphed = _check_graph_options(changes, "cuda", torch.bfloat16, BF16_TOLERANCE)
    assert graphed.compiled == graphed.options.compile and len(graphed) > 0


@pytest.mark.gpu
def test_single_images_with_tokens_removed_share_row_buckets():
    """Batch 1 is always of equal lengths; once tokens are removed its length changes per image,
    so it takes row buckets rather than one exact-shape graph per length."""
    graphed = _check_single_images("cuda", torch.bfloat16, BF16_TOLERANCE)
    assert len(graphed) == 3  # the whole image (exact), 201 rows -> 256, 171 and 181 rows -> 192
