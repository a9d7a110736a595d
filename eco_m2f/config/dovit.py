"""Keys of DoViT, dynamic token pass (``MODEL.TOKEN_REDUCTION.NAME: "DoViT"``; papers/001).

Where the paper and the official code disagree, the paper's value is the default and the
code's is named in the comment.
"""
from __future__ import annotations

from .config_node import CfgNode as CN


def add_dovit_config(cfg: CN) -> None:
    d = cfg.MODEL.TOKEN_REDUCTION.DOVIT = CN()
    # Decision layers, counted as the paper counts them: after layer l (1-based, i.e. on the
    # output of 0-based block l - 1) an auxiliary head scores the live tokens and the confident
    # ones stop. The paper: (3, 6, 9) for 12-layer ViTs, (6, 12, 18) for 24 layers. The official
    # code decides after layers (2, 5, 8) for ViT-S/B and (6, 12, 18) for ViT-L.
    d.DECISION_LAYERS = [3, 6, 9]
    # xi: a token stops when its auxiliary head's max softmax probability exceeds this (Eq. 4).
    # 1.0 stops nothing (the dense model). Paper: 0.985 Cityscapes, 0.96-0.985 ADE20K.
    d.THRESHOLD = 0.985
    # Training only: xi falls linearly from 1.0 to THRESHOLD over this fraction of
    # SOLVER.MAX_ITER (driven by the per-iteration hook). 0 = the paper (THRESHOLD throughout);
    # the official code ramps over 70k of 80k iterations (0.875).
    d.THRESHOLD_RAMP = 0.0
    # Auxiliary heads: 1x1 conv to AUX_HIDDEN channels + BatchNorm + ReLU + 1x1 classifier on
    # each token (paper and code: 256); 0 = one linear classifier.
    d.AUX_HIDDEN = 256
    # alpha: weight of each auxiliary head's cross-entropy (Eq. 12). Paper 1.0; the code 0.4.
    d.AUX_WEIGHT = 1.0
    # Which tokens the auxiliary losses see in training. "all": the reconstructed map, where
    # tokens stopped earlier keep the features they stopped with (the paper's token
    # reconstruction before the auxiliary heads; the code). "live": only tokens still live (the
    # heads then run on nothing else, in training as in inference). Inference always runs the
    # heads on live tokens only: a 1x1 head decides each token alone.
    d.AUX_LOSS_TOKENS = "all"
    # Token merging (Eq. 8): the class token becomes 1/2 (cls + mean of all tokens stopped so far)
    # at every decision layer.
    d.MERGE = True
    # Merge only while the stopped tokens are more than this share of the N + 1 tokens of the
    # image (class token counted, as the code). Paper 0.0; the code 0.1.
    d.MERGE_MIN_STOPPED = 0.0
    # beta: weight of the self-distillation KL from the dense teacher (Eq. 11-12). Paper 0.4;
    # the code 1.0. 0 = no teacher.
    d.DISTILL_WEIGHT = 0.4
    # "student_teacher": KL(p_student || p_teacher), the paper's Eq. 11; "teacher_student":
    # KL(p_teacher || p_student), the code's.
    d.DISTILL_KL = "student_teacher"
    # Weight of a mean squared error between the final feature maps of student and teacher: the
    # code's 0.5; not in the paper (0.0).
    d.FEATURE_DISTILL_WEIGHT = 0.0
    # The teacher: a dense Segmenter, frozen, built on the first training step.
    d.TEACHER = CN()
    # Its config file; "" = this config with MODEL.TOKEN_REDUCTION.NAME "".
    d.TEACHER.CONFIG = ""
    # Its weights; "" = MODEL.WEIGHTS (the dense model the student is fine-tuned from).
    d.TEACHER.WEIGHTS = ""
