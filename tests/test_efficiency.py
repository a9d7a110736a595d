"""The generic efficiency evaluator: whatever cost fields a model emits, aggregated per image."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn as nn

from eco_m2f.config import get_cfg
from eco_m2f.evaluation.efficiency import EfficiencyEvaluator, summarize_costs
from eco_m2f.evaluation.flops import count_flops
from eco_m2f.modeling.meta_arch.base import SegmentationModel

REPO = Path(__file__).resolve().parents[1]


def test_summary_of_every_kind_of_field():
    records = [
        {"gflops": 10.0, "gflops_encoder": 2.0, "exit": 2, "tokens": [4, 2], "keep_ratio": 0.5},
        {"gflops": 20.0, "gflops_encoder": 4.0, "exit": 4, "tokens": [4, 4], "keep_ratio": 1.0},
        {"gflops": 30.0, "gflops_encoder": 6.0, "exit": 4, "tokens": [4, 0]},
    ]
    out = summarize_costs(records)
    assert out == {
        "num_images": 3,
        "gflops": 20.0,
        "gflops_encoder": 4.0,
        "exit_mean": pytest.approx(10 / 3),
        "exit_histogram": {"2": 1, "4": 2},
        "tokens_mean": [4.0, 2.0],
        "keep_ratio_mean": 0.75,  # over the records that have it; floats get no histogram
    }
    assert list(out)[:3] == ["num_images", "gflops", "gflops_encoder"]
    with pytest.raises(ValueError, match="'tokens'.*lengths"):
        summarize_costs([{"tokens": [1, 2]}, {"tokens": [1]}])
    with pytest.raises(ValueError, match="'exit' mixes"):
        summarize_costs([{"exit": 1}, {"exit": [1]}])


class _Pool(SegmentationModel):
    """A conv whose cost record is given in eval outputs; ``network`` is what gets counted."""

    def __init__(self) -> None:
        super().__init__(get_cfg(), size_divisibility=8, tasks={"sem_seg"})
        self.conv = nn.Conv2d(3, 2, 1)

    def network(self, images, cost=None):
        return self.conv(images)

    def flop_scopes(self):
        return {"conv": "conv"}


def test_records_without_gflops_are_counted_on_the_padded_image_and_others_kept():
    model = _Pool()
    evaluator = EfficiencyEvaluator(model)
    evaluator.reset()
    inputs = [{"image": torch.zeros(3, 10, 12, dtype=torch.uint8)}, {"image": torch.zeros(3, 16, 16, dtype=torch.uint8)}]
    evaluator.process(inputs, [{"cost": {"steps": 3}}, {"cost": {"gflops": 1.5, "steps": torch.tensor(5)}}])
    evaluator.process(inputs[:1], [{"sem_seg": torch.zeros(2, 10, 12)}])  # no record: not an image of the cost
    out = evaluator.evaluate()["cost"]
    counted = count_flops(model, torch.zeros(1, 3, 16, 16))["total"]  # 10x12 padded to 16x16
    assert out["num_images"] == 2
    assert out["gflops"] == pytest.approx((counted + 1.5) / 2)
    assert out["gflops_conv"] == pytest.approx(counted)  # only the counted record has the scope
    assert out["steps_histogram"] == {"3": 1, "5": 1}
    assert EfficiencyEvaluator(model).evaluate() == {}


def test_gated_eco_model_is_counted_per_image_along_each_exit():
    from eco_m2f.architectures import build_model
    from eco_m2f.config import setup_cfg

    from conftest import TINY_OPTS

    torch.manual_seed(0)
    cfg = setup_cfg(str(REPO / "configs/synthetic/eco_m2f_tiny_cpu.yaml"), TINY_OPTS + ["MODEL.ECO.GATE.ENABLED", "True"])
    model = build_model(cfg).eval()
    assert model.dynamic_cost
    # the gate sends image 0 to exit 2 and image 1 to exit 5
    inputs = [{"image": torch.full((3, 64, 64), v, dtype=torch.uint8), "height": 64, "width": 64} for v in (0, 255)]
    z = model.gate_input(inputs)
    with torch.no_grad():  # logit of exit 5: -5 for image 0, +5 for image 1; every other logit 0
        model.gate.linear.weight.zero_()
        model.gate.linear.bias.zero_()
        direction = (z[1] - z[0]) / (z[1] - z[0]).norm() ** 2
        row = model.gate.exit_list.index(5)
        model.gate.linear.weight[row] = 10.0 * direction
        model.gate.linear.bias[row] = -10.0 * direction @ (z[0] + z[1]) / 2
    with torch.no_grad():
        outputs = model(inputs)
    assert [o["cost"] for o in outputs] == [{"exit": 2}, {"exit": 5}]
    evaluator = EfficiencyEvaluator(model)
    evaluator.process(inputs, outputs)
    out = evaluator.evaluate()["cost"]
    images = model.preprocess_image(inputs[:1]).tensor
    at = {k: count_flops(model, images, {"exit": k}) for k in (2, 5)}
    assert at[2]["encoder"] < at[5]["encoder"]
    assert out["gflops_encoder"] == pytest.approx((at[2]["encoder"] + at[5]["encoder"]) / 2)
    assert out["gflops"] == pytest.approx((at[2]["total"] + at[5]["total"]) / 2)
    assert out["exit_histogram"] == {"2": 1, "5": 1}
