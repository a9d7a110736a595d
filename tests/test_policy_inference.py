"""The frozen policy's inference copy: BatchNorm folded into the convolutions (exact up to
rounding, every BatchNorm of EfficientNet-Lite0 folded), channels-last, rebuilt when the policy's
weights change in place or it moves."""
from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from eco_m2f.config import setup_cfg
from eco_m2f.modeling.meta_arch.token_sharing_policy import TokenSharingPolicy
from eco_m2f.modeling.policy.inference import FastPolicy, fold_batchnorm

REPO = Path(__file__).resolve().parents[1]


def _policy(seed: int = 0) -> TokenSharingPolicy:
    cfg = setup_cfg(str(REPO / "configs/synthetic/cts_policy_tiny_cpu.yaml"),
                    ["MODEL.BACKBONE.PRETRAINED", "False", "MODEL.POLICY.WINDOW_SIZES", "[2, 4]"])
    torch.manual_seed(seed)
    policy = TokenSharingPolicy(cfg)
    with torch.no_grad():  # statistics and affine parameters far from the identity, so that folding matters
        for m in policy.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
    return policy.freeze()


def test_folding_every_batchnorm_keeps_the_scores():
    policy = _policy()
    x = torch.randn(2, 3, 128, 96)
    fused, folds = fold_batchnorm(policy)
    assert folds == sum(isinstance(m, nn.BatchNorm2d) for m in policy.modules()) > 40
    assert not any(isinstance(m, nn.BatchNorm2d) for m in fused.modules())
    with torch.no_grad():
        want = policy.window_logits(x)
        got = fused.to(memory_format=torch.channels_last).window_logits(x.contiguous(memory_format=torch.channels_last))
    assert set(got) == set(want) == {2, 4}
    for n in want:
        assert (got[n] - want[n]).abs().max().item() <= 1e-4 * max(1.0, want[n].abs().max().item())
    assert set(policy.state_dict()) != set(fused.state_dict())  # the copy, not the policy, changed


def test_the_fast_copy_follows_the_policy_weights():
    policy, other = _policy(0), _policy(1)
    fast = FastPolicy()
    x = torch.randn(1, 3, 64, 64)
    first = fast.get(policy, torch.device("cpu"))
    assert fast.get(policy, torch.device("cpu")) is first  # unchanged weights: the same copy
    policy.load_state_dict(other.state_dict())  # in place, as checkpoint loading does
    second = fast.get(policy, torch.device("cpu"))
    assert second is not first
    with torch.no_grad():
        assert (second.window_logits(x)[2] - other.window_logits(x)[2]).abs().max().item() <= 1e-4


