"""Optimizer groups, learning-rate schedules and gradient clipping (eco_m2f.solver)."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn

from eco_m2f.config import get_cfg
from eco_m2f.solver import build_gradient_clipper, build_lr_scheduler, build_optimizer, get_param_groups


class FrozenBatchNorm2d(nn.Module):
    """Stand-in for a frozen BN that (unusually) holds parameters: matched by its class name."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(n))
        self.bias = nn.Parameter(torch.zeros(n))


class ToyModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.backbone = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), FrozenBatchNorm2d(4))
        self.backbone.absolute_pos_embed = nn.Parameter(torch.zeros(1, 4))
        self.head = nn.Linear(4, 4)
        self.tied = nn.Linear(4, 4)
        self.tied.weight = self.head.weight  # a shared parameter must be optimized once
        self.norm = nn.GroupNorm(2, 4)
        self.ln = nn.LayerNorm(4)
        self.query_embed = nn.Embedding(5, 4)
        self.level_embed = nn.Parameter(torch.zeros(3, 4))
        self.frozen = nn.Linear(2, 2)
        self.frozen.requires_grad_(False)
        self.backbone_like = nn.Linear(2, 2)  # name starts with "backbone" but is not under it


def _cfg(**solver):
    cfg = get_cfg()
    cfg.SOLVER.BASE_LR = 1e-4
    cfg.SOLVER.WEIGHT_DECAY = 0.05
    cfg.SOLVER.WEIGHT_DECAY_NORM = 0.0
    cfg.SOLVER.WEIGHT_DECAY_EMBED = 0.01
    cfg.SOLVER.BACKBONE_MULTIPLIER = 0.1
    cfg.SOLVER.LR_SCHEDULER_NAME = "WarmupPolyLR"  # Mask2Former's ADE20K/Cityscapes schedule
    for k, v in solver.items():
        setattr(cfg.SOLVER, k, v)
    return cfg


def _hyper_by_name(optimizer):
    out = {}
    for group in optimizer.param_groups:
        for name in group["param_names"]:
            assert name not in out, f"{name} is in two groups"
            out[name] = (group["lr"], group["weight_decay"])
    return out


def test_param_groups_follow_mask2former_rules():
    model = ToyModel()
    opt = build_optimizer(_cfg(), model)
    assert isinstance(opt, torch.optim.AdamW)
    h = _hyper_by_name(opt)
    lr, bb_lr = 1e-4, 1e-5
    assert h["backbone.0.weight"] == pytest.approx((bb_lr, 0.05))
    assert h["backbone.0.bias"] == pytest.approx((bb_lr, 0.05))
    assert h["backbone.1.weight"] == pytest.approx((bb_lr, 0.0))  # BatchNorm
    assert h["backbone.2.weight"] == pytest.approx((bb_lr, 0.0))  # FrozenBN by class name
    assert h["backbone.absolute_pos_embed"] == pytest.approx((bb_lr, 0.01))
    assert h["head.weight"] == pytest.approx((lr, 0.05))
    assert h["head.bias"] == pytest.approx((lr, 0.05))
    assert h["norm.weight"] == pytest.approx((lr, 0.0))  # GroupNorm
    assert h["ln.bias"] == pytest.approx((lr, 0.0))  # LayerNorm
    assert h["query_embed.weight"] == pytest.approx((lr, 0.01))  # nn.Embedding
    assert h["level_embed"] == pytest.approx((lr, 0.05))  # bare parameter: normal decay, as the official optimizer
    assert h["backbone_like.weight"] == pytest.approx((lr, 0.05))
    assert "frozen.weight" not in h
    # every trainable parameter once, the tied weight included only under its first owner
    params = [p for g in opt.param_groups for p in g["params"]]
    assert len(params) == len({id(p) for p in params})
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert {id(p) for p in params} == trainable
    assert "tied.weight" not in h and "tied.bias" in h


def test_param_groups_are_merged_and_ordered():
    model = ToyModel()
    groups = get_param_groups(model, 1.0, 0.05, 0.0, 0.01, 0.1)
    keys = [(g["lr"], g["weight_decay"]) for g in groups]
    assert len(keys) == len(set(keys))
    # deterministic order: a second build gives the same names in the same order (resume needs it)
    again = get_param_groups(ToyModel(), 1.0, 0.05, 0.0, 0.01, 0.1)
    assert [g["param_names"] for g in groups] == [g["param_names"] for g in again]


def test_lr_multipliers_by_prefix():
    # the longest prefix wins and multiplies on top of the backbone multiplier
    cfg = _cfg(LR_MULTIPLIERS=[["head.", 10.0], ["backbone.", 2.0], ["backbone.0.", 5.0]])
    h = _hyper_by_name(build_optimizer(cfg, ToyModel()))
    assert h["head.weight"][0] == pytest.approx(1e-3)
    assert h["head.bias"][0] == pytest.approx(1e-3)
    assert h["backbone.0.weight"][0] == pytest.approx(1e-5 * 5.0)
    assert h["backbone.1.weight"][0] == pytest.approx(1e-5 * 2.0)
    assert h["ln.weight"][0] == pytest.approx(1e-4)  # no prefix: unchanged
    assert h["backbone_like.weight"][0] == pytest.approx(1e-4)  # "backbone." does not match it
    # the key exists in the default config and is read from the command-line form
    cfg = get_cfg()
    cfg.merge_from_list(["SOLVER.LR_MULTIPLIERS", "[['head.', 3.0]]"])
    assert cfg.SOLVER.LR_MULTIPLIERS == [["head.", 3.0]]


