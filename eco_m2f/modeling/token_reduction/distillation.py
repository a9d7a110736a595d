"""Self-distillation from a dense teacher (DoViT Eq. 11 and the official code's variants).

* ``pixel_kl``: the per-pixel KL divergence between the student's and the teacher's class
  distributions, averaged over the pixels. The paper's Eq. 11 is ``KL(student || teacher)``
  (``sum_c p_s log(p_s / p_t)``); the official code calls ``F.kl_div(log p_s, p_t)``, i.e.
  ``KL(teacher || student)``, with temperature 1. ``direction`` picks one.
* ``feature_mse``: the official code's extra mean squared error between the final feature maps
  (weight 0.5 there; not in the paper).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["KL_DIRECTIONS", "feature_mse", "pixel_kl"]

#: "student_teacher": KL(p_s || p_t), the paper's Eq. 11; "teacher_student": KL(p_t || p_s), the code's.
KL_DIRECTIONS = ("student_teacher", "teacher_student")


def pixel_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, direction: str = "student_teacher") -> torch.Tensor:
    """Mean over pixels of the KL divergence between class distributions: logits B x K x H x W
    (the class axis is dim 1), computed in float32; no gradient reaches the teacher."""
    if direction not in KL_DIRECTIONS:
        raise ValueError(f"unknown KL direction '{direction}'; known: {list(KL_DIRECTIONS)}")
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"student logits {tuple(student_logits.shape)} and teacher logits {tuple(teacher_logits.shape)} differ")
    log_s = F.log_softmax(student_logits.float(), dim=1)
    log_t = F.log_softmax(teacher_logits.detach().float(), dim=1)
    if direction == "student_teacher":
        per_pixel = (log_s.exp() * (log_s - log_t)).sum(dim=1)
    else:
        per_pixel = (log_t.exp() * (log_t - log_s)).sum(dim=1)
    return per_pixel.mean()


def feature_mse(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Mean squared error between feature tensors of equal shape (the teacher's detached), in float32."""
    if student.shape != teacher.shape:
        raise ValueError(f"student features {tuple(student.shape)} and teacher features {tuple(teacher.shape)} differ")
    return F.mse_loss(student.float(), teacher.detach().float())
