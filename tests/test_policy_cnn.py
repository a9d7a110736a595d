"""papers/002's small policy network (build_policy_cnn_backbone): its shape, its FLOPs against
fvcore, training from scratch, the BatchNorm fold of the frozen copy, and a CTS Segmenter using it
through MODEL.TOKEN_SHARING.POLICY_BACKBONE with the structure check of POLICY_CONFIG."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from token_reducers import TINY, images  # noqa: E402
from eco_m2f.architectures import build_model  # noqa: E402
from eco_m2f.config import setup_cfg  # noqa: E402
from eco_m2f.modeling.backbone.policy_cnn import PolicyCNN  # noqa: E402
from eco_m2f.modeling.policy.inference import fold_batchnorm  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SMALL = REPO / "configs/synthetic/cts_policy_small.yaml"
SMALL_DCTS = REPO / "configs/synthetic/cts_policy_dcts_small.yaml"
TINY_CPU = ["MODEL.DEVICE", "cpu"]
CTS = ["MODEL.TOKEN_REDUCTION.NAME", "CTS", "MODEL.TOKEN_REDUCTION.CTS.NUM_SHARED", "2",
       "MODEL.TOKEN_REDUCTION.CTS.NUM_SHARED_OF", "0", "MODEL.TOKEN_SHARING.POLICY_BACKBONE", "build_policy_cnn_backbone"]


def _policy(config: Path = SMALL, *opts: str, seed: int = 0):
    torch.manual_seed(seed)
    return build_model(setup_cfg(str(config), [*TINY_CPU, *opts]))


def test_seven_convolutions_of_128_channels_to_stride_32_and_bad_strides_fail_by_key():
    net = PolicyCNN()
    convs = [m for m in net.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 7 and all(c.out_channels == 128 and c.kernel_size == (3, 3) for c in convs)
    assert [c.stride[0] for c in convs] == [2, 2, 2, 2, 2, 1, 1]
    out = net(torch.zeros(1, 3, 96, 64))["res5"]
    assert out.shape == (1, 128, 3, 2) and net.output_shape()["res5"].stride == 32
    for bad in ([2, 2, 2, 2], [2, 2, 2, 2, 2, 3], []):
        with pytest.raises(ValueError, match="MODEL.POLICY_CNN.STRIDES"):
            PolicyCNN(strides=bad)
    with pytest.raises(ValueError, match="no pre-trained weights"):
        build_model(setup_cfg(str(SMALL), [*TINY_CPU, "MODEL.BACKBONE.PRETRAINED", "True"]))


def test_policy_flops_equal_fvcore_and_every_window_size_is_scored():
    from eco_m2f.evaluation.flops import count_flops

    for config in (SMALL, SMALL_DCTS):  # one 2 x 2 head; a head per window size, on pooled maps
        policy = _policy(config).eval()
        for h, w in [(64, 64), (128, 96), (256, 256)]:
            assert policy.flops(h, w) == pytest.approx(count_flops(policy, torch.zeros(1, 3, h, w))["total"] * 1e9, rel=1e-9)
    with torch.no_grad():
        logits = policy.window_logits(torch.zeros(2, 3, 128, 128))
    assert {n: tuple(v.shape) for n, v in logits.items()} == {2: (2, 2, 4, 4), 4: (2, 2, 2, 2), 8: (2, 2, 1, 1), 16: (2, 2, 0, 0)}


def test_it_trains_from_scratch_and_its_batchnorms_fold_into_the_frozen_copy():
    policy = _policy().train()
    g = torch.Generator().manual_seed(1)
    batch = [{"image": torch.randint(0, 256, (3, 64, 64), generator=g, dtype=torch.uint8),
              "sem_seg": torch.randint(0, 3, (64, 64), generator=g)} for _ in range(2)]
    losses = policy(batch)
    losses["loss_policy"].backward()
    first = policy.backbone.layers[0].conv.weight
    assert torch.isfinite(losses["loss_policy"]) and first.grad is not None and first.grad.abs().sum() > 0
    frozen = policy.freeze()
    with torch.no_grad():
        for m in frozen.modules():  # statistics away from the identity, so that the fold does something
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    fused, folds = fold_batchnorm(frozen)
    assert folds == 7 and not any(isinstance(m, nn.BatchNorm2d) for m in fused.modules())
    x = torch.randn(2, 3, 96, 64)
    with torch.no_grad():
        want, got = frozen.window_logits(x), fused.window_logits(x)
    assert (got[2] - want[2]).abs().max() <= 1e-4 * max(1.0, want[2].abs().max().item())


def test_a_cts_segmenter_runs_the_small_policy_and_checks_its_config(tmp_path):
    torch.manual_seed(3)
    saved = _policy().state_dict()
    path = tmp_path / "policy_small.pth"
    torch.save({"model": saved}, path)
    opts = ["MODEL.TOKEN_SHARING.POLICY_WEIGHTS", str(path), "MODEL.TOKEN_SHARING.POLICY_CONFIG", str(SMALL)]
    model = build_model(setup_cfg(None, TINY + CTS + opts)).eval()
    policy = model.token_reducer.policy
    assert isinstance(policy.backbone, PolicyCNN)
    sd = model.state_dict()
    assert all(torch.equal(sd[f"token_reducer.policy.{k}"], v) for k, v in saved.items())
    with torch.no_grad():
        _, reduced = model.reduced_network(images((64, 64), (64, 64), seed=2))
    assert reduced.tokens.live_counts == (16 - 3 * 2, 16 - 3 * 2)
    # the default EfficientNet policy config does not match the structure this config builds
    with pytest.raises(ValueError, match="MODEL.TOKEN_SHARING.POLICY_BACKBONE"):
        build_model(setup_cfg(None, TINY + CTS + ["MODEL.TOKEN_SHARING.POLICY_WEIGHTS", str(path),
                                                  "MODEL.TOKEN_SHARING.POLICY_CONFIG", str(REPO / "configs/synthetic/cts_policy.yaml")]))
    with pytest.raises(ValueError, match="POLICY_BACKBONE 'resnet'"):
        build_model(setup_cfg(None, TINY + CTS[:-2] + ["MODEL.TOKEN_SHARING.POLICY_BACKBONE", "resnet"]))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_the_small_policy_replays_its_folded_copy_on_cuda():
    """bf16 on CUDA: the folded, channels-last, graphed copy gives the policy's own scores."""
    from eco_m2f.modeling.policy.inference import FastPolicy

    policy = _policy(SMALL_DCTS).freeze().cuda()
    with torch.no_grad():
        for m in policy.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    fast = FastPolicy()
    mean, std = torch.zeros(3, device="cuda"), torch.ones(3, device="cuda")
    x = torch.randn(2, 3, 256, 192, device="cuda")
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        got = fast.window_logits(policy, x, mean, std)
        want = policy.window_logits(x, mean, std)
    assert fast.captures == 1
    for n in want:
        assert got[n].shape == want[n].shape, n
        if want[n].numel() == 0:  # 256 x 192 holds no window of 16 x 16 patches
            continue
        scale = max(1.0, want[n].float().abs().max().item())
        assert (got[n].float() - want[n].float()).abs().max().item() <= 5e-2 * scale, n