def _close(got: torch.Tensor, want: torch.Tensor, tol: float) -> bool:
    """Logits equal up to ``tol`` of their scale (a wrong fold is off by the scale itself)."""
    return (got.float() - want.float()).abs().max().item() <= tol * max(1.0, want.float().abs().max().item())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cts_on_cuda_uses_the_fast_copy_with_the_same_scores():
    """The CUDA path (folded, channels-last) against the policy as trained: in fp32 (TF32 off)
    equal to rounding; under bf16 autocast no further from the fp32 scores than the policy as
    trained is under bf16 (some fifty layers of bf16 rounding either way)."""
    policy = _policy().cuda()
    fast = FastPolicy().get(policy, torch.device("cuda"))
    x = torch.randn(2, 3, 256, 192, device="cuda")
    xc = x.contiguous(memory_format=torch.channels_last)
    flags = dict(enabled=True, benchmark=False, deterministic=False)
    with torch.no_grad(), torch.backends.cudnn.flags(allow_tf32=False, **flags):
        want = policy.window_logits(x)
        got = fast.window_logits(xc)
    for n in want:
        assert _close(got[n], want[n], 1e-3), n
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        trained, folded = policy.window_logits(x), fast.window_logits(xc)
    for n in want:
        scale = want[n].abs().max().item()
        error_trained = (trained[n].float() - want[n]).abs().max().item()
        error_folded = (folded[n].float() - want[n]).abs().max().item()
        assert error_folded <= 2 * error_trained + 1e-2 * scale, (n, error_folded, error_trained, scale)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_the_graphed_policy_replays_the_fast_copy_and_follows_new_weights():
    """bf16 inference replays one CUDA graph per shape: equal to the eager fast copy, no new
    capture for a new batch of the same shape, a new one for another shape or new weights."""
    policy, other = _policy(0).cuda(), _policy(1).cuda()
    fast = FastPolicy()
    mean, std = torch.zeros(3, device="cuda"), torch.ones(3, device="cuda")
    x, y = torch.randn(2, 3, 256, 192, device="cuda"), torch.randn(2, 3, 256, 192, device="cuda")
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        first = fast.window_logits(policy, x, mean, std)
        second = fast.window_logits(policy, y, mean, std)
        eager = fast.get(policy, x.device).window_logits(y.contiguous(memory_format=torch.channels_last), mean, std)
        assert fast.captures == 1
        for n in eager:  # the same kernels (up to cuDNN's choice between equivalent ones)
            assert _close(second[n], eager[n], 1e-2), n
        assert not torch.equal(first[2], second[2])  # the clone kept the first batch's result
        fast.window_logits(policy, x[:1], mean, std)
        assert fast.captures == 2
        policy.load_state_dict(other.state_dict())
        moved = fast.window_logits(policy, y, mean, std)
        yc = y.contiguous(memory_format=torch.channels_last)
        want = fast.get(policy, y.device).window_logits(yc, mean, std)  # the eager copy of the new weights
        old = FastPolicy().get(_policy(0).cuda(), y.device).window_logits(yc, mean, std)
    assert fast.captures == 3
    for n in want:
        assert _close(moved[n], want[n], 1e-2), n  # the new weights' scores,
        assert not _close(moved[n], old[n], 1e-2), n  # not the old ones'


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_the_compiled_policy_gives_the_eager_copys_scores():
    """MODEL.TOKEN_SHARING.COMPILE_POLICY: the graph replays the compiled copy, whose bf16 scores
    are as close to the fp32 scores as the uncompiled copy's bf16 scores (fused kernels round in
    other places, so the two bf16 results differ by about their own error; a wrong computation
    is off by the scale of the logits)."""
    policy = _policy(0).cuda()
    plain, compiled = FastPolicy(), FastPolicy(compile=True)
    mean, std = torch.zeros(3, device="cuda"), torch.ones(3, device="cuda")
    x = torch.randn(2, 3, 256, 192, device="cuda")
    flags = dict(enabled=True, benchmark=False, deterministic=False)
    with torch.no_grad(), torch.backends.cudnn.flags(allow_tf32=False, **flags):
        exact = plain.get(policy, x.device).window_logits(x.contiguous(memory_format=torch.channels_last), mean, std)
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16), warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # "compiling the policy network failed" fails the test
        want = plain.window_logits(policy, x, mean, std)
        got = compiled.window_logits(policy, x, mean, std)
        again = compiled.window_logits(policy, x, mean, std)
    assert compiled.captures == 1
    for n in exact:
        scale = exact[n].abs().max().item()
        err_plain = (want[n].float() - exact[n]).abs().max().item()
        err_compiled = (got[n].float() - exact[n]).abs().max().item()
        assert err_compiled <= 2.0 * err_plain + 1e-2 * scale, (n, err_compiled, err_plain, scale)
        assert err_compiled <= 0.25 * scale, (n, err_compiled, scale)
        assert torch.equal(got[n], again[n]), n  # replays are deterministic


def test_inside_another_capture_the_policy_runs_its_kernels_instead_of_a_replay(monkeypatch):
    """While a larger graph is being captured (the whole network as one CUDA graph) the policy
    cannot replay a graph of its own: it runs the fast copy, captures nothing, and gives the
    copy's scores (the capture status faked here; the real capture is the GPU test below)."""
    policy = _policy(0)
    fast = FastPolicy()
    mean, std = torch.zeros(3), torch.ones(3)
    x = torch.randn(2, 3, 64, 64).to(torch.bfloat16)  # half inputs: the graphed path on CUDA

    def no_capture(*args, **kwargs):
        raise AssertionError("captured a graph of its own inside another capture")

    monkeypatch.setattr(fast, "_capture", no_capture)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        got = fast.window_logits(policy, x, mean, std)
        want = fast.get(policy, x.device).window_logits(x.contiguous(memory_format=torch.channels_last), mean, std)
    assert fast.captures == 0
    assert set(got) == {2, 4}
    for n in want:
        assert torch.equal(got[n], want[n]), n


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_the_policy_is_captured_into_a_graph_around_it():
    """A CUDA graph captured around ``window_logits`` (after its own graph was captured in the
    warm-up) replays the policy's scores of new inputs."""
    policy = _policy(0).cuda()
    fast = FastPolicy()
    mean, std = torch.zeros(3, device="cuda"), torch.ones(3, device="cuda")
    static = torch.randn(2, 3, 256, 192, device="cuda")
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=False):
        fast.window_logits(policy, static, mean, std)  # warm-up: the policy's own graph
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = fast.window_logits(policy, static, mean, std)
        new = torch.randn_like(static)
        static.copy_(new)
        graph.replay()
        want = fast.get(policy, new.device).window_logits(new.contiguous(memory_format=torch.channels_last), mean, std)
    assert fast.captures == 1
    for n in want:
        assert _close(out[n], want[n], 1e-2), n
