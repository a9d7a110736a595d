"""Keys of CTS and dCTS, token sharing in the Segmenter (``MODEL.TOKEN_REDUCTION.NAME: "CTS"`` /
``"DCTS"``; papers/002 and 003), and of the policy network they hold."""
from __future__ import annotations

from .config_node import CfgNode as CN


def add_token_sharing_config(cfg: CN) -> None:
    # The frozen policy network inside a CTS / dCTS Segmenter is built from this config (its
    # backbone POLICY_BACKBONE from MODEL.EFFICIENTNET.* or MODEL.POLICY_CNN.*, its heads from
    # MODEL.POLICY.IN_FEATURE / WINDOW_SIZES) and the normalisation below;
    # MODEL.TOKEN_SHARING.POLICY_WEIGHTS fills it after construction, and POLICY_CONFIG (when
    # set) is checked against it.
    ts = cfg.MODEL.TOKEN_SHARING
    # The policy's backbone: "build_efficientnet_backbone" (EfficientNet-Lite0, the default
    # policy) or "build_policy_cnn_backbone" (papers/002's small policy network).
    ts.POLICY_BACKBONE = "build_efficientnet_backbone"
    # The policy's own pixel mean / std (0-255 RGB): the Segmenter's batch is converted to them.
    # TensorFlow's EfficientNet-Lite normalisation, as in the policy configs.
    ts.POLICY_PIXEL_MEAN = [127.0, 127.0, 127.0]
    ts.POLICY_PIXEL_STD = [128.0, 128.0, 128.0]
    # CUDA fp16/bf16 inference: also compile the folded policy (torch.compile) before its CUDA
    # graph is captured (eco_m2f/modeling/policy/inference.py); the first batch of each input
    # shape then takes the compilation's time.
    ts.COMPILE_POLICY = False

    c = cfg.MODEL.TOKEN_REDUCTION.CTS = CN()
    # "fixed": the NUM_SHARED highest-scoring 2x2 superpatches of every image share one token
    # each; "threshold": the dynamic variant, every superpatch scoring >= THRESHOLD (S per image).
    c.MODE = "fixed"
    # S, superpatches shared per image (papers/002: ADE20K 103 of 256 at 512 crops, Cityscapes
    # 336 of 576 at 768). 0 shares nothing (the dense Segmenter; the policy does not run).
    c.NUM_SHARED = 103
    # The superpatches of the crop NUM_SHARED refers to (256 for 512 x 512): inputs of another
    # size share round(NUM_SHARED x their superpatches / NUM_SHARED_OF). 0: NUM_SHARED as is
    # (at most all superpatches).
    c.NUM_SHARED_OF = 256
    # "threshold" mode: the policy score (P(one class)) at or above which a superpatch is
    # shared; above 1 shares nothing.
    c.THRESHOLD = 0.5

    d = cfg.MODEL.TOKEN_REDUCTION.DCTS = CN()
    # Window sides in patches, ascending powers of two from 2 (papers/003: 2, 4, 8, 16); each
    # must be one of MODEL.POLICY.WINDOW_SIZES (the policy scores it).
    d.WINDOW_SIZES = [2, 4, 8, 16]
    # A named threshold setting of papers/003: "tau-6899" (0.6 / 0.8 / 0.9 / 0.9 for 2 / 4 / 8 /
    # 16) or "tau-4999" (0.4 / 0.9 / 0.9 / 0.9); "" = THRESHOLDS.
    d.SETTING = "tau-6899"
    # One threshold per window size (used when SETTING is ""): a window is shared when its
    # score is >= its threshold and no larger window covers any of its cells. Above 1: never.
    d.THRESHOLDS = []
