"""The ViT segmenters' recipes in eco_m2f.solver: poly to a minimum lr, head multiplier, layer decay."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn as nn

from eco_m2f.config import setup_cfg
from eco_m2f.architectures import build_model
from eco_m2f.solver import build_lr_scheduler, build_optimizer

REPO = Path(__file__).resolve().parents[1]
TINY = [
    "MODEL.DEVICE", "cpu", "MODEL.VIT.IMG_SIZE", "32", "MODEL.VIT.EMBED_DIM", "32", "MODEL.VIT.DEPTH", "3",
    "MODEL.VIT.NUM_HEADS", "2", "MODEL.SEM_SEG_HEAD.NUM_CLASSES", "4",
]


def _groups_by_name(optimizer: torch.optim.Optimizer) -> dict:
    return {n: (g["lr"], g["weight_decay"]) for g in optimizer.param_groups for n in g["param_names"]}


def test_segmenter_recipe_is_sgd_with_poly_to_the_minimum_lr():
    cfg = setup_cfg(str(REPO / "configs/ade20k/semantic-segmentation/segmenter/segmenter_vit_tiny_mask_bs8_160k.yaml"),
                    TINY + ["SOLVER.MAX_ITER", "100"])
    model = build_model(cfg)
    opt = build_optimizer(cfg, model)
    assert isinstance(opt, torch.optim.SGD) and opt.defaults["momentum"] == 0.9
    assert {g["lr"] for g in opt.param_groups} == {1e-3} and {g["weight_decay"] for g in opt.param_groups} == {0.0}
    sched = build_lr_scheduler(cfg, opt)
    seen = []
    for it in range(100):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    for it in (0, 1, 50, 99):  # Segmenter: (base - min) * (1 - it / max) ** 0.9 + min, no warm-up
        assert seen[it] == pytest.approx((1e-3 - 1e-5) * (1 - it / 100) ** 0.9 + 1e-5)


def test_segvit_recipe_head_lr_x10_no_decay_on_norms_and_embeddings_and_warmup():
    cfg = setup_cfg(str(REPO / "configs/ade20k/semantic-segmentation/segvit/segvit_vit_base_atm_bs16_160k.yaml"),
                    TINY + ["MODEL.VIT.OUT_INDICES", "[1, 2]", "MODEL.SEM_SEG_HEAD.ATM.HIDDEN_DIM", "16",
                            "MODEL.SEM_SEG_HEAD.ATM.NUM_HEADS", "2", "SOLVER.MAX_ITER", "3000"])
    model = build_model(cfg)
    opt = build_optimizer(cfg, model)
    assert isinstance(opt, torch.optim.AdamW)
    groups = _groups_by_name(opt)
    assert groups["backbone.blocks.0.attn.qkv.weight"] == pytest.approx((2e-5, 0.01))
    assert groups["sem_seg_head.class_embed.weight"] == pytest.approx((2e-4, 0.01))
    for name in ("backbone.pos_embed", "backbone.cls_token", "backbone.blocks.0.norm1.weight", "sem_seg_head.q.weight",
                 "sem_seg_head.proj_norm.0.weight"):
        assert groups[name][1] == 0.0, name
    sched = build_lr_scheduler(cfg, opt)
    head = next(g for g in opt.param_groups if "sem_seg_head.class_embed.weight" in g["param_names"])
    assert head["lr"] == pytest.approx(2e-4 * 1e-6)  # linear warm-up from 1e-6 of the rate
    for _ in range(1500):
        opt.step()
        sched.step()
    assert head["lr"] == pytest.approx(2e-4 * (1 - 1500 / 3000))  # then poly 1.0 to 0


def test_layer_wise_lr_decay_of_the_vit():
    cfg = setup_cfg(None, TINY + ["MODEL.META_ARCHITECTURE", "Segmenter", "MODEL.BACKBONE.NAME", "build_vit_backbone",
                                  "MODEL.SEM_SEG_HEAD.NAME", "SegmenterLinearHead", "SOLVER.LAYER_DECAY", "0.5",
                                  "SOLVER.BASE_LR", "1.0", "SOLVER.BACKBONE_MULTIPLIER", "1.0"])
    groups = _groups_by_name(build_optimizer(cfg, build_model(cfg)))
    assert groups["backbone.patch_embed.proj.weight"][0] == pytest.approx(0.5**4)
    assert groups["backbone.pos_embed"][0] == pytest.approx(0.5**4)
    for i in range(3):
        assert groups[f"backbone.blocks.{i}.mlp.fc1.weight"][0] == pytest.approx(0.5 ** (3 - i))
    assert groups["backbone.norm.weight"][0] == 1.0 and groups["sem_seg_head.head.weight"][0] == 1.0


def test_layer_decay_needs_a_vit():
    class NoLayers(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.backbone = nn.Linear(2, 2)

    cfg = setup_cfg(None, ["SOLVER.LAYER_DECAY", "0.9"])
    with pytest.raises(ValueError, match="SOLVER.LAYER_DECAY 0.9 needs a backbone with per-layer ids"):
        build_optimizer(cfg, NoLayers())
    with pytest.raises(ValueError, match=r"SOLVER.LAYER_DECAY must be in \(0, 1\]"):
        build_optimizer(setup_cfg(None, ["SOLVER.LAYER_DECAY", "1.5"]), NoLayers())
