"""Keys of PAUMER, patch pausing in the Segmenter (``MODEL.TOKEN_REDUCTION.NAME: "PAUMER"``; papers/000)."""
from __future__ import annotations

from .config_node import CfgNode as CN


def add_paumer_config(cfg: CN) -> None:
    p = cfg.MODEL.TOKEN_REDUCTION.PAUMER = CN()
    # Layers after which tokens pause, numbered as in the paper (layer l = the l-th of the ViT's
    # blocks, 1-based; tokens pause after it, i.e. after 0-based block l - 1 of MODEL.VIT). Each
    # gets an auxiliary linear classifier. The paper's configurations: (3,), (3, 5), (3, 5, 7),
    # (4, 7, 10) for 12-layer ViTs.
    p.PAUSE_LAYERS = [3, 5, 7]
    # Inference pause ratio tau of each pause layer (one value: the same at every layer). An
    # image with N live patch tokens there keeps the N - int(tau * N) of highest entropy and
    # pauses the rest; 0 pauses nothing at that layer (its classifier is then not run).
    p.PAUSE_RATIOS = [0.4]
    # Training: tau ~ U(low, high), drawn independently at every pause layer and step.
    p.TRAIN_RATIO_RANGE = [0.2, 0.8]
    # Weight (lambda) of each auxiliary classifier's cross-entropy loss.
    p.AUX_LOSS_WEIGHT = 0.1
    # A LayerNorm before each auxiliary classifier (the paper's classifiers are linear only).
    p.AUX_NORM = False
    # Early exit (papers/000 Appendix I): paused tokens take their auxiliary classifier's
    # prediction. Token-wise heads then decode only the tokens that reached the last block;
    # grid heads (SETR) decode the full grid and the paused cells' logits are replaced.
    p.EARLY_EXIT = False
