"""The one mapping from every meta-architecture the project registers to its tiny CPU config.

``tests/test_registry_contract.py`` fails for a registered architecture missing here: a new
meta-architecture brings a tiny config (a file under ``configs/`` plus overrides that shrink it
further) with which it trains, evaluates, counts its FLOPs and benchmarks in seconds on a CPU.
"""
from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Tuple

from conftest import TINY_OPTS

REPO = Path(__file__).resolve().parents[1]

#: the tiny synthetic panoptic set's semantic maps, through the semantic mapper
SEMANTIC_OPTS = [
    "MODEL.DEVICE", "cpu", "DATALOADER.NUM_WORKERS", "0",
    "DATASETS.TRAIN", "('synthetic_panoptic_train',)", "DATASETS.TEST", "('synthetic_panoptic_val',)",
    "MODEL.SEM_SEG_HEAD.NUM_CLASSES", "8",  # the panoptic set's classes
    "INPUT.DATASET_MAPPER_NAME", "mask_former_semantic", "INPUT.MIN_SIZE_TEST", "64", "INPUT.MAX_SIZE_TEST", "64",
]

#: META_ARCHITECTURE name -> (config file relative to the repository, KEY VALUE overrides)
TINY_CONFIGS: Dict[str, Tuple[str, List[str]]] = {
    "MaskFormer": ("configs/synthetic/maskformer2_tiny_cpu.yaml", TINY_OPTS),
    "ECOMaskFormer": ("configs/synthetic/eco_m2f_tiny_cpu.yaml", TINY_OPTS),
    # the ViT models train on the semantic maps of the tiny synthetic panoptic set
    "Segmenter": ("configs/synthetic/segmenter_tiny_cpu.yaml", SEMANTIC_OPTS + ["INPUT.CROP.SIZE", "(64, 64)"]),
    "TokenSharingPolicy": ("configs/synthetic/cts_policy_tiny_cpu.yaml", SEMANTIC_OPTS + ["INPUT.CROP.SIZE", "(64, 64)"]),
}


def tiny_config_args(name: str) -> Tuple[str, List[str]]:
    """(absolute config path, overrides) of the tiny config of ``name``."""
    path, opts = TINY_CONFIGS[name]
    return str(REPO / path), list(opts)
