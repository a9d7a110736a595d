"""The runtime benchmark's pieces: the criterion, the per-image reference it checks every run
against, kernel classes, the back-to-back timer, and the script end to end on CPU."""
from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import torch

from eco_m2f.evaluation.throughput import time_back_to_back
from eco_m2f.evaluation.token_runtime import (
    build_stack,
    dense_forward,
    flop_ratio,
    kernel_category,
    keep_counts,
    keep_patterns,
    needed_time,
    per_image_reference,
    relative_error,
    time_share,
)
from eco_m2f.modeling.token_reduction import TokenSet, run_blocks

REPO = Path(__file__).resolve().parents[1]


def test_criterion_bound_and_share():
    assert math.isclose(needed_time(4.0, 0.5), 4.0 - 0.9 * 2.0)
    assert math.isclose(time_share(4.0, needed_time(4.0, 0.5), 0.5), 0.9)
    assert math.isnan(time_share(4.0, 3.0, 1.0))
    assert keep_counts(keep_patterns(4)["mixed 25-100%"], 100) == [25, 50, 75, 100]


def test_per_image_reference_is_the_dense_stack_on_each_images_kept_tokens():
    blocks = build_stack(2, 32, 2, torch.device("cpu"), torch.float32)
    tokens = torch.randn(3, 1 + 20, 32, generator=torch.Generator().manual_seed(0))
    full = TokenSet.from_dense(tokens, (4, 5))
    with torch.no_grad():
        assert torch.equal(per_image_reference(blocks, tokens, full), dense_forward(blocks, tokens).reshape(-1, 32))
        reduced = full.keep_topk(torch.rand(60, generator=torch.Generator().manual_seed(1)), [20, 7, 0])
        ref = per_image_reference(blocks, tokens, reduced)
        assert relative_error(run_blocks(blocks, reduced, "padded").x, ref) <= 1e-6
    assert relative_error(torch.full_like(ref, float("nan")), ref) == float("inf")
    ratio = flop_ratio(blocks, reduced.layout.lengths, full.layout.lengths)
    assert 0.3 < ratio < 0.5  # 29 of 63 tokens, attention quadratic


def test_kernel_classes():
    assert kernel_category("cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16") == "attention"
    assert kernel_category("void pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<64>>") == "attention"
    assert kernel_category("nvjet_tst_128x256_64x4_2x1_v_bz_coopA_TNT") == "gemm"
    assert kernel_category("void at::native::(anonymous namespace)::vectorized_layer_norm_kernel<c10::BFloat16>") == "layer norm"
    assert kernel_category("triton_per_fused_add_native_layer_norm_0") == "fused (triton)"
    assert kernel_category("void at::native::vectorized_elementwise_kernel<4, at::native::GeluCUDAKernelImpl>") == "elementwise"
    assert kernel_category("void at::native::elementwise_kernel<128, 4, direct_copy_kernel_cuda>") == "copy / index"


def test_back_to_back_timer_counts_rounds():
    calls = []
    t = time_back_to_back(lambda: calls.append(1), budget_s=0.0, device=torch.device("cpu"), warmup=2, min_rounds=4)
    assert t.q1_ms <= t.median_ms <= t.q3_ms and t.calls >= 4 and len(calls) == 2 + 1 + t.calls


def test_benchmark_script_runs_end_to_end_on_cpu(tmp_path):
    spec = importlib.util.spec_from_file_location("benchmark_token_runtime", REPO / "scripts" / "benchmark_token_runtime.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    out = tmp_path / "runtime.json"
    assert script.main(["--device", "cpu", "--tiny", "--batch", "3", "--eager", "padded", "--patterns", "all 50%", "mixed 25-100%", "--json", str(out)]) == 0
    results = json.loads(out.read_text())
    mixed = results["patterns"]["mixed 25-100%"]
    assert [r["label"] for r in mixed["rows"]] == ["padded"] and mixed["rows"][0]["err"] <= 1e-5
    assert set(mixed["baselines"]) == {"eager timm", "eager timm (again)"}
    assert set(results["summary"]) == {"all 50%", "mixed 25-100%"}


def test_summary_picks_the_bucketed_configuration_that_passes_most_patterns(capsys):
    spec = importlib.util.spec_from_file_location("benchmark_token_runtime", REPO / "scripts" / "benchmark_token_runtime.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    base = {"eager timm": {"t": 4.0}, "eager timm (again)": {"t": 4.0}, "graphed timm": {"t": 3.9}}

    def graph(name, t, err=1e-3, **extra):
        return {"kind": "graph", "label": f"{name}: x", "t": t, "err": err, **extra}

    results = {"patterns": {
        # bound against the fastest dense baseline (3.9): 3.9 - 0.9 * 3.9 * 0.5 = 2.145
        "mixed": {"flop_ratio": 0.5, "baselines": base, "rows": [
            graph("before", 2.5), graph("flash-64-compiled", 2.1), graph("flash-exact", 2.0), graph("flash-64", 1.0, err=0.5)]},
        "all 100%": {"flop_ratio": 1.0, "baselines": base, "rows": [
            graph("before", 4.2), graph("flash-64-compiled", 3.8), graph("flash-exact", 3.8, same_as="flash-64-compiled: x"), graph("flash-64", 3.8)]},
    }}
    script._summary(results, ["mixed", "all 100%"])
    out = capsys.readouterr().out
    assert results["summary"]["mixed"]["best"] == "flash-exact: x"  # fastest correct run (flash-64 is wrong there)
    assert results["summary"]["mixed"]["ok_vs_best_dense"] and results["summary"]["mixed"]["best_dense"] == "graphed timm"
    assert results["recommended"]["config"] == "flash-64-compiled"  # exact rows pass too, but are no default
    assert 'InferenceOptions(attention="flash", row_bucket=64, len_bucket=128, dense_when_uniform=True, compile=True)' in out
