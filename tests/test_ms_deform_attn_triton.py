"""The fused Triton deformable-attention kernels against the grid_sample reference.

On CPU the kernels run under Triton's interpreter in a subprocess (TRITON_INTERPRET must be set
before Triton compiles anything); the GPU tests compile them for real.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from eco_m2f.modeling.pixel_decoder.ms_deform_attn import (
    MSDeformAttn,
    ms_deform_attn,
    resolve_impl,
)

pytest.importorskip("triton")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Odd sizes on purpose: channels not a power of two, queries not a multiple of the block,
# locations outside [0, 1] (zero padding), three levels of different aspect.
_INTERPRETED_CHECK = textwrap.dedent(
    """
    import json, torch
    from eco_m2f.modeling.pixel_decoder.ms_deform_attn import ms_deform_attn, ms_deform_attn_core_pytorch
    torch.manual_seed(0)
    shapes = [(5, 7), (3, 4), (2, 2)]
    n, lq, m, d, p = 2, 70, 3, 5, 3
    s = sum(h * w for h, w in shapes)
    value = torch.randn(n, s, m, d, dtype=torch.float64)
    loc = torch.rand(n, lq, m, len(shapes), p, 2, dtype=torch.float64) * 1.4 - 0.2
    w = torch.rand(n, lq, m, len(shapes), p, dtype=torch.float64).softmax(-1)
    go = torch.randn(n, lq, m * d, dtype=torch.float64)
    ref_in = [t.clone().requires_grad_() for t in (value, loc, w)]
    ref = ms_deform_attn_core_pytorch(ref_in[0], shapes, ref_in[1], ref_in[2])
    ref_grads = torch.autograd.grad(ref, ref_in, go)
    tri_in = [t.float().requires_grad_() for t in (value, loc, w)]
    out = ms_deform_attn(tri_in[0], shapes, tri_in[1], tri_in[2], impl="triton")
    grads = torch.autograd.grad(out, tri_in, go.float())
    bf16 = ms_deform_attn(value.bfloat16(), shapes, loc.float(), w.float(), impl="triton")
    result = {
        "out_dtype": str(out.dtype), "out_shape": list(out.shape), "bf16_dtype": str(bf16.dtype),
        "fwd": (out.double() - ref).abs().max().item(),
        "bf16": (bf16.double() - ref).abs().max().item(),
        "ref_scale": ref.abs().max().item(),
        "grads": [(g.double() - r).abs().max().item() for g, r in zip(grads, ref_grads)],
        "grad_scales": [r.abs().max().item() for r in ref_grads],
        "grad_dtypes": [str(g.dtype) for g in grads],
    }
    print("RESULT " + json.dumps(result))
    """
)


def test_kernels_match_reference_under_interpreter():
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run(
        [sys.executable, "-c", _INTERPRETED_CHECK], env=env, cwd=REPO, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")][-1]
    r = json.loads(line[len("RESULT "):])
    assert r["out_shape"] == [2, 70, 15]
    assert r["out_dtype"] == "torch.float32" and r["bf16_dtype"] == "torch.bfloat16"
    assert r["ref_scale"] > 0.5  # a non-trivial output
    assert r["fwd"] < 1e-5
    assert r["bf16"] < 0.05  # bf16 values (8-bit mantissa), float32 accumulation
    assert r["grad_dtypes"] == ["torch.float32"] * 3
    for diff, scale in zip(r["grads"], r["grad_scales"]):
        assert scale > 0.1
        assert diff < 1e-4 * max(1.0, scale)


def test_resolve_impl():
    cpu = torch.device("cpu")
    if os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        assert resolve_impl("auto", cpu) == "pytorch"
        with pytest.raises(ValueError, match="DEFORMABLE_ATTENTION_IMPL='triton' needs CUDA"):
            resolve_impl("triton", cpu)
    assert resolve_impl("pytorch", cpu) == "pytorch"
    with pytest.raises(ValueError, match="choose one of"):
        resolve_impl("cuda_ext", cpu)


# --------------------------------------------------------------------------- GPU
def _inputs(n, lq, m, d, p, shapes, seed, device="cuda"):
    g = torch.Generator().manual_seed(seed)
    s = sum(h * w for h, w in shapes)
    value = torch.randn(n, s, m, d, generator=g)
    loc = torch.rand(n, lq, m, len(shapes), p, 2, generator=g) * 1.2 - 0.1
    w = torch.rand(n, lq, m, len(shapes), p, generator=g).flatten(-2).softmax(-1).view(n, lq, m, len(shapes), p)
    return value.to(device), loc.to(device), w.to(device)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_triton_forward_backward_cuda():
    shapes = [(16, 16), (32, 32), (64, 64)]  # Mask2Former's res5, res4, res3 at a 512 input
    value, loc, w = _inputs(2, sum(h * v for h, v in shapes), 8, 32, 4, shapes, seed=0)
    ins_ref = [t.clone().requires_grad_() for t in (value, loc, w)]
    ins_tri = [t.clone().requires_grad_() for t in (value, loc, w)]
    ref = ms_deform_attn(*ins_ref[:1], shapes, *ins_ref[1:], impl="pytorch")
    out = ms_deform_attn(*ins_tri[:1], shapes, *ins_tri[1:], impl="triton")
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    go = torch.randn_like(ref)
    g_tri = torch.autograd.grad(out, ins_tri, go)
    g_ref = torch.autograd.grad(ref, ins_ref, go)
    torch.testing.assert_close(g_tri[0], g_ref[0], atol=2e-4, rtol=1e-4)  # values
    torch.testing.assert_close(g_tri[2], g_ref[2], atol=2e-4, rtol=1e-4)  # attention weights
    # The sampling locations' gradient jumps at the borders of the bilinear cells: a location within
    # rounding of a border may take either side's gradient (seen on an H100: 1 of 2,064,384
    # elements off by 2.8e-4). Every element but such a few must agree as tightly.
    off = ~torch.isclose(g_tri[1], g_ref[1], atol=2e-4, rtol=1e-4)
    assert off.sum().item() <= 4, f"{off.sum().item()} location gradients differ"
    # bf16 values: float32 accumulation keeps the error at bf16 rounding of the inputs
    out_bf16 = ms_deform_attn(value.bfloat16(), shapes, loc, w, impl="triton")
    assert out_bf16.dtype == torch.bfloat16
    torch.testing.assert_close(out_bf16.float(), ref.detach(), atol=3e-2, rtol=3e-2)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_module_auto_uses_kernel_and_matches():
    torch.manual_seed(0)
    attn = MSDeformAttn(d_model=64, n_levels=3, n_heads=4, n_points=4, impl="pytorch").cuda()
    torch.nn.init.normal_(attn.sampling_offsets.weight, std=0.05)  # non-trivial offsets
    torch.nn.init.normal_(attn.attention_weights.weight, std=0.05)
    shapes = [(8, 8), (16, 16), (32, 32)]
    s = sum(h * w for h, w in shapes)
    x = torch.randn(2, s, 64, device="cuda")
    from eco_m2f.modeling.pixel_decoder.msdeform_encoder import MSDeformAttnEncoder

    ref_points = MSDeformAttnEncoder.get_reference_points(shapes, None, x.device)
    expected = attn(x, ref_points, x, shapes)
    attn.impl = "auto"
    assert resolve_impl("auto", x.device) == "triton"
    torch.testing.assert_close(attn(x, ref_points, x, shapes), expected, atol=1e-5, rtol=1e-5)
