"""Bilinear resizing (matrix products; the Triton kernel of CUDA inference) equals F.interpolate (align_corners=False)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from eco_m2f.modeling.bilinear_resize import bilinear_resize, interpolation_matrix
from eco_m2f.modeling.heads.vit_decode_head import resize_logits

REPO = str(Path(__file__).resolve().parents[1])


@pytest.mark.parametrize("size_in,size_out", [((4, 4), (64, 64)), ((5, 7), (13, 29)), ((32, 48), (16, 20)),
                                              ((1, 1), (4, 3)), ((10, 10), (3, 17)), ((64, 64), (1000, 777))])
def test_equals_interpolate_up_and_down(size_in, size_out):
    torch.manual_seed(0)
    x = torch.randn(2, 3, *size_in, dtype=torch.float64)
    expected = F.interpolate(x, size_out, mode="bilinear", align_corners=False)
    out = bilinear_resize(x, size_out)
    assert out.shape == expected.shape and out.dtype == torch.float64
    assert torch.allclose(out, expected, atol=1e-12)


def test_rows_of_the_matrix_are_two_tap_weights_summing_to_one():
    m = interpolation_matrix(4, 8, torch.device("cpu"), torch.float64)
    assert torch.allclose(m.sum(1), torch.ones(8, dtype=torch.float64))
    assert ((m != 0).sum(1) <= 2).all()
    # output 1 of 8 from 4: source (1 + 0.5) * 0.5 - 0.5 = 0.25 -> 0.75 of input 0, 0.25 of input 1
    assert m[1, :2].tolist() == [0.75, 0.25]
    # the first output clamps to the edge: all of input 0
    assert m[0].tolist() == [1.0, 0.0, 0.0, 0.0]


def test_keeps_float32_under_autocast_and_rejects_integer_maps():
    x = torch.randn(1, 2, 4, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = bilinear_resize(x, (8, 8))
    assert out.dtype == torch.float32
    assert torch.allclose(out, F.interpolate(x, (8, 8), mode="bilinear", align_corners=False), atol=1e-6)
    with pytest.raises(ValueError, match="floating-point"):
        bilinear_resize(torch.zeros(1, 1, 2, 2, dtype=torch.long), (4, 4))


def test_resize_logits_is_interpolate_when_traced_for_flop_counts():
    from fvcore.nn import FlopCountAnalysis

    class Up(torch.nn.Module):
        def forward(self, x):
            return resize_logits(x, (32, 32))

    x = torch.randn(1, 3, 8, 8)
    analysis = FlopCountAnalysis(Up(), x)
    analysis.unsupported_ops_warnings(False)
    assert analysis.total() == 4 * 3 * 32 * 32  # fvcore's bilinear count, not the products'
    assert dict(analysis.by_operator()) == {"upsample_bilinear2d": 4 * 3 * 32 * 32}
    assert torch.allclose(Up()(x), F.interpolate(x, (32, 32), mode="bilinear", align_corners=False), atol=1e-6)


@pytest.mark.gpu
def test_the_bilinear_products_equal_interpolate_on_the_gpu_in_bfloat16():
    x = torch.randn(8, 16, 64, 64, device="cuda")
    ref = F.interpolate(x, (1024, 1024), mode="bilinear", align_corners=False)
    assert (bilinear_resize(x, (1024, 1024)) - ref).abs().max().item() < 1e-4
    half = bilinear_resize(x.bfloat16(), (1024, 1024)).float()
    assert (half - ref).abs().max().item() < 0.05 * ref.abs().max().item()


def test_the_matrix_cache_stays_bounded_over_many_sizes():
    from eco_m2f.modeling import bilinear_resize as module

    for n in range(2, 2 + 3 * module.MAX_CACHED):
        bilinear_resize(torch.ones(1, 1, 3, 3), (n, n + 1))
    assert len(module._MATRICES) <= module.MAX_CACHED
    # a recently used size is still there and gives the same result
    out = bilinear_resize(torch.arange(9.0).view(1, 1, 3, 3), (7, 5))
    assert torch.allclose(out, F.interpolate(torch.arange(9.0).view(1, 1, 3, 3), (7, 5), mode="bilinear", align_corners=False), atol=1e-6)


_INTERPRETED_CHECK = textwrap.dedent(
    """
    import json
    import torch
    import torch.nn.functional as F
    from eco_m2f.modeling.bilinear_resize_triton import bilinear_resize_triton
    torch.manual_seed(0)
    errors = {}
    cases = [((2, 3, 4, 4), (64, 64), 16), ((1, 2, 5, 7), (13, 29), 8), ((1, 1, 32, 48), (16, 20), 1024),
             ((2, 1, 1, 1), (4, 3), 4), ((1, 2, 10, 10), (3, 17), 4), ((1, 1, 8, 8), (40, 37), 16)]
    for shape, size, block in cases:
        x = torch.randn(*shape)
        ref = F.interpolate(x.double(), size, mode="bilinear", align_corners=False)
        out = bilinear_resize_triton(x, size, block_w=block)
        errors[str((shape, size, block))] = [(out.double() - ref).abs().max().item(), list(out.shape), str(out.dtype)]
    print(json.dumps(errors))
    """
)


def test_the_triton_kernel_equals_interpolate_under_the_interpreter():
    """Up, down, odd sizes, a 1 x 1 source, blocks narrower and wider than the output row."""
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=REPO)
    done = subprocess.run([sys.executable, "-c", _INTERPRETED_CHECK], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    errors = json.loads(done.stdout.strip().splitlines()[-1])
    assert len(errors) == 6
    for case, (err, shape, dtype) in errors.items():
        assert err < 1e-5, case
        assert dtype == "torch.float32"
    assert errors[str(((2, 3, 4, 4), (64, 64), 16))][1] == [2, 3, 64, 64]


def test_the_kernel_serves_cuda_inference_only():
    from eco_m2f.modeling.bilinear_resize import _triton_applies

    assert not _triton_applies(torch.randn(1, 1, 2, 2))  # CPU: the matrices
    if torch.cuda.is_available():
        x = torch.randn(1, 1, 2, 2, device="cuda", requires_grad=True)
        assert not _triton_applies(x)  # a gradient to track: the matrices
        with torch.no_grad():
            assert _triton_applies(x)


@pytest.mark.gpu
def test_the_triton_kernel_equals_interpolate_on_the_gpu():
    x = torch.randn(8, 16, 64, 64, device="cuda")
    ref = F.interpolate(x.double(), (1024, 1024), mode="bilinear", align_corners=False)
    with torch.no_grad():
        out = bilinear_resize(x, (1024, 1024))
        assert (out.double() - ref).abs().max().item() < 1e-5
        # a ratio that float32 does not hold exactly: PyTorch's own float32 kernel, to its rounding
        odd = bilinear_resize(x, (1000, 777)) - F.interpolate(x, (1000, 777), mode="bilinear", align_corners=False)
        assert odd.abs().max().item() < 1e-4
    y = x.clone().requires_grad_(True)
    bilinear_resize(y, (128, 128)).sum().backward()  # the matrices: differentiable
    assert y.grad is not None and torch.allclose(y.grad, torch.full_like(y, 4.0), atol=1e-4)
