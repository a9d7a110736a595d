"""FLOP counting: attention handles, Detectron2's ignore list, uncounted operators, per-image counts."""
from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from fvcore.nn import FlopCountAnalysis
from torchvision.ops import FrozenBatchNorm2d

from eco_m2f.config import get_cfg
from eco_m2f.evaluation import flops
from eco_m2f.evaluation.flop_handles import ATTENTION_FLOP_HANDLES
from eco_m2f.evaluation.flops import FlopCounter, count_flops, flop_report
from eco_m2f.modeling.meta_arch.base import SegmentationModel

REPO = Path(__file__).resolve().parents[1]


def _fvcore(module: nn.Module, *inputs: torch.Tensor) -> int:
    with torch.no_grad():
        analysis = FlopCountAnalysis(module.eval(), inputs).set_op_handle(**ATTENTION_FLOP_HANDLES)
        analysis.unsupported_ops_warnings(False)
        analysis.uncalled_modules_warnings(False)
        return analysis.total()


class _Attention(nn.Module):
    """Attention written three ways: SDPA, explicit matmuls (fvcore counts these itself), or via MHA."""

    def __init__(self, how: str) -> None:
        super().__init__()
        self.how = how

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        if self.how == "sdpa":
            return F.scaled_dot_product_attention(q, k, v)
        weights = (q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5).softmax(-1)
        return weights @ v


def test_sdpa_counts_both_matrix_products_as_explicit_matmuls_do():
    q, k, v = torch.randn(2, 3, 5, 8), torch.randn(2, 3, 7, 8), torch.randn(2, 3, 7, 4)
    sdpa = _fvcore(_Attention("sdpa"), q, k, v)
    assert sdpa == 2 * 3 * 5 * 7 * (8 + 4)
    assert sdpa == _fvcore(_Attention("matmul"), q, k, v)


class _MHA(nn.Module):
    def __init__(self, batch_first: bool) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.mha = nn.MultiheadAttention(16, 4, batch_first=batch_first)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mha(x, x, x)[0]


def test_multihead_attention_fused_path_counts_as_its_unfused_path():
    x = torch.randn(2, 5, 16)
    fused = _MHA(batch_first=True)
    with torch.no_grad():  # self-attention, eval, no grad, batch_first: the fused inference kernel
        graph = torch.jit.trace(fused.eval(), (x,)).inlined_graph
    assert "aten::_native_multi_head_attention" in str(graph)
    unfused = _MHA(batch_first=False)  # sequence-first: projections, bmm, softmax, bmm, projection
    b, length, e = 2, 5, 16
    expected = 4 * b * length * e * e + 2 * b * length * length * e
    assert _fvcore(fused, x) == expected
    assert _fvcore(unfused, x.transpose(0, 1)) == expected


class _Toy(SegmentationModel):
    """conv -> FrozenBN -> (optionally) an operator fvcore has no handle for; 'head' is a scope."""

    def __init__(self, extra_op: bool = False, dynamic: bool = False) -> None:
        cfg = get_cfg()
        super().__init__(cfg, size_divisibility=0, tasks={"sem_seg"})
        self.head = nn.Conv2d(3, 4, 3, padding=1, bias=False)
        self.norm = FrozenBatchNorm2d(4)
        self.extra_op = extra_op
        self.dynamic = dynamic

    def network(self, images, cost=None):
        x = self.norm(self.head(images))
        if self.extra_op:
            x = torch.lgamma(x.abs() + 1)
        repeats = int(cost.get("repeats", 1)) if cost else 1
        for _ in range(repeats - 1):
            x = self.head(x[:, :3])
        return x

    def flop_scopes(self):
        return {"head": "head"}

    @property
    def dynamic_cost(self):
        return self.dynamic

    def cost_signature(self, cost):
        return cost.get("repeats")


def test_frozen_bn_counts_zero_as_in_detectron2_and_ignored_ops_are_listed():
    model = _Toy()
    report = flop_report(model, torch.zeros(2, 3, 8, 8))
    conv = 8 * 8 * 4 * 3 * 9  # per image
    assert report.gflops == {"total": conv / 1e9, "head": conv / 1e9}
    assert set(report.by_operator) == {"conv"}
    assert report.ignored["aten::mul"] >= 1 and report.ignored["aten::add"] >= 1  # FrozenBN's x * scale + bias
    assert "aten::rsqrt" in report.uncounted  # not in Detectron2's list: reported, not silenced


def test_uncounted_operator_is_reported_once_by_name(caplog):
    flops._REPORTED.discard("aten::lgamma")
    model = _Toy(extra_op=True)
    with caplog.at_level(logging.WARNING, logger="eco_m2f.evaluation.flops"):
        count_flops(model, torch.zeros(1, 3, 8, 8))
        count_flops(model, torch.zeros(1, 3, 16, 16))
    warnings = [r.getMessage() for r in caplog.records if "aten::lgamma" in r.getMessage()]
    assert len(warnings) == 1 and "_Toy" in warnings[0] and "counted as 0" in warnings[0]


def test_scopes_must_name_submodules():
    model = _Toy()
    model.flop_scopes = lambda: {"encoder": "no.such.module"}
    with pytest.raises(ValueError, match="no.such.module"):
        count_flops(model, torch.zeros(1, 3, 8, 8))


def test_counter_caches_by_size_and_signature_but_not_for_dynamic_models(monkeypatch):
    calls = []
    real = flops.count_flops
    monkeypatch.setattr(flops, "count_flops", lambda m, x, c=None: calls.append(c) or real(m, x, c))
    image = torch.zeros(1, 3, 8, 8)

    static = FlopCounter(_Toy())
    one, again = static.for_image(image, {}), static.for_image(image, {})
    assert one == again and len(calls) == 1
    two = static.for_image(image, {"repeats": 2})  # another signature: another path
    assert two["total"] > one["total"] and len(calls) == 2
    static.for_image(torch.zeros(1, 3, 16, 8), {})  # another size
    assert len(calls) == 3

    calls.clear()
    dynamic = FlopCounter(_Toy(dynamic=True))
    dynamic.for_image(image, {})  # no signature: the path depends on the image
    dynamic.for_image(image, {})
    assert len(calls) == 2
    dynamic.for_image(image, {"repeats": 3})
    dynamic.for_image(image, {"repeats": 3})
    assert len(calls) == 3
    with pytest.raises(ValueError, match="one image"):
        dynamic.for_image(torch.zeros(2, 3, 8, 8))


def test_tiny_mask2former_counts_attention_and_deformable_attention():
    from eco_m2f.architectures import build_model
    from eco_m2f.config import setup_cfg

    from conftest import TINY_OPTS

    model = build_model(setup_cfg(str(REPO / "configs/synthetic/maskformer2_tiny_cpu.yaml"), TINY_OPTS))
    report = flop_report(model, torch.zeros(1, 3, 64, 64))
    assert set(report.gflops) == {"total", "encoder"}
    assert 0 < report.gflops["encoder"] < report.gflops["total"]
    for op in ("conv", "linear", "einsum", "ms_deform_attn", "scaled_dot_product_attention", "bmm"):
        assert report.by_operator[op] > 0, op
    assert "aten::scaled_dot_product_attention" not in report.uncounted
