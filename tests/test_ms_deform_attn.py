"""Multi-scale deformable attention: pytorch core vs a naive loop, gradients, FLOP handle, module init."""
from __future__ import annotations

import math

import pytest
import torch
from fvcore.nn import FlopCountAnalysis

from eco_m2f.modeling.pixel_decoder.ms_deform_attn import (
    DEFORMABLE_ATTENTION_FLOP_HANDLES,
    DEFORMABLE_ATTENTION_OP_NAME,
    MSDeformAttn,
    ms_deform_attn,
    ms_deform_attn_core_pytorch,
    ms_deform_attn_flop_count,
)
from eco_m2f.modeling.pixel_decoder.msdeform_encoder import MSDeformAttnEncoder

SHAPES = [(3, 4), (2, 2)]


def _random_inputs(n=2, lq=5, m=2, d=3, p=3, shapes=SHAPES, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    s = sum(h * w for h, w in shapes)
    value = torch.randn(n, s, m, d, generator=g, dtype=dtype)
    # some locations outside [0, 1] exercise the zero padding
    loc = torch.rand(n, lq, m, len(shapes), p, 2, generator=g, dtype=dtype) * 1.4 - 0.2
    w = torch.rand(n, lq, m, len(shapes), p, generator=g, dtype=dtype)
    w = w / w.sum((-1, -2), keepdim=True)
    return value, loc, w


def _naive(value, shapes, loc, weights):
    """Bilinear sampling with zero padding, pixel centres at (i + 0.5) / size, one sample at a time."""
    n, _, m, d = value.shape
    _, lq, _, num_levels, num_points, _ = loc.shape
    out = torch.zeros(n, lq, m, d, dtype=value.dtype)
    starts = [0]
    for h, w in shapes:
        starts.append(starts[-1] + h * w)
    for b in range(n):
        for q in range(lq):
            for head in range(m):
                for lvl, (h, w) in enumerate(shapes):
                    vmap = value[b, starts[lvl] : starts[lvl + 1], head].reshape(h, w, d)
                    for pt in range(num_points):
                        x = loc[b, q, head, lvl, pt, 0].item() * w - 0.5
                        y = loc[b, q, head, lvl, pt, 1].item() * h - 0.5
                        x0, y0 = math.floor(x), math.floor(y)
                        acc = torch.zeros(d, dtype=value.dtype)
                        for yy, xx in ((y0, x0), (y0, x0 + 1), (y0 + 1, x0), (y0 + 1, x0 + 1)):
                            if 0 <= yy < h and 0 <= xx < w:
                                acc += (1 - abs(x - xx)) * (1 - abs(y - yy)) * vmap[yy, xx]
                        out[b, q, head] += weights[b, q, head, lvl, pt] * acc
    return out.reshape(n, lq, m * d)


def test_core_matches_naive_loop():
    value, loc, w = _random_inputs()
    expected = _naive(value, SHAPES, loc, w)
    got = ms_deform_attn_core_pytorch(value, SHAPES, loc, w)
    assert got.shape == (2, 5, 6)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    # spatial shapes given as the official (L, 2) tensor
    got_t = ms_deform_attn_core_pytorch(value, torch.tensor(SHAPES), loc, w)
    torch.testing.assert_close(got_t, got, atol=0, rtol=0)


def test_custom_op_matches_core():
    value, loc, w = _random_inputs(seed=1)
    core = ms_deform_attn_core_pytorch(value, SHAPES, loc, w)
    op = ms_deform_attn(value, SHAPES, loc, w, use_op=True)
    torch.testing.assert_close(op, core, atol=0, rtol=0)


@pytest.mark.parametrize("use_op", [False, True])
def test_gradcheck_float64(use_op):
    value, loc, w = _random_inputs(n=1, lq=2, m=2, d=2, p=2, shapes=[(2, 3), (1, 2)], dtype=torch.float64, seed=2)
    # keep locations away from pixel centres/edges where bilinear sampling has kinks
    loc = (loc * 0.9 + 0.031).requires_grad_(True)
    value.requires_grad_(True)
    w.requires_grad_(True)

    def fn(v, sl, aw):
        return ms_deform_attn(v, [(2, 3), (1, 2)], sl, aw, use_op=use_op)

    assert torch.autograd.gradcheck(fn, (value, loc, w), eps=1e-6, atol=1e-5)


def test_core_errors_name_the_mismatch():
    value, loc, w = _random_inputs()
    with pytest.raises(ValueError, match="cover"):
        ms_deform_attn_core_pytorch(value, [(3, 4), (2, 3)], loc, w)
    with pytest.raises(ValueError, match="DEFORMABLE_ATTENTION_IMPL"):
        ms_deform_attn(value, SHAPES, loc, w, impl="cuda_ext")


class _Wrapper(torch.nn.Module):
    def __init__(self, attn: MSDeformAttn, shapes):
        super().__init__()
        self.attn = attn
        self.shapes = shapes
        self.ref = MSDeformAttnEncoder.get_reference_points(shapes, None, torch.device("cpu"))

    def forward(self, x):
        return self.attn(x, self.ref, x, self.shapes)


def test_flop_handle_counts_the_formula():
    n, d_model, heads, levels, points = 2, 16, 4, 2, 3
    shapes = [(4, 5), (2, 3)]
    s = sum(h * w for h, w in shapes)
    model = _Wrapper(MSDeformAttn(d_model, levels, heads, points), shapes).eval()
    x = torch.randn(n, s, d_model)

    without = FlopCountAnalysis(model, (x,))
    without.unsupported_ops_warnings(False)
    without.total()
    # the core is one node of the trace, unknown to fvcore until the handle is set
    assert DEFORMABLE_ATTENTION_OP_NAME in without.unsupported_ops()

    analysis = FlopCountAnalysis(model, (x,)).set_op_handle(**DEFORMABLE_ATTENTION_FLOP_HANDLES)
    analysis.unsupported_ops_warnings(False)
    by_op = analysis.by_operator()
    expected = n * s * heads * (d_model // heads) * levels * points * 5  # 4 bilinear + 1 weighted-sum MACs
    assert ms_deform_attn_flop_count(n, s, heads, d_model // heads, levels, points) == expected
    assert by_op["ms_deform_attn"] == expected > 0
    assert DEFORMABLE_ATTENTION_OP_NAME not in analysis.unsupported_ops()
    # the four projections are counted by fvcore itself
    linear = n * s * d_model * (heads * levels * points * 2 + heads * levels * points + d_model + d_model)
    assert by_op["linear"] == linear
    assert analysis.total() == expected + linear


def test_official_initialisation():
    attn = MSDeformAttn(d_model=32, n_levels=3, n_heads=8, n_points=4)
    assert torch.all(attn.sampling_offsets.weight == 0)
    assert torch.all(attn.attention_weights.weight == 0) and torch.all(attn.attention_weights.bias == 0)
    assert torch.all(attn.value_proj.bias == 0) and torch.all(attn.output_proj.bias == 0)
    bias = attn.sampling_offsets.bias.view(8, 3, 4, 2)
    # head 0 looks along +x, head 2 along +y; point i sits at distance i + 1; same on every level
    torch.testing.assert_close(bias[0, 0, :, 0], torch.tensor([1.0, 2.0, 3.0, 4.0]))
    torch.testing.assert_close(bias[0, 0, :, 1], torch.zeros(4), atol=1e-6, rtol=0)
    torch.testing.assert_close(bias[2, 0, :, 1], torch.tensor([1.0, 2.0, 3.0, 4.0]))
    torch.testing.assert_close(bias[:, 0], bias[:, 2])
    assert bias.abs().amax(-1).amin() >= 1.0 - 1e-6  # the larger coordinate of each direction is +-(i+1)


def test_module_matches_naive_sampling():
    """The module = value_proj -> sampling at reference + offset / (W, H) -> weighted sum -> output_proj."""
    torch.manual_seed(0)
    shapes = [(3, 4), (2, 2)]
    s = sum(h * w for h, w in shapes)
    attn = MSDeformAttn(d_model=8, n_levels=2, n_heads=2, n_points=2).eval()
    with torch.no_grad():
        attn.sampling_offsets.weight.normal_(std=0.5)
        attn.attention_weights.weight.normal_()
    x = torch.randn(1, s, 8)
    ref = MSDeformAttnEncoder.get_reference_points(shapes, None, torch.device("cpu"))
    with torch.no_grad():
        out = attn(x, ref, x, torch.tensor(shapes))
        value = attn.value_proj(x).view(1, s, 2, 4)
        offsets = attn.sampling_offsets(x).view(1, s, 2, 2, 2, 2)
        normalizer = torch.tensor([[w, h] for h, w in shapes], dtype=torch.float32)
        loc = ref[:, :, None, :, None, :] + offsets / normalizer[None, None, None, :, None, :]
        weights = attn.attention_weights(x).view(1, s, 2, 4).softmax(-1).view(1, s, 2, 2, 2)
        expected = attn.output_proj(_naive(value, shapes, loc, weights))
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="levels"):
        attn(x, ref, x, [(3, 4)])
    with pytest.raises(ValueError, match="divisible"):
        MSDeformAttn(d_model=10, n_heads=4)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_core_cuda_matches_cpu():
    value, loc, w = _random_inputs(n=2, lq=64, m=4, d=8, p=4, shapes=[(16, 12), (8, 6), (4, 3)], seed=3)
    cpu = ms_deform_attn_core_pytorch(value, [(16, 12), (8, 6), (4, 3)], loc, w)
    gpu = ms_deform_attn_core_pytorch(value.cuda(), [(16, 12), (8, 6), (4, 3)], loc.cuda(), w.cuda())
    torch.testing.assert_close(gpu.cpu(), cpu, atol=1e-5, rtol=1e-5)


def test_core_mixed_dtypes_compute_in_the_wider_one():
    value, loc, w = _random_inputs(seed=5)
    ref = ms_deform_attn_core_pytorch(value, SHAPES, loc, w)
    out = ms_deform_attn_core_pytorch(value.bfloat16(), SHAPES, loc, w)
    assert out.dtype == torch.bfloat16
    # only the bf16 rounding of the values and of the output: locations stay float32
    expected = ms_deform_attn_core_pytorch(value.bfloat16().float(), SHAPES, loc, w)
    torch.testing.assert_close(out.float(), expected, atol=2e-2, rtol=1e-2)
    assert (out.float() - ref).abs().max() < 5e-2
