"""timm ViT blocks on the token set: equal to the dense blocks, per image, for every CPU attention."""
from __future__ import annotations

import copy
import sys
from pathlib import Path

import pytest
import torch
from timm.models.vision_transformer import ResPostBlock

sys.path.insert(0, str(Path(__file__).resolve().parent))

from vit_blocks_reference import (  # noqa: E402
    BF16_TOLERANCE,
    FLOAT32_TOLERANCE,
    assert_close_per_token,
    dense_on_kept,
    float32_reference,
    run_dense,
    tiny_blocks,
)
from eco_m2f.modeling.token_reduction import TokenSet, packed_attention, resolve_attention, run_blocks  # noqa: E402

GRID = (3, 4)  # 12 cells
KEEP = [12, 5, 0, 8]  # live patch tokens per image after the reduction: all, some, none, most
CPU_IMPLS = ["padded", "jagged", "flex"]


def _tokens(batch: int = 4, dim: int = 48, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 1 + GRID[0] * GRID[1], dim, generator=g)


def _reduced(tokens: torch.Tensor) -> tuple:
    """A token set keeping KEEP[b] tokens per image by random scores, and each image's kept cells."""
    g = torch.Generator().manual_seed(2)
    scores = torch.rand(tokens.shape[0] * GRID[0] * GRID[1], generator=g).to(tokens.device)  # on the tokens' device
    ts = TokenSet.from_dense(tokens, GRID).keep_topk(scores, KEEP)
    cells = [torch.nonzero(ts.owner[b] >= 0).view(-1) for b in range(len(KEEP))]
    return ts, cells


def _per_image(ts: TokenSet) -> list:
    """Split the packed rows (T, C) into each image's (P + n_b, C)."""
    return list(ts.x.split(list(ts.layout.lengths), 0))


def test_every_token_kept_equals_dense_blocks_exactly():
    blocks = tiny_blocks(depth=3).eval()
    tokens = _tokens()
    with torch.no_grad():
        dense = run_dense(blocks, tokens)
        for impl in CPU_IMPLS:
            out = run_blocks(blocks, TokenSet.from_dense(tokens, GRID), impl)
            diff = (out.x.view_as(dense) - dense).abs().max().item()
            assert diff <= 1e-6, (impl, diff)
    assert out.history == ((13,) * 4,) * 3


@pytest.mark.parametrize("impl", CPU_IMPLS)
def test_removed_tokens_equal_dense_blocks_on_each_image_alone(impl):
    blocks = tiny_blocks(depth=3).eval()
    tokens = _tokens()
    ts, cells = _reduced(tokens)
    assert ts.live_counts == tuple(KEEP)
    with torch.no_grad():
        out = run_blocks(blocks, ts, impl)
        refs = dense_on_kept(blocks, tokens, cells)
    for b, (got, ref) in enumerate(zip(_per_image(out), refs)):
        assert got.shape == ref.shape
        assert (got - ref).abs().max().item() <= 1e-5, (impl, b)
    assert out.counts_per_block() == [[n] * 3 for n in KEEP]


@pytest.mark.parametrize("impl", ["padded", "jagged"])
def test_gradients_match_dense_blocks_on_each_image_alone(impl):
    blocks = tiny_blocks(depth=2).train()  # no dropout or drop path configured: deterministic
    tokens = _tokens().requires_grad_()
    ts, cells = _reduced(tokens)
    weight = torch.randn(ts.x.shape, generator=torch.Generator().manual_seed(3))
    loss = (run_blocks(blocks, ts, impl).x * weight).sum()
    grads = torch.autograd.grad(loss, [tokens] + list(blocks.parameters()))
    ref_loss = sum((ref * w).sum() for ref, w in zip(dense_on_kept(blocks, tokens, cells), weight.split(list(ts.layout.lengths), 0)))
    ref_grads = torch.autograd.grad(ref_loss, [tokens] + list(blocks.parameters()))
    assert torch.allclose(loss, ref_loss, atol=1e-4)
    for got, ref in zip(grads, ref_grads):
        assert (got - ref).abs().max().item() <= 1e-5
    # removed tokens get no gradient through the blocks
    removed = ts.owner < 0
    assert grads[0][:, 1:][removed].abs().max().item() == 0.0


def test_drop_path_draws_one_decision_per_image_as_timm():
    """In training, each image's residual branches are kept or dropped as a whole, with the
    draws timm makes (one per sample and drop path, in block order)."""
    blocks = tiny_blocks(depth=2, drop_path=0.5).train()
    tokens = _tokens()
    ts, cells = _reduced(tokens)
    torch.manual_seed(7)
    out = run_blocks(blocks, ts, "padded")
    torch.manual_seed(7)
    # reference: per image, the block's own modules with its drawn keep factors (0 or 2)
    keep = [[torch.empty(len(KEEP)).bernoulli_(0.5) / 0.5 for _ in range(2)] for _ in blocks]
    refs = []
    for b, c in enumerate(cells):
        x = torch.cat([tokens[b, :1], tokens[b, 1 + c]], 0).unsqueeze(0)
        for block, (k1, k2) in zip(blocks, keep):
            x = x + k1[b] * block.ls1(block.attn(block.norm1(x)))
            x = x + k2[b] * block.ls2(block.mlp(block.norm2(x)))
        refs.append(x[0])
    for got, ref in zip(_per_image(out), refs):
        assert (got - ref).abs().max().item() <= 1e-5
    # and on a full batch it equals timm's own train-mode forward, draw for draw
    torch.manual_seed(11)
    dense = run_dense(blocks, tokens)
    torch.manual_seed(11)
    packed = run_blocks(blocks, TokenSet.from_dense(tokens, GRID), "padded")
    assert (packed.x.view_as(dense) - dense).abs().max().item() <= 1e-6


