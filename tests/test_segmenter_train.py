"""Every ViT decode head trains through the train_net.py machinery on the tiny synthetic set.

The runs use configs/synthetic/segmenter_tiny_cpu.yaml with the synthetic panoptic images and
the ``mask_former_semantic`` mapper (which provides ``"sem_seg"``), shrunk to 64 x 64 inputs.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from eco_m2f.engine import default_argument_parser, main

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs/synthetic/segmenter_tiny_cpu.yaml"
ITERS = 16
SMALL = [
    "DATASETS.TRAIN", "('synthetic_panoptic_train',)", "DATASETS.TEST", "()",
    "INPUT.DATASET_MAPPER_NAME", "mask_former_semantic", "MODEL.SEM_SEG_HEAD.NUM_CLASSES", "8",  # the panoptic set's classes
    "INPUT.MIN_SIZE_TRAIN", "(64,)", "INPUT.MIN_SIZE_TRAIN_SAMPLING", "choice", "INPUT.MAX_SIZE_TRAIN", "64",
    "INPUT.CROP.ENABLED", "False", "INPUT.SIZE_DIVISIBILITY", "-1",
    "INPUT.MIN_SIZE_TEST", "64", "INPUT.MAX_SIZE_TEST", "64", "MODEL.VIT.IMG_SIZE", "64",
    "SOLVER.MAX_ITER", str(ITERS), "SOLVER.CHECKPOINT_PERIOD", "1000", "SOLVER.BASE_LR", "0.002", "LOG_PERIOD", "1",
]
HEADS = {
    "SegmenterLinearHead": [],
    "SegmenterMaskTransformerHead": [],
    "SETRNaiveHead": ["MODEL.SEM_SEG_HEAD.SETR.CHANNELS", "32"],
    "SETRPUPHead": ["MODEL.SEM_SEG_HEAD.SETR.CHANNELS", "32", "MODEL.SEM_SEG_HEAD.SETR.NUM_CONVS", "2",
                    "MODEL.SEM_SEG_HEAD.SETR.UP_SCALE", "2", "MODEL.VIT.OUT_INDICES", "[1, 3]",
                    "MODEL.SEM_SEG_HEAD.AUX_LAYERS", "[1]"],
    "ATMHead": ["MODEL.SEM_SEG_HEAD.ATM.HIDDEN_DIM", "32", "MODEL.SEM_SEG_HEAD.ATM.NUM_HEADS", "2",
                "MODEL.SEM_SEG_HEAD.ATM.NUM_LAYERS", "1", "MODEL.VIT.OUT_INDICES", "[1, 3]", "SOLVER.BASE_LR", "0.005"],
}


def _losses(output_dir: Path) -> list:
    rows = [json.loads(line) for line in (output_dir / "metrics.json").read_text().splitlines() if line.strip()]
    return [r for r in rows if "total_loss" in r]


@pytest.mark.parametrize("head", sorted(HEADS))
def test_head_trains_and_its_loss_falls(head, tiny_datasets, tmp_path):
    out = tmp_path / head
    opts = ["--config-file", str(CONFIG), *SMALL, "MODEL.SEM_SEG_HEAD.NAME", head, *HEADS[head], "OUTPUT_DIR", str(out)]
    main(default_argument_parser().parse_args(opts))
    rows = _losses(out)
    assert len(rows) == ITERS
    first = sum(r["total_loss"] for r in rows[:4]) / 4
    last = sum(r["total_loss"] for r in rows[-4:]) / 4
    assert last < 0.9 * first, f"{head}: loss did not fall ({first:.3f} -> {last:.3f})"
    if head == "SETRPUPHead":
        assert "loss_ce_aux1" in rows[-1]
    if head == "ATMHead":
        assert {"loss_ce_0", "loss_mask_0", "loss_dice_0", "loss_mask", "loss_dice"} <= set(rows[-1])
    assert (out / "model_final.pth").is_file()


def test_trained_segmenter_evaluates_mean_iou(tiny_datasets, tmp_path):
    out = tmp_path / "eval"
    opts = ["--config-file", str(CONFIG), *SMALL, "SOLVER.MAX_ITER", "4", "DATASETS.TEST", "('synthetic_panoptic_val',)",
            "TEST.SLIDE.ENABLED", "True", "TEST.SLIDE.CROP_SIZE", "[48, 48]", "TEST.SLIDE.STRIDE", "[32, 32]",
            "OUTPUT_DIR", str(out)]
    results = main(default_argument_parser().parse_args(opts))
    sem = results["synthetic_panoptic_val"]["sem_seg"]
    assert 0.0 <= sem["mIoU"] <= 100.0 and sem["pACC"] > 0
    again = main(default_argument_parser().parse_args(
        ["--eval-only", *opts, "MODEL.WEIGHTS", str(out / "model_final.pth")]))
    assert again["synthetic_panoptic_val"]["sem_seg"]["mIoU"] == pytest.approx(sem["mIoU"])
