"""SegmentationModel as the contract: builder, tasks -> evaluators, the training hook, extra weights."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import dummy_arch  # noqa: E402
from eco_m2f.architectures import build_model  # noqa: E402
from eco_m2f.config import get_cfg, setup_cfg  # noqa: E402
from eco_m2f.modeling.meta_arch.base import SegmentationModel  # noqa: E402
from tiny_configs import tiny_config_args  # noqa: E402


@pytest.mark.parametrize("key, value", [("MODEL.ECO.ENABLED", "True"), ("MODEL.ECO.GATE.ENABLED", "True"),
                                        ("TEST.ECO.EXIT", "3")])
def test_plain_mask2former_rejects_eco_keys_naming_the_eco_architecture(key, value):
    config, opts = tiny_config_args("MaskFormer")
    with pytest.raises(ValueError, match=rf"{key} {value}.*ECOMaskFormer"):
        build_model(setup_cfg(config, opts + [key, value]))


def test_builder_places_the_model_and_checks_the_contract(monkeypatch):
    config, opts = tiny_config_args("MaskFormer")
    model = build_model(setup_cfg(config, opts))
    assert isinstance(model, SegmentationModel) and model.device == torch.device("cpu")
    assert model.tasks == {"sem_seg", "panoptic_seg", "instances"}
    with pytest.raises(ValueError, match="MODEL.DEVICE 'tpu'"):
        build_model(setup_cfg(config, opts + ["MODEL.DEVICE", "tpu"]))
    with pytest.raises(ValueError, match="no output"):
        build_model(setup_cfg(config, opts + ["MODEL.MASK_FORMER.TEST.SEMANTIC_ON", "False",
                                              "MODEL.MASK_FORMER.TEST.PANOPTIC_ON", "False",
                                              "MODEL.MASK_FORMER.TEST.INSTANCE_ON", "False"]))
    with pytest.raises(ValueError, match="unknown tasks"):
        SegmentationModel(get_cfg(), size_divisibility=0, tasks={"depth"})


def test_gate_weights_are_read_by_the_builder_not_the_constructor(tmp_path):
    from eco_m2f.checkpoint import load_weights, save_checkpoint
    from eco_m2f.eco.gate import ExitGate
    from eco_m2f.eco.meta_arch import ECOMaskFormer

    config, opts = tiny_config_args("ECOMaskFormer")
    missing = opts + ["MODEL.ECO.GATE.ENABLED", "True", "MODEL.ECO.GATE.WEIGHTS", str(tmp_path / "nope.pth")]
    ECOMaskFormer(setup_cfg(config, missing))  # names the file, reads nothing
    with pytest.raises(FileNotFoundError):
        build_model(setup_cfg(config, missing))

    gate = ExitGate(64, [2, 3, 4, 5, 6])
    torch.save({"gate": gate.state_dict(), "exits": [2, 3, 4, 5, 6]}, tmp_path / "gate.pth")
    cfg = setup_cfg(config, opts + ["MODEL.ECO.GATE.ENABLED", "True", "MODEL.ECO.GATE.WEIGHTS", str(tmp_path / "gate.pth")])
    model = build_model(cfg)
    assert torch.equal(model.gate.linear.weight, gate.linear.weight)
    assert model.keys_loaded_elsewhere() == {"gate.linear.weight", "gate.linear.bias", "gate.exits"}
    # a step-A checkpoint (no gate) loads strictly on top: the gate came from its own file
    weights = {k: v for k, v in model.state_dict().items() if not k.startswith("gate.")}
    save_checkpoint(tmp_path / "step_a.pth", weights)
    report = load_weights(model, str(tmp_path / "step_a.pth"))
    assert not report.missing and torch.equal(model.gate.linear.weight, gate.linear.weight)


class _Recorder(dummy_arch.DummySegmenter):
    """The dummy model, recording the iterations the engine announces."""

    def __init__(self, cfg) -> None:
        super().__init__(cfg)
        self.announced = []

    def on_train_iteration(self, iteration: int, max_iter: int) -> None:
        self.announced.append((iteration, max_iter))


def test_engine_calls_the_iteration_hook_before_every_step(tmp_path):
    from eco_m2f.engine.trainer import train

    opts = dummy_arch.test_config_opts(str(tmp_path)) + ["SOLVER.MAX_ITER", "4", "SOLVER.CHECKPOINT_PERIOD", "0"]
    cfg = setup_cfg(None, opts)
    model = _Recorder(cfg)
    train(cfg, argparse.Namespace(num_gpus=1, num_machines=1, resume=False), model=model,
          train_loader_factory=dummy_arch.dummy_train_loader)
    assert model.announced == [(i, 4) for i in range(4)]


def test_evaluators_follow_the_model_tasks(tiny_datasets, tmp_path):
    from eco_m2f.data import MetadataCatalog  # noqa: F401  (registers the synthetic datasets)
    from eco_m2f.evaluation import build_evaluators

    cfg = get_cfg()

    def kinds(*tasks):
        return [type(e).__name__ for e in build_evaluators(cfg, "synthetic_panoptic_val", tmp_path, tasks)]

    assert kinds("sem_seg") == ["SemSegEvaluator"]  # a semantic-only segmenter on the panoptic set
    assert kinds("panoptic_seg") == ["COCOPanopticEvaluator"]
    assert kinds("panoptic_seg", "sem_seg", "instances") == ["COCOPanopticEvaluator", "COCOEvaluator", "SemSegEvaluator"]
    with pytest.raises(NotImplementedError, match="coco_panoptic_seg"):
        kinds()
