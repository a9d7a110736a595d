"""Shared test fixtures: the ../shared reference folder, GPU skipping, and thread limits."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DIR = REPO_ROOT.parent / "shared"

# Two cores on CI: keep torch from oversubscribing them.
torch.set_num_threads(min(2, os.cpu_count() or 1))


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    """../shared beside the repository (reference checkpoints and key lists); skip if absent."""
    if not SHARED_DIR.is_dir():
        pytest.skip(f"{SHARED_DIR} not present")
    return SHARED_DIR


@pytest.fixture(scope="session")
def tiny_synthetic_root(tmp_path_factory) -> Path:
    """A $DETECTRON2_DATASETS folder with a tiny synthetic dataset (8 train / 4 val, 64x64)."""
    from eco_m2f.data.datasets.synthetic import generate_synthetic_dataset

    root = tmp_path_factory.mktemp("datasets")
    generate_synthetic_dataset(str(root / "synthetic"), num_train=8, num_val=4, image_size=64, seed=0)
    return root


@pytest.fixture
def tiny_datasets(tiny_synthetic_root, monkeypatch) -> Path:
    """Point $DETECTRON2_DATASETS at the tiny synthetic dataset for one test."""
    monkeypatch.setenv("DETECTRON2_DATASETS", str(tiny_synthetic_root))
    return tiny_synthetic_root


TINY_OPTS = [
    "MODEL.DEVICE", "cpu",
    "MODEL.RESNETS.NORM", "FrozenBN",
    "INPUT.IMAGE_SIZE", "64", "INPUT.MIN_SIZE_TEST", "64", "INPUT.MAX_SIZE_TEST", "64",
    "DATALOADER.NUM_WORKERS", "0",
    "MODEL.MASK_FORMER.TRAIN_NUM_POINTS", "256",
    "MODEL.MASK_FORMER.NUM_OBJECT_QUERIES", "8",
]
"""Overrides that shrink configs/synthetic/maskformer2_tiny_cpu.yaml further for unit tests."""


@pytest.fixture
def same_points_per_item(monkeypatch):
    """``torch.rand`` gives every item of the leading axis the same fixed values (the values
    depend only on the trailing shape), so the matcher and the criterion sample the same points
    for a mask whether it is scored alone or in a larger batch."""
    real_rand = torch.rand

    def rand(*size, generator=None, **kw):
        shape = tuple(size[0]) if len(size) == 1 and isinstance(size[0], (tuple, list, torch.Size)) else size
        g = torch.Generator().manual_seed(hash(shape[1:]) % 2**31)
        values = real_rand(shape[1:], generator=g).to(**{k: v for k, v in kw.items() if k in ("device", "dtype")})
        return values.expand(shape).clone()

    monkeypatch.setattr(torch, "rand", rand)
