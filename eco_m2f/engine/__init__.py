"""Training and evaluation engine: Lightning Trainer around any registered model.

``train_net.py`` is ``main(default_argument_parser().parse_args())``.
"""
from __future__ import annotations

from .launch import default_argument_parser, default_setup, evaluate_in_process, launch, main, setup_distributed_env

__all__ = [
    "default_argument_parser",
    "default_setup",
    "evaluate_in_process",
    "launch",
    "main",
    "setup_distributed_env",
    "SegmentationModule",
    "build_trainer",
    "train",
    "do_test",
]


def __getattr__(name: str):
    # Lightning and the model/data packages load only when training or evaluation is asked for.
    if name == "SegmentationModule":
        from .lightning_module import SegmentationModule

        return SegmentationModule
    if name in ("build_trainer", "train"):
        from . import trainer

        return getattr(trainer, name)
    if name == "do_test":
        from ..evaluation.testing import do_test

        return do_test
    raise AttributeError(f"module 'eco_m2f.engine' has no attribute '{name}'")