@pytest.mark.parametrize("pairs, message", [
    ([["hed.", 10.0]], "prefix 'hed.' names no trainable parameter"),
    ([["frozen.", 10.0]], "prefix 'frozen.' names no trainable parameter"),
    ([["head.", 0.0]], "a factor > 0"),
    ([["head."]], "each entry is \\[prefix, factor\\]"),
])
def test_lr_multipliers_refuse_bad_entries(pairs, message):
    with pytest.raises(ValueError, match=message):
        build_optimizer(_cfg(LR_MULTIPLIERS=pairs), ToyModel())


def test_sgd_and_unknown_optimizer():
    opt = build_optimizer(_cfg(OPTIMIZER="SGD", MOMENTUM=0.8), ToyModel())
    assert isinstance(opt, torch.optim.SGD)
    assert opt.defaults["momentum"] == 0.8
    with pytest.raises(ValueError, match="SOLVER.OPTIMIZER 'LAMB'"):
        build_optimizer(_cfg(OPTIMIZER="LAMB"), ToyModel())


def _lrs_over(cfg, iters):
    model = nn.Sequential()
    model.backbone = nn.Linear(2, 2)
    model.head = nn.Linear(2, 2)
    opt = build_optimizer(cfg, model)
    sched = build_lr_scheduler(cfg, opt)
    out = []
    for _ in range(iters):
        out.append([g["lr"] for g in opt.param_groups])
        opt.step()
        sched.step()
    out.append([g["lr"] for g in opt.param_groups])
    return out, opt, sched


