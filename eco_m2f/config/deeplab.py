"""Detectron2's ``add_deeplab_config`` keys, which Mask2Former's ``train_net.py`` adds too.

Their defaults are DeepLab's: a DeepLab stem and res5 multi-grid (which is why every Mask2Former
YAML sets ``STEM_TYPE: basic`` and ``RES5_MULTI_GRID: [1, 1, 1]``), and the DeepLab head's
settings. The ResNet builder rejects the values it cannot build instead of ignoring them; the
head keys are read by no model of the project (as by none of Mask2Former's).
"""
from __future__ import annotations

from .config_node import CfgNode as CN


def add_deeplab_config(cfg: CN) -> None:
    # Crops are re-drawn (up to 10 times) until no class covers this fraction of the labelled
    # pixels: mmseg's cat_max_ratio (0.75 in Segmenter's recipes); 1.0 disables the check.
    cfg.INPUT.CROP.SINGLE_CATEGORY_MAX_AREA = 1.0
    # WarmupPolyLR: lr factor (1 - iter / MAX_ITER) ** POWER, plus CONSTANT_ENDING once it is smaller
    cfg.SOLVER.POLY_LR_POWER = 0.9
    cfg.SOLVER.POLY_LR_CONSTANT_ENDING = 0.0
    # DeepLab head (read by no model here): loss, decoder projection, ASPP
    cfg.MODEL.SEM_SEG_HEAD.LOSS_TYPE = "hard_pixel_mining"
    cfg.MODEL.SEM_SEG_HEAD.PROJECT_FEATURES = ["res2"]
    cfg.MODEL.SEM_SEG_HEAD.PROJECT_CHANNELS = [48]
    cfg.MODEL.SEM_SEG_HEAD.ASPP_CHANNELS = 256
    cfg.MODEL.SEM_SEG_HEAD.ASPP_DILATIONS = [6, 12, 18]
    cfg.MODEL.SEM_SEG_HEAD.ASPP_DROPOUT = 0.1
    cfg.MODEL.SEM_SEG_HEAD.USE_DEPTHWISE_SEPARABLE_CONV = False
    # ResNet: res4 dilation, res5 multi-grid dilations, stem "basic" (7x7) or "deeplab" (3 x 3x3);
    # the project's ResNet builds RES4_DILATION 1, RES5_MULTI_GRID [1, 1, 1] and the basic stem
    cfg.MODEL.RESNETS.RES4_DILATION = 1
    cfg.MODEL.RESNETS.RES5_MULTI_GRID = [1, 2, 4]
    cfg.MODEL.RESNETS.STEM_TYPE = "deeplab"
