"""A tiny meta-architecture and in-memory data for engine tests; also runnable as a trainer script.

``python tests/dummy_arch.py [train_net.py flags]`` registers the dummy architectures and runs the
engine's ``main`` (subprocess tests: kill/resume, multi-process DDP on CPU). Lightning's DDP
launcher re-runs this same script for the other ranks, so it must stay a script, not ``python -c``.

Task: pixels with red 200 are class 1, red 50 class 0, other channels noise (a 1x1 conv can learn it).
"""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Any, Dict, Iterator, List

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from eco_m2f.modeling.meta_arch.base import SegmentationModel  # noqa: E402
from eco_m2f.modeling.registry import META_ARCH_REGISTRY  # noqa: E402

# Seconds to sleep per training step (lets the kill/resume test stop a run mid-way).
STEP_SLEEP_ENV = "ECO_M2F_TEST_STEP_SLEEP"
# Seconds a loader worker sleeps per batch (the main process then waits for data most of the time).
LOAD_SLEEP_ENV = "ECO_M2F_TEST_LOAD_SLEEP"
# Seconds the train loader takes to build (a dataset being loaded or generated); it says so first.
SETUP_SLEEP_ENV = "ECO_M2F_TEST_SETUP_SLEEP"
SETUP_SLEEP_MESSAGE = "dummy train loader: building"


class DummySegmenter(SegmentationModel):
    """backbone (conv + GroupNorm) -> 1x1 classifier; training returns {"loss_ce"}, eval sem_seg."""

    find_unused_parameters = False

    def __init__(self, cfg) -> None:
        super().__init__(cfg, size_divisibility=0, tasks={"sem_seg"})
        num_classes = cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES
        self.backbone = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.GroupNorm(2, 8), nn.ReLU())
        self.extra = nn.Conv2d(8, 8, 1)  # used by the "skip" variant only on some steps
        self.predictor = nn.Conv2d(8, num_classes, 1)
        self.query_embed = nn.Embedding(4, 8)  # an embedding, for the optimizer groups
        self.ignore_value = cfg.MODEL.SEM_SEG_HEAD.IGNORE_VALUE
        self.sleep = float(os.environ.get(STEP_SLEEP_ENV, "0") or 0)
        self._calls = 0

    def _use_extra(self) -> bool:
        return True

    def forward(self, batched_inputs: List[Dict[str, Any]]):
        images = torch.stack([x["image"] for x in batched_inputs]).to(self.device).float() / 255.0
        feats = self.backbone(images)
        self._calls += 1
        if self._use_extra():
            feats = feats + self.extra(feats)
        feats = feats + 0.0 * self.query_embed.weight.sum()
        logits = self.predictor(feats)  # B x C x H x W
        if self.training:
            if self.sleep:
                time.sleep(self.sleep)
            target = torch.stack([x["sem_seg"] for x in batched_inputs]).to(self.device)
            return {"loss_ce": F.cross_entropy(logits, target, ignore_index=self.ignore_value)}
        outputs = []
        for logit, x in zip(logits, batched_inputs):
            h, w = int(x.get("height", logit.shape[-2])), int(x.get("width", logit.shape[-1]))
            up = F.interpolate(logit[None], size=(h, w), mode="bilinear", align_corners=False)[0]
            outputs.append({"sem_seg": up.softmax(0)})
        return outputs


class DummySegmenterSkip(DummySegmenter):
    """Skips ``extra`` on every other step: DDP must be told about parameters without gradient."""

    find_unused_parameters = True

    def _use_extra(self) -> bool:
        return self._calls % 2 == 0


for _cls in (DummySegmenter, DummySegmenterSkip):
    if _cls.__name__ not in META_ARCH_REGISTRY:
        META_ARCH_REGISTRY.register(_cls)


def make_sample(gen: torch.Generator, size: int = 16) -> Dict[str, Any]:
    sem_seg = (torch.rand(size, size, generator=gen) > 0.5).long()
    image = torch.randint(0, 32, (3, size, size), generator=gen, dtype=torch.uint8)
    image[0] = (50 + 150 * sem_seg).to(torch.uint8)  # red 200 on class 1, 50 on class 0
    return {"image": image, "sem_seg": sem_seg, "height": size, "width": size, "file_name": "", "image_id": 0}


class _Batches(torch.utils.data.IterableDataset):
    """Infinite batches of ``per_rank`` samples from a seeded generator (one per worker)."""

    def __init__(self, per_rank: int, seed: int) -> None:
        self.per_rank, self.seed = per_rank, seed

    def __iter__(self) -> Iterator[List[Dict[str, Any]]]:
        info = torch.utils.data.get_worker_info()
        gen = torch.Generator().manual_seed(self.seed + (info.id if info is not None else 0))
        sleep = float(os.environ.get(LOAD_SLEEP_ENV, "0") or 0)
        while True:
            time.sleep(sleep)
            yield [make_sample(gen) for _ in range(self.per_rank)]


def dummy_train_loader(cfg) -> Iterator[List[Dict[str, Any]]]:
    """Infinite batches of SOLVER.IMS_PER_BATCH / world size in-memory samples, seeded per rank;
    made in DATALOADER.NUM_WORKERS worker processes when it is > 0 (as the real loader does)."""
    rank = world = 0
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    per_rank = max(1, cfg.SOLVER.IMS_PER_BATCH // max(world, 1))
    batches = _Batches(per_rank, 1234 + rank)
    setup_sleep = float(os.environ.get(SETUP_SLEEP_ENV, "0") or 0)
    if setup_sleep > 0:
        print(SETUP_SLEEP_MESSAGE, flush=True)
        time.sleep(setup_sleep)
    if cfg.DATALOADER.NUM_WORKERS > 0:
        return iter(torch.utils.data.DataLoader(batches, batch_size=None, num_workers=cfg.DATALOADER.NUM_WORKERS))
    return iter(batches)


def test_config_opts(output_dir: str) -> List[str]:
    """Config overrides for a fast CPU run of the dummy model."""
    return [
        "MODEL.META_ARCHITECTURE", "DummySegmenter",
        "MODEL.DEVICE", "cpu",
        "MODEL.SEM_SEG_HEAD.NUM_CLASSES", "2",
        "SOLVER.LR_SCHEDULER_NAME", "WarmupPolyLR",
        "DATASETS.TEST", "()",
        "SOLVER.IMS_PER_BATCH", "4",
        "SOLVER.BASE_LR", "0.05",
        "SOLVER.WARMUP_ITERS", "2",
        "SOLVER.MAX_ITER", "30",
        "SOLVER.CHECKPOINT_PERIOD", "10",
        "DATALOADER.NUM_WORKERS", "0",
        "LOG_PERIOD", "1",
        "SEED", "7",
        "OUTPUT_DIR", output_dir,
    ]


if __name__ == "__main__":
    from eco_m2f.engine import default_argument_parser, main

    main(default_argument_parser().parse_args(), train_loader_factory=dummy_train_loader)
