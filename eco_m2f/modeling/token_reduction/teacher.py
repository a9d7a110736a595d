"""A frozen dense Segmenter as a distillation teacher, held outside the student's module tree.

Self-distillation (DoViT Eq. 11) compares the student with the dense segmenter it was
fine-tuned from. The teacher is built from its own config (default: the student's config with
token reduction off) and weights (default: the student's ``MODEL.WEIGHTS``), frozen and in eval
mode. It is not a child module: it never enters the student's state dict, its optimiser, its
DDP wrapper or its ``train()`` switch, and it is built on first use (a training step), so that
evaluating a trained student needs no teacher file. It follows the student's device on each call.
"""
from __future__ import annotations

from typing import Any, Optional, Sequence, Tuple

import torch

__all__ = ["FrozenTeacher", "build_teacher_model"]


def build_teacher_model(student_cfg: Any, config_file: str = "", weights: str = "", opts: Sequence[str] = ()):
    """The dense Segmenter of ``config_file`` (+ ``KEY VALUE`` opts; "" = ``student_cfg`` with
    ``MODEL.TOKEN_REDUCTION.NAME`` ""), loaded with ``weights`` ("" = ``student_cfg.MODEL.WEIGHTS``),
    frozen in eval mode. Every tensor of the weights must match (the loader fails loudly otherwise)."""
    from ...checkpoint import load_weights
    from ...config import setup_cfg
    from ..registry import META_ARCH_REGISTRY  # the Segmenter registers itself there (no import cycle)

    weights = weights or str(student_cfg.MODEL.WEIGHTS)
    if not weights:
        raise ValueError(
            "MODEL.TOKEN_REDUCTION.DOVIT.TEACHER.WEIGHTS and MODEL.WEIGHTS are both empty: distillation needs the "
            "trained dense Segmenter's weights (or set the distillation weights to 0)"
        )
    overrides = ["MODEL.BACKBONE.PRETRAINED", "False", "MODEL.WEIGHTS", weights, *opts]
    if config_file:
        cfg = setup_cfg(config_file, overrides)
    else:
        cfg = student_cfg.clone()
        cfg.defrost()
        cfg.merge_from_list(["MODEL.TOKEN_REDUCTION.NAME", "", *overrides])
        cfg.freeze()
    if cfg.MODEL.META_ARCHITECTURE != "Segmenter" or cfg.MODEL.TOKEN_REDUCTION.NAME:
        raise ValueError(
            f"teacher config {config_file or '(the student config)'}: a teacher is a dense Segmenter "
            f"(MODEL.META_ARCHITECTURE 'Segmenter', MODEL.TOKEN_REDUCTION.NAME ''), got "
            f"'{cfg.MODEL.META_ARCHITECTURE}' / '{cfg.MODEL.TOKEN_REDUCTION.NAME}'"
        )
    if int(cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES) != int(student_cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES):
        raise ValueError(
            f"teacher config {config_file}: {cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES} classes, the student has "
            f"{student_cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES} (MODEL.SEM_SEG_HEAD.NUM_CLASSES)"
        )
    model = META_ARCH_REGISTRY.get("Segmenter")(cfg)  # on the CPU: it follows the student's device on each call
    load_weights(model, weights)
    model.requires_grad_(False)
    return model.eval()


class FrozenTeacher:
    """Calls a frozen dense Segmenter on the student's normalised batch.

    Args:
        build: makes the teacher model (called once, on first use).
        pixel_mean, pixel_std: the student's normalisation (C x 1 x 1), so that a teacher with
            other statistics sees its own normalisation of the same pixels.
    """

    def __init__(self, build, pixel_mean: torch.Tensor, pixel_std: torch.Tensor) -> None:
        self._build = build
        self._model = None
        self._pixel = (pixel_mean.detach().cpu(), pixel_std.detach().cpu())

    @property
    def model(self):
        if self._model is None:
            self._model = self._build()
        return self._model

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, want_tokens: bool = False) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Normalised, padded student batch B x 3 x H x W -> (teacher logits B x K x H x W,
        final tokens B x N x C of its encoder when ``want_tokens``, else None)."""
        model = self.model
        if model.device != images.device:
            model.to(images.device)
        model.eval()
        mean, std = (t.to(images.device, images.dtype) for t in self._pixel)
        if not (torch.equal(mean, model.pixel_mean.to(images.dtype)) and torch.equal(std, model.pixel_std.to(images.dtype))):
            images = (images * std + mean - model.pixel_mean.to(images.dtype)) / model.pixel_std.to(images.dtype)
        features = model.encode(images)
        outputs = model.run_head(model.sem_seg_head, features)
        logits = model.sem_seg_head.semantic_logits(outputs, features.grid, images.shape[-2:])
        return logits, (features.tokens if want_tokens else None)
