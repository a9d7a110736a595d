"""Keys of DToP, dynamic token pruning (``MODEL.TOKEN_REDUCTION.NAME: "DTOP"``; as used in papers/003)."""
from __future__ import annotations

from .config_node import CfgNode as CN


def add_dtop_config(cfg: CN) -> None:
    d = cfg.MODEL.TOKEN_REDUCTION.DTOP = CN()
    # Layers after which an auxiliary head prunes, numbered as the papers number them: layer l is
    # the l-th of the ViT's blocks (1-based), and pruning "at layer l" acts on its output (0-based
    # block l - 1 of MODEL.VIT). DToP: [6, 8] for ViT-B, [8, 16] for ViT-L; STEP@[18] and
    # STEP@[8,16] on ViT-L.
    d.PRUNE_LAYERS = [6, 8]
    # Confidence threshold theta: a live token whose auxiliary head's top class score exceeds it
    # is finalised with that head's prediction and leaves the sequence. 0.9 ADE20K, 0.95
    # COCO-Stuff (papers/003); 1.0 or more prunes nothing (the dense model, exactly).
    d.THETA = 0.9
    # k: in every image the k most confident live tokens of each predicted class stay, however
    # confident, so that later layers still see every class (DToP: 5). 0 = no exception.
    d.TOP_K_PER_CLASS = 5
    # Auxiliary head at each prune layer: "linear" (LayerNorm + Linear to the classes, per
    # token) or "atm" (an ATM decoder of one level, sized by MODEL.SEM_SEG_HEAD.ATM, run on the
    # live tokens with a padding mask; its score is softmax(class) x sigmoid(mask)).
    d.AUX_HEAD = "linear"
    # Weight of each auxiliary head's loss (cross-entropy on its live tokens for "linear", the
    # SegViT loss on its live cells for "atm"). The papers give none: the main head's weight.
    d.AUX_LOSS_WEIGHT = 1.0
    # Training step 2 of DToP (fine-tuning a dense model): tokens are pruned as in inference,
    # leave the sequence, and their auxiliary predictions stand in the final map. False trains
    # the auxiliary heads on every token with nothing pruned (inference still prunes).
    d.PRUNE_IN_TRAINING = True
