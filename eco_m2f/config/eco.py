"""ECO-M2F keys (papers/004): encoder exits, weighted stochastic depth, gating network."""
from __future__ import annotations

from .config_node import CfgNode as CN

#: MODEL.ECO.GATE.LOSS's default (step C names its gates' directories after any other loss)
DEFAULT_GATE_LOSS = "hard-CE"


def add_eco_config(cfg: CN) -> None:
    cfg.MODEL.ECO = CN()
    # Step A is on when ENABLED: each image samples a depth K_i from EXITS and every exit
    # k <= K_i adds alpha_k * L_k to the loss.
    cfg.MODEL.ECO.ENABLED = False
    cfg.MODEL.ECO.EXITS = [2, 3, 4, 5, 6]
    # "linear" (alpha_k proportional to k, WSD) or "uniform" (all equal, the USD ablation);
    # or an explicit list of weights, one per exit, strictly increasing.
    cfg.MODEL.ECO.ALPHA = "linear"
    cfg.MODEL.ECO.GATE = CN()
    cfg.MODEL.ECO.GATE.ENABLED = False
    cfg.MODEL.ECO.GATE.WEIGHTS = ""
    # hard-CE (paper default), u-CE, soft-CE, soft-MSE (papers/004 Table T2)
    cfg.MODEL.ECO.GATE.LOSS = DEFAULT_GATE_LOSS
    cfg.MODEL.ECO.GATE.BETA = 0.0005
    cfg.MODEL.ECO.GATE.K_USER = 6
    cfg.MODEL.ECO.GATE.EPOCHS = 50
    cfg.MODEL.ECO.GATE.LR = 1e-3
    cfg.MODEL.ECO.GATE.BATCH_SIZE = 64
    cfg.MODEL.ECO.GATE.VAL_FRACTION = 0.1

    cfg.TEST.ECO = CN()
    # Evaluate every image at this fixed exit (0 = full depth / gate when enabled).
    cfg.TEST.ECO.EXIT = 0
