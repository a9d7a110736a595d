"""The runtime's own ragged attention kernel (token_reduction/triton_attention.py).

On CPU the kernel runs under Triton's interpreter in a subprocess (TRITON_INTERPRET must be set
before triton is imported): against softmax attention on each image alone, for images longer
than a query block, an image without patch tokens, a grid sized past the longest image (as a
bucketed CUDA graph runs it) and a padding image after the last, on strided views of one qkv
projection, in float32 and bfloat16; and inside the blocks against the padded backend. The
GPU tests of test_token_blocks.py and test_token_graphs.py run it eagerly and in graphs."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import pytest
import torch

from eco_m2f.modeling.token_reduction import resolve_attention
from eco_m2f.modeling.token_reduction.options import InferenceOptions

REPO = str(Path(__file__).resolve().parents[1])

_INTERPRETED_CHECK = textwrap.dedent(
    """
    import json, sys
    import torch
    import torch.nn.functional as F
    sys.path.insert(0, "tests")
    from eco_m2f.modeling.token_reduction import TokenSet, packed_attention, resolve_attention, run_blocks
    from eco_m2f.modeling.token_reduction.packing import StaticLayout
    from eco_m2f.modeling.token_reduction.triton_attention import TritonAttentionConfig, varlen_attention_triton
    from vit_blocks_reference import tiny_blocks

    torch.manual_seed(0)
    lengths = [1, 37, 70, 5]  # block_m 32: image 2 spans three query blocks, image 0 holds its class token only
    heads, dim = 3, 24
    qkv = torch.randn(sum(lengths), 3, heads, dim)
    q, k, v = qkv.unbind(1)  # views, row stride 3 * H * D
    scale = dim ** -0.5
    def reference(q, k, v, lengths):
        out, s = [], 0
        for n in lengths:
            qq, kk, vv = (t[s:s + n].float().transpose(0, 1) for t in (q, k, v))
            out.append(F.scaled_dot_product_attention(qq, kk, vv, scale=scale).transpose(0, 1))
            s += n
        return torch.cat(out)
    ref = reference(q, k, v, lengths)
    offsets = torch.tensor([0, 1, 38, 108, 113], dtype=torch.int32)
    config = TritonAttentionConfig(block_m=32, block_n=16)
    result = {"resolved": resolve_attention("triton", "cpu", torch.float32)}
    out = varlen_attention_triton(q, k, v, offsets, 70, scale, config)
    result["exact"] = (out - ref).abs().max().item()
    result["dtype"] = str(out.dtype)
    # a bucketed graph: the grid sized for 128 rows, 15 padding rows after the last image
    padded_qkv = torch.cat([qkv, torch.full((15, 3, heads, dim), 7.0)])
    pq, pk, pv = padded_qkv.unbind(1)
    bucket = StaticLayout(torch.tensor([0, 1, 38, 108, 113, 128], dtype=torch.int32), 128)
    got = packed_attention(pq, pk, pv, bucket, "triton", 0.0, scale)
    result["bucketed"] = (got[:113] - ref).abs().max().item()
    result["padding_finite"] = bool(torch.isfinite(got[113:]).all())
    bq, bk, bv = (t.bfloat16() for t in (q, k, v))
    result["bf16"] = (varlen_attention_triton(bq, bk, bv, offsets, 70, scale, config).float() - reference(bq, bk, bv, lengths)).abs().max().item()
    result["bf16_scale"] = ref.abs().max().item()
    # the blocks on a reduced token set, against the padded backend
    blocks = tiny_blocks(depth=2, dim=48, heads=3, sharpness=3.0).eval()
    tokens = torch.randn(3, 1 + 12, 48)
    ts = TokenSet.from_dense(tokens, (3, 4)).keep_topk(torch.rand(36), [12, 4, 0])
    with torch.no_grad():
        a = run_blocks(blocks, ts, "padded").x
        b = run_blocks(blocks, ts, "triton").x
    result["blocks"] = (a - b).abs().max().item()
    try:
        x = tokens.clone().requires_grad_()
        run_blocks(blocks, TokenSet.from_dense(x, (3, 4)).keep_topk(torch.rand(36), [12, 4, 0]), "triton")
        result["grad_error"] = ""
    except ValueError as e:
        result["grad_error"] = str(e)
    print("RESULT " + json.dumps(result))
    """
)


def test_kernel_matches_softmax_attention_per_image_under_interpreter():
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-c", _INTERPRETED_CHECK], env=env, cwd=REPO, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    r = json.loads([ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")][-1][len("RESULT "):])
    assert r["resolved"] == "triton" and r["dtype"] == "torch.float32"
    assert r["exact"] < 1e-5 and r["bucketed"] < 1e-5 and r["padding_finite"]
    assert r["bf16_scale"] > 0.5 and r["bf16"] < 0.05  # bf16 inputs and output, float32 softmax
    assert r["blocks"] < 1e-5
    assert "inference only" in r["grad_error"]


def _compile_for_hopper(dtype: str, config):
    """The kernel compiled ahead of time for sm_90 (no GPU needed: Triton ships ptxas), with the
    16-divisible pointers and strides that its launches get (ViT rows of 3 x H x 64 values)."""
    triton = pytest.importorskip("triton")
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from eco_m2f.modeling.token_reduction.triton_attention import _varlen_attention_fwd as kernel

    names = kernel.arg_names
    signature = {n: ("*i32" if n == "offsets_ptr" else f"*{dtype}") if n.endswith("_ptr") else
                 "fp32" if n == "qk_scale" else "i32" if n.startswith("stride") else "constexpr" for n in names}
    constants = {"D": 64, "BLOCK_D": 64, "EVEN_D": True, "BLOCK_M": config.block_m, "BLOCK_N": config.block_n, "DOT_F32": False}
    aligned = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(names) if n.endswith("_ptr") or n.startswith("stride")}
    source = ASTSource(fn=kernel, signature=signature, constexprs={(names.index(n),): v for n, v in constants.items()},
                       attrs=aligned)
    return triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": config.num_warps, "num_stages": config.num_stages})


def _resource_usage(cubin: bytes) -> str:
    """cuobjdump's register and stack line of a cubin ("" without the tool)."""
    import shutil

    import triton

    tool = shutil.which("cuobjdump") or str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump")
    if not Path(tool).is_file():
        return ""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
    return next((line for line in out.splitlines() if "REG:" in line), "")


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"), reason="compiles for the GPU")
def test_kernel_compiles_to_hopper_matrix_instructions():
    """ViT head dim 64, every tile setting the profile times: a cubin whose products are wgmma
    and whose loads are pipelined (cp.async); the default spills no register."""
    from eco_m2f.evaluation.token_runtime import TRITON_CONFIGS
    from eco_m2f.modeling.token_reduction.triton_attention import DEFAULT_TRITON_ATTENTION, TritonAttentionConfig

    cases = [("fp16", DEFAULT_TRITON_ATTENTION)] + [("bf16", TritonAttentionConfig(*c)) for c in TRITON_CONFIGS]
    assert TritonAttentionConfig(*TRITON_CONFIGS[0]) == DEFAULT_TRITON_ATTENTION
    for dtype, config in cases:
        try:
            compiled = _compile_for_hopper(dtype, config)
        except (ImportError, RuntimeError) as e:  # a triton without its NVIDIA backend or ptxas
            if "ptxas" in str(e) or "backend" in str(e).lower():
                pytest.skip(f"triton cannot compile for sm_90 here: {e}")
            raise
        ptx = compiled.asm["ptx"]
        assert compiled.asm.get("cubin"), config
        assert "wgmma.mma_async" in ptx and "mma.sync" not in ptx and "cp.async" in ptx, (dtype, config)
        if config == DEFAULT_TRITON_ATTENTION:
            usage = _resource_usage(compiled.asm["cubin"])
            if usage:
                assert "STACK:0 " in usage, usage