def test_blocks_without_prefix_tokens_and_an_image_left_empty():
    blocks = tiny_blocks(depth=1).train()
    tokens = _tokens()[:, 1:].requires_grad_()
    image = torch.arange(48) // 12
    mask = (torch.arange(48) % 3 != 0) & (image != 2)  # image 2 keeps nothing
    ts = TokenSet.from_dense(tokens, GRID, num_prefix=0).keep(mask)
    assert ts.layout.lengths == (8, 8, 0, 8)
    out = run_blocks(blocks, ts, "padded")
    for b in (0, 1, 3):
        cells = torch.nonzero(mask.view(4, 12)[b]).view(-1)
        ref = run_dense(blocks, tokens[b : b + 1, cells])[0]
        assert (_per_image(out)[b] - ref).abs().max().item() <= 1e-5
    out.x.sum().backward()
    assert torch.isfinite(tokens.grad).all() and torch.isfinite(blocks[0].attn.qkv.weight.grad).all()


def test_attention_backends_agree_on_a_ragged_batch():
    torch.manual_seed(0)
    ts, _ = _reduced(_tokens())
    q, k, v = torch.randn(3, ts.layout.total, 3, 16).unbind(0)
    with torch.no_grad():
        outs = {impl: packed_attention(q, k, v, ts.layout, impl) for impl in CPU_IMPLS}
    for impl in CPU_IMPLS[1:]:
        assert (outs[impl] - outs["padded"]).abs().max().item() <= 1e-5


def test_bad_blocks_and_attention_names_fail_clearly():
    tokens = _tokens()
    ts = TokenSet.from_dense(tokens, GRID)
    with pytest.raises(TypeError, match="ResPostBlock"):
        run_blocks([ResPostBlock(48, 3)], ts)
    ts, _ = _reduced(tokens)
    with pytest.raises(ValueError, match="unknown attention implementation 'fast'"):
        run_blocks(tiny_blocks(depth=1), ts, "fast")
    with pytest.raises(ValueError, match="'varlen' needs CUDA"):
        resolve_attention("varlen", "cpu", torch.float32)
    with pytest.raises(ValueError, match="no backward on CPU"):
        run_blocks(tiny_blocks(depth=1), ts, "flex")
    assert resolve_attention("auto", "cpu", torch.bfloat16) == "padded"


# Each backend in its device's working precision against the dense blocks in float32 on each
# image's kept tokens; on CPU the same check runs in float32 with float32's tolerance.
PRECISION_CASES = [pytest.param("cpu", torch.float32, impl, id=f"cpu-float32-{impl}") for impl in CPU_IMPLS] + [
    pytest.param("cuda", torch.bfloat16, impl, marks=pytest.mark.gpu, id=f"cuda-bfloat16-{impl}")
    for impl in ("padded", "jagged", "flash", "varlen", "flex", "triton")
]
DIFFERENTIABLE = ("padded", "jagged", "flash")  # the training backends (flex: no CPU backward; varlen: no dropout; triton: inference)


@pytest.mark.parametrize("device, dtype, impl", PRECISION_CASES)
def test_backends_match_float32_dense_blocks_on_each_image_alone(device, dtype, impl):
    tolerance = FLOAT32_TOLERANCE if dtype == torch.float32 else BF16_TOLERANCE
    blocks = tiny_blocks(depth=2, dim=64, heads=4, sharpness=3.0).to(device, dtype).eval()
    tokens = _tokens(dim=64).to(device, dtype)
    ts, cells = _reduced(tokens)
    refs = float32_reference(blocks, tokens, cells)
    with torch.no_grad():
        out = run_blocks(blocks, ts, impl)
    assert_close_per_token(out.x, ts.layout.lengths, refs, tolerance, impl)
    if impl not in DIFFERENTIABLE:
        return
    # gradients with respect to the tokens, against float32 autograd through the dense blocks
    x = tokens.detach().requires_grad_()
    ts, cells = _reduced(x)
    grad = torch.autograd.grad(run_blocks(blocks.train(), ts, impl).x.float().sum(), x)[0]
    wide = copy.deepcopy(blocks).cpu().float()
    x32 = tokens.detach().cpu().float().requires_grad_()
    ref = torch.autograd.grad(sum(r.sum() for r in dense_on_kept(wide, x32, [c.cpu() for c in cells])), x32)[0]
    images = [x.shape[1]] * x.shape[0]
    assert_close_per_token(grad.reshape(-1, x.shape[-1]), images, list(ref.reshape(-1, x.shape[-1]).split(images, 0)), tolerance, f"{impl} gradient")
