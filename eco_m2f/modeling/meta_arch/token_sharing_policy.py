"""The CTS policy network (papers/002 section 1.1) as a meta-architecture of its own.

EfficientNet-Lite0 features at stride 32 + ``Conv2d(320, 2, 1)``: per 32x32 superpatch (2 x 2
patches of 16 pixels) two logits, [mixed, uniform]. It is trained alone on any semantic dataset
with cross-entropy against targets made on the fly from ``batched_inputs[i]["sem_seg"]``
(:mod:`..policy.targets`), then used frozen and in eval mode inside a token-sharing segmenter,
which calls :meth:`TokenSharingPolicy.superpatch_logits` / :meth:`superpatch_scores` on its own
padded, normalised batch (see :func:`..policy.build_frozen_policy`).

Windows larger than 2 x 2 patches (dCTS, papers/003; ``MODEL.POLICY.WINDOW_SIZES``, e.g.
[2, 4, 8, 16]) are scored from the same stride-32 map, average-pooled to the window's stride
(2 x 2 cells for a 4 x 4 window, ...; windows that would reach past the map are left out), each
size through a ``Conv2d(C, 2, 1)`` of its own. The paper does not say how the scores of the
larger windows are produced: this is the design choice here. The 2 x 2 head keeps its name
(``predictor``), so that policies trained with the default [2] load unchanged. Each size has its
own targets (one class in the n x n patches) and its cross-entropy; the losses add up.
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..policy.targets import SUPERPATCH_SIZE, window_grid, window_targets
from ..registry import META_ARCH_REGISTRY
from .base import SegmentationModel
from .image_list import ImageList

__all__ = ["TokenSharingPolicy", "check_window_sizes", "pool_windows"]

_NO_TARGET = -100  # cross-entropy's ignore index: cells that hold no pixel of the image
PixelStats = Optional[Union[Sequence[float], torch.Tensor]]  # per-channel mean or std, 0-255 range


def check_window_sizes(sizes: Sequence[int], key: str = "MODEL.POLICY.WINDOW_SIZES") -> List[int]:
    """Window sides in patches: distinct ascending powers of two from 2, 2 included (the base head)."""
    values = [int(v) for v in sizes]
    if not values or values[0] != 2 or values != sorted(set(values)) or any(v & (v - 1) for v in values):
        raise ValueError(f"{key} {list(sizes)}: distinct ascending powers of two starting at 2 (e.g. [2] or [2, 4, 8, 16])")
    return values


def pool_windows(features: torch.Tensor, size: int) -> torch.Tensor:
    """B x C x R x Q stride-32 map -> the mean over each aligned window of ``size`` patches
    (size / 2 cells a side), windows wholly inside the map only (an exact adaptive average)."""
    k = size // 2  # stride-32 cells per window side
    if k == 1:
        return features
    rows, cols = features.shape[-2] // k, features.shape[-1] // k
    if rows == 0 or cols == 0:
        return features.new_zeros(features.shape[:-2] + (rows, cols))
    return F.adaptive_avg_pool2d(features[..., : rows * k, : cols * k], (rows, cols))


@META_ARCH_REGISTRY.register()
class TokenSharingPolicy(SegmentationModel):
    """Scores every superpatch: may its four patches share one token?

    Eval output per image: ``{"policy": rows x cols}``, the probability that each superpatch of
    the network input holds one class (``rows, cols = ceil(h / 32), ceil(w / 32)`` of the input
    image, not of the original size; the evaluator resizes the ground truth to the input).
    """

    def __init__(self, cfg) -> None:
        super().__init__(cfg, size_divisibility=SUPERPATCH_SIZE, tasks=("policy",))
        from ..backbone.build import build_backbone

        self.backbone = build_backbone(cfg)
        self.in_feature = str(cfg.MODEL.POLICY.IN_FEATURE)
        shapes = self.backbone.output_shape()
        if self.in_feature not in shapes:
            raise ValueError(
                f"MODEL.POLICY.IN_FEATURE {self.in_feature!r} is not an output of {cfg.MODEL.BACKBONE.NAME} "
                f"({sorted(shapes)}); add it to the backbone's OUT_FEATURES"
            )
        spec = shapes[self.in_feature]
        if spec.stride != SUPERPATCH_SIZE:
            raise ValueError(
                f"MODEL.POLICY.IN_FEATURE {self.in_feature!r} has stride {spec.stride}; the policy needs one "
                f"cell per {SUPERPATCH_SIZE}x{SUPERPATCH_SIZE} superpatch (stride {SUPERPATCH_SIZE})"
            )
        self.predictor = nn.Conv2d(spec.channels, 2, kernel_size=1)  # logits [mixed, uniform] of 2x2 windows
        #: window sides in patches (2 = the 2x2 superpatch of CTS)
        self.window_sizes = tuple(check_window_sizes(cfg.MODEL.POLICY.WINDOW_SIZES))
        self.window_predictors = nn.ModuleDict(
            {str(n): nn.Conv2d(spec.channels, 2, kernel_size=1) for n in self.window_sizes[1:]}
        )
        self.ignore_value = int(cfg.MODEL.SEM_SEG_HEAD.IGNORE_VALUE)
        self.ignore_as_class = bool(cfg.MODEL.POLICY.IGNORE_AS_CLASS)
        self.frozen = False

    # ------------------------------------------------------------------ the interface of CTS / dCTS
    def network(self, images: torch.Tensor, cost: Optional[Any] = None) -> Dict[int, torch.Tensor]:
        """Every window size's logits (:meth:`window_logits`) of a batch normalised with this
        model's ``MODEL.PIXEL_MEAN/STD``: what the FLOP count and the benchmark see is all that a
        token-sharing segmenter runs of the policy, the heads of the larger windows included."""
        return self.window_logits(images)

    def window_logits(self, images: torch.Tensor, pixel_mean: PixelStats = None,
                      pixel_std: PixelStats = None) -> Dict[int, torch.Tensor]:
        """Window side n -> logits B x 2 x rows_n x cols_n for every size of ``window_sizes``
        (rows_2 = ceil(H / 32); rows_n = rows_2 // (n / 2)); normalisation as :meth:`superpatch_logits`."""
        features = self.backbone(self._own_normalisation(images, pixel_mean, pixel_std))[self.in_feature]
        out = {2: self.predictor(features)}
        for n in self.window_sizes[1:]:
            pooled = pool_windows(features, n)
            if pooled.shape[-1] == 0 or pooled.shape[-2] == 0:  # the image holds no window of this size
                out[n] = pooled.new_zeros(pooled.shape[0], 2, *pooled.shape[-2:])
            else:
                out[n] = self.window_predictors[str(n)](pooled)
        return out

    @torch.no_grad()
    def flops(self, height: int, width: int) -> int:
        """FLOPs of :meth:`window_logits` on one H x W image, by fvcore's conventions as the
        project counts them: convolutions (``out_elements * in / groups * kh * kw``, bias not
        counted), the window pooling one per pooled input element; BatchNorm and elementwise
        operators none. Counted on one zero image through forward hooks (no trace)."""
        total = [0]

        def conv_hook(module: nn.Conv2d, inputs, output) -> None:
            k = module.kernel_size[0] * module.kernel_size[1]
            total[0] += output.numel() * (module.in_channels // module.groups) * k

        handles = [m.register_forward_hook(conv_hook) for m in self.modules() if isinstance(m, nn.Conv2d)]
        try:
            features = self.backbone(self.pixel_mean.new_zeros(1, self._in_channels(), int(height), int(width)))
        finally:
            for handle in handles:
                handle.remove()
        features = features[self.in_feature]
        rows, cols = features.shape[-2:]
        for n in self.window_sizes:
            k = n // 2
            total[0] += features.shape[1] * (rows // k) * (cols // k) * k * k if k > 1 and rows // k and cols // k else 0
            total[0] += 2 * features.shape[1] * (rows // k) * (cols // k)  # the 1x1 head of this size
        return int(total[0])

    def _in_channels(self) -> int:
        return int(self.pixel_mean.numel())

    def _own_normalisation(self, images: torch.Tensor, pixel_mean: PixelStats, pixel_std: PixelStats) -> torch.Tensor:
        if (pixel_mean is None) != (pixel_std is None):
            raise ValueError("superpatch_logits needs both pixel_mean and pixel_std, or neither")
        if pixel_mean is None:
            return images
        mean = torch.as_tensor(pixel_mean, dtype=images.dtype, device=images.device).view(-1, 1, 1)
        std = torch.as_tensor(pixel_std, dtype=images.dtype, device=images.device).view(-1, 1, 1)
        return (images * std + mean - self.pixel_mean.to(images.dtype)) / self.pixel_std.to(images.dtype)

    def superpatch_logits(self, images: torch.Tensor, pixel_mean: PixelStats = None,
                          pixel_std: PixelStats = None) -> torch.Tensor:
        """Raw logits B x 2 x H/32 x W/32 of a padded batch B x 3 x H x W.

        ``pixel_mean`` / ``pixel_std``: the normalisation the batch has (the caller's own, e.g. a
        ViT's 127.5 / 127.5); it is converted to this network's first. None: it has this
        network's already. ``sigmoid(logits[:, 1] - logits[:, 0])`` equals the softmax score of
        :meth:`superpatch_scores`; dCTS thresholds such sigmoid scores per window size.
        """
        features = self.backbone(self._own_normalisation(images, pixel_mean, pixel_std))[self.in_feature]
        return self.predictor(features)

    def superpatch_scores(self, images: torch.Tensor, pixel_mean: PixelStats = None,
                          pixel_std: PixelStats = None) -> torch.Tensor:
        """P(uniform) B x H/32 x W/32 in float32: CTS shares the S superpatches that score highest."""
        return self.superpatch_logits(images, pixel_mean, pixel_std).float().softmax(dim=1)[:, 1]

    def freeze(self) -> "TokenSharingPolicy":
        """No gradients and eval mode for good: a parent's ``train()`` no longer switches it."""
        self.frozen = True
        self.requires_grad_(False)
        return self.train(False)

    def train(self, mode: bool = True) -> "TokenSharingPolicy":
        return super().train(mode and not getattr(self, "frozen", False))

    # ------------------------------------------------------------------ training and evaluation
    def prepare_targets(self, batched_inputs: List[Dict[str, Any]], images: ImageList, window: int = 2) -> torch.Tensor:
        """B x rows x cols targets of the padded batch for windows of ``window`` patches; windows
        outside an image's own grid (:func:`window_grid`) are ``_NO_TARGET``."""
        h_pad, w_pad = images.tensor.shape[-2:]
        labels = torch.full((len(batched_inputs), h_pad, w_pad), self.ignore_value, dtype=torch.int64,
                            device=self.device)
        for i, (x, (h, w)) in enumerate(zip(batched_inputs, images.image_sizes)):
            if "sem_seg" not in x:
                raise KeyError(
                    f"{x.get('file_name', 'an input')}: the policy trains on semantic labels, but the input has "
                    "no 'sem_seg'; use a semantic dataset mapper (INPUT.DATASET_MAPPER_NAME mask_former_semantic)"
                )
            sem = x["sem_seg"]
            if tuple(sem.shape) != (h, w):
                raise ValueError(f"{x.get('file_name', 'an input')}: sem_seg {tuple(sem.shape)} differs from the image {(h, w)}")
            labels[i, :h, :w] = sem.to(self.device)
        targets = window_targets(labels, window, self.ignore_value, self.ignore_as_class)
        for i, (h, w) in enumerate(images.image_sizes):
            rows, cols = window_grid(h, w, window)
            targets[i, rows:] = _NO_TARGET
            targets[i, :, cols:] = _NO_TARGET
        return targets

    def forward(self, batched_inputs: List[Dict[str, Any]]):
        """Training: ``{"loss_policy": CE}`` (and ``loss_policy_w<n>`` per larger window size);
        eval: per image ``{"policy": P(uniform) rows x cols}`` of the 2x2 windows (with larger
        sizes, ``"policy_windows"``: n -> rows_n x cols_n of :func:`window_grid`) and an empty
        cost record (one pass over the padded image)."""
        images = self.preprocess_image(batched_inputs)
        logits = self.window_logits(images.tensor)  # n -> B x 2 x rows_n x cols_n
        if self.training:
            losses = {}
            for n, value in logits.items():
                if value.numel() == 0:
                    continue
                targets = self.prepare_targets(batched_inputs, images, n)
                losses["loss_policy" if n == 2 else f"loss_policy_w{n}"] = F.cross_entropy(value.float(), targets, ignore_index=_NO_TARGET)
            return losses
        scores = {n: value.float().softmax(dim=1)[:, 1] for n, value in logits.items()}
        results = []
        for b, (h, w) in enumerate(images.image_sizes):
            crops = {n: score[b, : window_grid(h, w, n)[0], : window_grid(h, w, n)[1]] for n, score in scores.items()}
            out: Dict[str, Any] = {"policy": crops.pop(2)}
            if crops:
                out["policy_windows"] = crops
            out["cost"] = {}
            results.append(out)
        return results