def test_a_model_set_to_triton_attention_trains_with_the_default_attention():
    """The kernel has no backward: a training pass of a model configured with it runs ``auto``
    (here on CPU: padded) and gives the losses and gradients of a model configured with ``auto``."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from token_reducers import K, tiny_segmenter

    opts = ["MODEL.TOKEN_REDUCTION.NAME", "DTOP", "MODEL.TOKEN_REDUCTION.DTOP.PRUNE_LAYERS", "[1, 2]",
            "MODEL.TOKEN_REDUCTION.DTOP.THETA", "0.6"]
    g = torch.Generator().manual_seed(11)
    batch = [{"image": torch.randint(0, 256, (3, 64, 64), generator=g, dtype=torch.uint8), "height": 64, "width": 64,
              "sem_seg": torch.randint(0, K, (64, 64), generator=g)} for _ in range(2)]
    results = []
    for attention in ("auto", "triton"):
        model = tiny_segmenter(*opts, "MODEL.TOKEN_REDUCTION.ATTENTION", attention, seed=1).train()
        with torch.no_grad():
            for head in model.token_reducer.heads.values():
                head[1].weight.mul_(40.0)
        torch.manual_seed(0)
        losses = model(batch)
        sum(losses.values()).backward()
        results.append((losses, model.backbone.blocks[0].attn.qkv.weight.grad.clone()))
    (a, ga), (b, gb) = results
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert torch.equal(ga, gb) and ga.abs().sum() > 0


def test_triton_attention_is_refused_where_it_cannot_run():
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        pytest.skip("under the interpreter the kernel runs on CPU")
    with pytest.raises(ValueError, match="'triton' needs CUDA fp16/bf16"):
        resolve_attention("triton", "cpu", torch.float32)
    assert InferenceOptions(attention="triton").attention == "triton"  # graphs can replay it
