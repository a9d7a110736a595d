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

#: META_ARCHITECTURE name -> (config file relative to the repository, KEY VALUE overrides)
TINY_CONFIGS: Dict[str, Tuple[str, List[str]]] = {
    "MaskFormer": ("configs/synthetic/maskformer2_tiny_cpu.yaml", TINY_OPTS),
    "ECOMaskFormer": ("configs/synthetic/eco_m2f_tiny_cpu.yaml", TINY_OPTS),
}


def tiny_config_args(name: str) -> Tuple[str, List[str]]:
    """(absolute config path, overrides) of the tiny config of ``name``."""
    path, opts = TINY_CONFIGS[name]
    return str(REPO / path), list(opts)