def test_warmup_poly_matches_formula():
    max_iter, warm, factor, power, base = 100, 10, 0.1, 0.9, 1e-4
    cfg = _cfg(MAX_ITER=max_iter, WARMUP_ITERS=warm, WARMUP_FACTOR=factor, WARMUP_METHOD="linear",
               POLY_LR_POWER=power, LR_SCHEDULER_NAME="WarmupPolyLR")
    lrs, _, _ = _lrs_over(cfg, max_iter)

    def expected(it):
        w = factor * (1 - it / warm) + it / warm if it < warm else 1.0
        return base * w * (1 - it / max_iter) ** power

    for it in (0, 5, warm, max_iter // 2, max_iter - 1, max_iter):
        backbone_lr, head_lr = lrs[it]
        assert head_lr == pytest.approx(expected(it), rel=1e-9, abs=1e-15), it
        assert backbone_lr == pytest.approx(0.1 * expected(it), rel=1e-9, abs=1e-15), it
    assert lrs[0][1] == pytest.approx(base * factor)
    assert lrs[warm][1] == pytest.approx(base * (1 - warm / max_iter) ** power)
    assert lrs[max_iter][1] == 0.0


def test_warmup_poly_constant_warmup_and_ending():
    cfg = _cfg(MAX_ITER=100, WARMUP_ITERS=10, WARMUP_FACTOR=0.5, WARMUP_METHOD="constant",
               POLY_LR_POWER=1.0, POLY_LR_CONSTANT_ENDING=0.2)
    lrs, _, _ = _lrs_over(cfg, 100)
    assert lrs[3][1] == pytest.approx(1e-4 * 0.5 * (1 - 3 / 100))
    assert lrs[50][1] == pytest.approx(1e-4 * 0.5)
    assert lrs[90][1] == pytest.approx(1e-4 * 0.2)  # (1 - 0.9) < 0.2 -> constant ending
    with pytest.raises(ValueError, match="WARMUP_METHOD"):
        _lrs_over(_cfg(MAX_ITER=10, WARMUP_ITERS=5, WARMUP_METHOD="cubic"), 2)


def test_multistep_and_cosine():
    cfg = _cfg(LR_SCHEDULER_NAME="WarmupMultiStepLR", MAX_ITER=100, STEPS=(50, 80), GAMMA=0.1,
               WARMUP_ITERS=10, WARMUP_FACTOR=0.1)
    lrs, _, _ = _lrs_over(cfg, 100)
    head = [x[1] / 1e-4 for x in lrs]
    assert head[0] == pytest.approx(0.1)
    assert head[5] == pytest.approx(0.1 + 0.9 * 0.5)
    assert head[10] == pytest.approx(1.0) and head[49] == pytest.approx(1.0)
    assert head[50] == pytest.approx(0.1) and head[79] == pytest.approx(0.1)
    assert head[80] == pytest.approx(0.01) and head[99] == pytest.approx(0.01)

    cfg = _cfg(LR_SCHEDULER_NAME="WarmupCosineLR", MAX_ITER=100, WARMUP_ITERS=0, BASE_LR_END=0.0)
    lrs, _, _ = _lrs_over(cfg, 100)
    for it in (0, 25, 50, 99):
        assert lrs[it][1] == pytest.approx(1e-4 * 0.5 * (1 + math.cos(math.pi * it / 100)), abs=1e-12)

    with pytest.raises(ValueError, match="LR_SCHEDULER_NAME 'Nope'"):
        _lrs_over(_cfg(LR_SCHEDULER_NAME="Nope"), 1)


@pytest.mark.parametrize("name", ["WarmupPolyLR", "WarmupMultiStepLR", "WarmupCosineLR"])
def test_scheduler_state_resumes(name):
    cfg = _cfg(LR_SCHEDULER_NAME=name, MAX_ITER=40, STEPS=(20,), WARMUP_ITERS=5, WARMUP_FACTOR=0.1)
    lrs, opt, sched = _lrs_over(cfg, 23)
    state = sched.state_dict()
    assert set(state) <= {"base_lrs", "last_epoch", "_step_count", "_last_lr"}  # position, not shape
    assert state["last_epoch"] == 23
    full, _, _ = _lrs_over(cfg, 30)
    # a fresh optimizer/scheduler restored from the state continues on the same curve
    model = nn.Sequential()
    model.backbone = nn.Linear(2, 2)
    model.head = nn.Linear(2, 2)
    opt2 = build_optimizer(cfg, model)
    sched2 = build_lr_scheduler(cfg, opt2)
    opt2.load_state_dict(opt.state_dict())
    sched2.load_state_dict(state)
    for it in range(23, 30):
        assert [g["lr"] for g in opt2.param_groups] == pytest.approx(full[it])
        opt2.step()
        sched2.step()


def _params_with_grads():
    a = nn.Parameter(torch.zeros(4))
    b = nn.Parameter(torch.zeros(3))
    c = nn.Parameter(torch.zeros(2))  # no gradient: must be skipped
    a.grad = torch.tensor([3.0, 4.0, 0.0, 0.0])  # norm 5
    b.grad = torch.tensor([0.0, 12.0, 0.0])  # norm 12
    return a, b, c


def _clip_cfg(clip_type, value):
    cfg = get_cfg()
    cfg.SOLVER.CLIP_GRADIENTS.ENABLED = True
    cfg.SOLVER.CLIP_GRADIENTS.CLIP_TYPE = clip_type
    cfg.SOLVER.CLIP_GRADIENTS.CLIP_VALUE = value
    cfg.SOLVER.CLIP_GRADIENTS.NORM_TYPE = 2.0
    return cfg


def test_clip_full_model():
    a, b, c = _params_with_grads()
    total = build_gradient_clipper(_clip_cfg("full_model", 1.0))([a, b, c])
    assert float(total) == pytest.approx(13.0)  # sqrt(5^2 + 12^2), before clipping
    new_total = torch.sqrt(a.grad.pow(2).sum() + b.grad.pow(2).sum())
    assert float(new_total) == pytest.approx(1.0, rel=1e-4)
    assert a.grad[0] / a.grad[1] == pytest.approx(0.75)  # direction kept
    assert c.grad is None


def test_clip_per_param_norm_and_value():
    a, b, c = _params_with_grads()
    build_gradient_clipper(_clip_cfg("norm", 6.0))([a, b, c])
    assert float(a.grad.norm()) == pytest.approx(5.0)  # under the limit: untouched
    assert float(b.grad.norm()) == pytest.approx(6.0, rel=1e-4)
    a, b, c = _params_with_grads()
    build_gradient_clipper(_clip_cfg("value", 2.0))([a, b, c])
    assert a.grad.tolist() == [2.0, 2.0, 0.0, 0.0]
    assert b.grad.tolist() == [0.0, 2.0, 0.0]


def test_clip_disabled_and_invalid():
    assert build_gradient_clipper(get_cfg()) is None
    with pytest.raises(ValueError, match="CLIP_TYPE 'all'"):
        build_gradient_clipper(_clip_cfg("all", 1.0))
    with pytest.raises(ValueError, match="CLIP_VALUE"):
        build_gradient_clipper(_clip_cfg("full_model", 0.0))


def test_resume_with_longer_schedule_follows_new_config():
    short = _cfg(MAX_ITER=40, WARMUP_ITERS=0)
    _, opt, sched = _lrs_over(short, 20)
    longer = _cfg(MAX_ITER=80, WARMUP_ITERS=0)
    model = nn.Sequential()
    model.backbone = nn.Linear(2, 2)
    model.head = nn.Linear(2, 2)
    opt2 = build_optimizer(longer, model)
    sched2 = build_lr_scheduler(longer, opt2)
    opt2.load_state_dict(opt.state_dict())
    sched2.load_state_dict(sched.state_dict())
    opt2.step()
    sched2.step()  # iteration 21 of an 80-iteration poly schedule
    assert opt2.param_groups[1]["lr"] == pytest.approx(1e-4 * (1 - 21 / 80) ** 0.9)
