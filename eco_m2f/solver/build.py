"""Optimizer, learning-rate schedule and gradient clipping built from ``cfg.SOLVER``.

The choices are Mask2Former's (``SOLVER.OPTIMIZER`` ADAMW, backbone learning rate scaled by
``SOLVER.BACKBONE_MULTIPLIER``, further factors by parameter-name prefix from
``SOLVER.LR_MULTIPLIERS``, no weight decay on normalisation layers and embeddings, a poly
schedule with warmup, full-model gradient-norm clipping), so that official configs train as
they do upstream. Everything here works on any ``nn.Module``: the only model convention used
is that backbone parameters live under a child module called ``backbone``.
"""
from __future__ import annotations

import logging
import math
import re
from collections import OrderedDict
from typing import Any, Callable, Dict, Iterable, List, Optional

import torch
import torch.nn as nn
from fvcore.common.param_scheduler import (
    CompositeParamScheduler,
    ConstantParamScheduler,
    CosineParamScheduler,
    LinearParamScheduler,
    MultiStepParamScheduler,
    ParamScheduler,
)

__all__ = [
    "NORM_MODULE_TYPES",
    "EMBED_PARAM_NAMES",
    "get_param_groups",
    "build_optimizer",
    "build_lr_scheduler",
    "layer_decay_factor",
    "prefix_lr_factor",
    "build_gradient_clipper",
    "WarmupPolyLR",
    "LRMultiplier",
    "warmup_factor_at_iter",
]

logger = logging.getLogger(__name__)

# Every normalisation layer of torch; FrozenBatchNorm-like modules are matched by class name
# (see ``_is_norm``) because they come from timm/torchvision/the project, not torch.nn.
NORM_MODULE_TYPES = (
    nn.BatchNorm1d,
    nn.BatchNorm2d,
    nn.BatchNorm3d,
    nn.SyncBatchNorm,
    nn.GroupNorm,
    nn.InstanceNorm1d,
    nn.InstanceNorm2d,
    nn.InstanceNorm3d,
    nn.LayerNorm,
    nn.LocalResponseNorm,
)
# Parameters that act as embeddings although they are bare ``nn.Parameter`` s (Swin's relative
# position bias and absolute position embedding, query embeddings, ViT position embedding and
# class token): they get ``SOLVER.WEIGHT_DECAY_EMBED``. The pixel decoder's bare ``level_embed``
# is not among them: the official optimizer gives it the normal weight decay (the transformer
# decoder's ``level_embed`` is an ``nn.Embedding`` and gets the embedding decay by its type).
EMBED_PARAM_NAMES = (
    "relative_position_bias_table",
    "absolute_pos_embed",
    "query_embed",
    "query_feat",
    "pos_embed",
    "cls_token",
    "dist_token",
)


_NORM_CLASS_NAME = re.compile(r"batchnorm|groupnorm|layernorm|instancenorm|rmsnorm|frozenbn|normact")


def _is_norm(module: nn.Module) -> bool:
    if isinstance(module, NORM_MODULE_TYPES):
        return True
    # FrozenBatchNorm2d (torchvision / timm / project), timm's LayerNorm2d / BatchNormAct2d, RMSNorm...
    return bool(_NORM_CLASS_NAME.search(type(module).__name__.lower()))


def _is_embedding_param(param_name: str) -> bool:
    return any(token in param_name for token in EMBED_PARAM_NAMES)


def _is_backbone(module_name: str) -> bool:
    return module_name == "backbone" or module_name.startswith("backbone.")


def get_param_groups(
    model: nn.Module,
    base_lr: float,
    weight_decay: float,
    weight_decay_norm: float = 0.0,
    weight_decay_embed: float = 0.0,
    backbone_multiplier: float = 1.0,
    lr_factor: Optional[Callable[[str], float]] = None,
) -> List[Dict[str, Any]]:
    """Split trainable parameters into groups of equal (lr, weight_decay).

    Rules (Mask2Former's): parameters of modules under ``backbone`` get ``lr * backbone_multiplier``;
    parameters owned by a normalisation layer get ``weight_decay_norm``; ``nn.Embedding`` weights and
    parameters named like an embedding (``EMBED_PARAM_NAMES``) get ``weight_decay_embed``.
    ``lr_factor(full parameter name)``, when given, multiplies each rate further (layer-wise
    decay). A parameter shared by several modules is counted once (first owner wins). Groups keep the
    model's parameter order, so optimizer state dicts are stable across runs (needed by resume).
    Each group carries ``"param_names"`` (torch optimizers keep them in their state dict).
    """
    seen: set[int] = set()
    groups: "OrderedDict[tuple, Dict[str, Any]]" = OrderedDict()
    for module_name, module in model.named_modules():
        for param_name, param in module.named_parameters(recurse=False):
            if not param.requires_grad or id(param) in seen:
                continue
            seen.add(id(param))
            full_name = f"{module_name}.{param_name}" if module_name else param_name
            lr = base_lr * (backbone_multiplier if _is_backbone(module_name) else 1.0)
            if lr_factor is not None:
                lr *= lr_factor(full_name)
            wd = weight_decay
            if _is_norm(module):
                wd = weight_decay_norm
            if isinstance(module, nn.Embedding) or _is_embedding_param(param_name):
                wd = weight_decay_embed
            key = (lr, wd)
            if key not in groups:
                groups[key] = {"params": [], "param_names": [], "lr": lr, "weight_decay": wd}
            groups[key]["params"].append(param)
            groups[key]["param_names"].append(full_name)
    if not groups:
        raise ValueError(f"{type(model).__name__} has no trainable parameters to optimize")
    return list(groups.values())


def layer_decay_factor(model: nn.Module, decay: float) -> Callable[[str], float]:
    """Layer-wise lr decay (BEiT/ViTDet): a backbone parameter at depth ``d`` of ``D + 1`` gets
    ``decay ** (D + 1 - d)``; everything outside the backbone 1. The depth comes from
    ``model.backbone.layer_id(name)`` and ``model.backbone.depth`` (ViT backbones have them)."""
    if not 0.0 < decay <= 1.0:
        raise ValueError(f"SOLVER.LAYER_DECAY must be in (0, 1], got {decay}")
    backbone = getattr(model, "backbone", None)
    layer_id = getattr(backbone, "layer_id", None)
    if not callable(layer_id):
        raise ValueError(
            f"SOLVER.LAYER_DECAY {decay} needs a backbone with per-layer ids (a ViT); "
            f"{type(backbone).__name__} has none"
        )
    top = int(backbone.depth) + 1

    def factor(name: str) -> float:
        if not name.startswith("backbone."):
            return 1.0
        return decay ** (top - layer_id(name[len("backbone."):]))

    return factor


def prefix_lr_factor(model: nn.Module, pairs: Iterable) -> Callable[[str], float]:
    """``SOLVER.LR_MULTIPLIERS``: ``[[prefix, factor], ...]``; a parameter whose full name starts
    with ``prefix`` gets ``lr * factor`` (new heads of a fine-tuning, e.g. ``token_reducer.``),
    the longest matching prefix winning. A prefix that names no trainable parameter is an error
    (a typo would otherwise leave the rate unchanged without a word)."""
    rules: List[tuple] = []
    for pair in pairs:
        if not isinstance(pair, (list, tuple)) or len(pair) != 2 or not isinstance(pair[0], str):
            raise ValueError(f"SOLVER.LR_MULTIPLIERS: each entry is [prefix, factor], got {pair!r}")
        prefix, factor = pair[0], float(pair[1])
        if not prefix or not factor > 0.0:
            raise ValueError(f"SOLVER.LR_MULTIPLIERS: [{prefix!r}, {pair[1]!r}] needs a non-empty prefix and a factor > 0")
        rules.append((prefix, factor))
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    for prefix, _ in rules:
        if not any(n.startswith(prefix) for n in names):
            heads = sorted({n.split(".")[0] + "." for n in names})
            raise ValueError(f"SOLVER.LR_MULTIPLIERS: prefix {prefix!r} names no trainable parameter of "
                             f"{type(model).__name__} (its top-level modules: {heads})")
    rules.sort(key=lambda r: -len(r[0]))

    def factor(name: str) -> float:
        return next((f for prefix, f in rules if name.startswith(prefix)), 1.0)

    return factor


def _product(*factors: Optional[Callable[[str], float]]) -> Optional[Callable[[str], float]]:
    used = [f for f in factors if f is not None]
    if not used:
        return None
    return lambda name: math.prod(f(name) for f in used)


def build_optimizer(cfg, model: nn.Module) -> torch.optim.Optimizer:
    """``SOLVER.OPTIMIZER`` (ADAMW or SGD) over Mask2Former-style parameter groups."""
    solver = cfg.SOLVER
    decay = float(solver.get("LAYER_DECAY", 1.0))
    multipliers = list(solver.get("LR_MULTIPLIERS", []) or [])
    groups = get_param_groups(
        model,
        base_lr=solver.BASE_LR,
        weight_decay=solver.WEIGHT_DECAY,
        weight_decay_norm=solver.WEIGHT_DECAY_NORM,
        weight_decay_embed=solver.get("WEIGHT_DECAY_EMBED", 0.0),
        backbone_multiplier=solver.get("BACKBONE_MULTIPLIER", 1.0),
        lr_factor=_product(
            layer_decay_factor(model, decay) if decay != 1.0 else None,
            prefix_lr_factor(model, multipliers) if multipliers else None,
        ),
    )
    name = str(solver.get("OPTIMIZER", "SGD")).upper()
    if name == "ADAMW":
        return torch.optim.AdamW(groups, lr=solver.BASE_LR, weight_decay=solver.WEIGHT_DECAY)
    if name == "SGD":
        return torch.optim.SGD(
            groups, lr=solver.BASE_LR, momentum=solver.MOMENTUM, nesterov=solver.NESTEROV,
            weight_decay=solver.WEIGHT_DECAY,
        )
    raise ValueError(f"SOLVER.OPTIMIZER '{solver.OPTIMIZER}' is not supported; use 'ADAMW' or 'SGD'")


# ----------------------------------------------------------------------------- schedules


def warmup_factor_at_iter(method: str, it: int, warmup_iters: int, warmup_factor: float) -> float:
    """Multiplier of the learning rate during warmup; 1.0 from ``warmup_iters`` on.

    linear: ramps from ``warmup_factor`` at iteration 0 to 1 at ``warmup_iters``;
    constant: ``warmup_factor`` for the whole warmup.
    """
    if it >= warmup_iters:
        return 1.0
    if method == "constant":
        return warmup_factor
    if method == "linear":
        alpha = it / warmup_iters
        return warmup_factor * (1.0 - alpha) + alpha
    raise ValueError(f"SOLVER.WARMUP_METHOD '{method}' is not supported; use 'linear' or 'constant'")


class _ConfigScheduler(torch.optim.lr_scheduler.LRScheduler):
    """A scheduler whose shape comes from the config: its state dict holds only the position
    (iteration) and base rates, so resuming with an edited config (e.g. a longer SOLVER.MAX_ITER)
    follows the new schedule, and checkpoints hold only numbers."""

    _STATE_KEYS = ("base_lrs", "last_epoch", "_step_count", "_last_lr")

    def state_dict(self) -> Dict[str, Any]:
        return {k: self.__dict__[k] for k in self._STATE_KEYS if k in self.__dict__}


class WarmupPolyLR(_ConfigScheduler):
    """Mask2Former's schedule, stepped once per iteration.

    ``lr(it) = warmup(it) * ((base_lr - end_lr) * (1 - it / max_iters) ** power + end_lr)`` for
    every parameter group (mmseg's and Segmenter's poly to ``min_lr``; ``end_lr`` 0 is
    Mask2Former's). Once warmup is over and ``constant_ending > 0``, the poly multiplier never
    drops below ``constant_ending``.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        max_iters: int,
        warmup_factor: float = 0.001,
        warmup_iters: int = 1000,
        warmup_method: str = "linear",
        last_epoch: int = -1,
        power: float = 0.9,
        constant_ending: float = 0.0,
        end_lr: float = 0.0,
    ) -> None:
        if max_iters <= 0:
            raise ValueError(f"SOLVER.MAX_ITER must be positive for WarmupPolyLR, got {max_iters}")
        self.max_iters = max_iters
        self.warmup_factor = warmup_factor
        self.warmup_iters = warmup_iters
        self.warmup_method = warmup_method
        self.power = power
        self.constant_ending = constant_ending
        self.end_lr = end_lr
        super().__init__(optimizer, last_epoch)

    def _multipliers(self, it: int) -> tuple[float, float]:
        warmup = warmup_factor_at_iter(self.warmup_method, it, self.warmup_iters, self.warmup_factor)
        poly = math.pow(max(0.0, 1.0 - it / self.max_iters), self.power)
        if self.constant_ending > 0 and warmup == 1.0 and poly < self.constant_ending:
            poly = self.constant_ending
        return warmup, poly

    def get_lr(self) -> List[float]:
        warmup, poly = self._multipliers(self.last_epoch)
        return [warmup * ((base_lr - self.end_lr) * poly + self.end_lr) for base_lr in self.base_lrs]

    def _get_closed_form_lr(self) -> List[float]:
        return self.get_lr()


class LRMultiplier(_ConfigScheduler):
    """Torch scheduler whose multiplier at iteration ``it`` is ``schedule(it / max_iter)``.

    Lets any ``fvcore.common.param_scheduler.ParamScheduler`` drive a torch optimizer; stepped
    once per iteration. The schedule object is not part of the state dict (it is rebuilt from
    the config), so checkpoints hold only numbers.
    """

    def __init__(
        self, optimizer: torch.optim.Optimizer, multiplier: ParamScheduler, max_iter: int, last_epoch: int = -1
    ) -> None:
        if not isinstance(multiplier, ParamScheduler):
            raise ValueError(f"LRMultiplier needs an fvcore ParamScheduler, got {type(multiplier).__name__}")
        self._multiplier = multiplier
        self._max_iter = max_iter
        super().__init__(optimizer, last_epoch)

    def get_lr(self) -> List[float]:
        where = min(max(self.last_epoch, 0) / self._max_iter, 1.0)
        m = self._multiplier(where)
        return [base_lr * m for base_lr in self.base_lrs]


def _with_warmup(
    schedule: ParamScheduler, warmup_factor: float, warmup_iters: int, max_iter: int, method: str,
    rescale_interval: bool,
) -> ParamScheduler:
    """Prefix ``schedule`` with a warmup that ends where the schedule is at the end of warmup."""
    if warmup_iters <= 0:
        return schedule
    length = min(warmup_iters / max_iter, 1.0)
    end = schedule(0.0 if rescale_interval else length)
    start = warmup_factor * schedule(0.0)
    if method == "linear":
        warm: ParamScheduler = LinearParamScheduler(start, end)
    elif method == "constant":
        warm = ConstantParamScheduler(start)
    else:
        raise ValueError(f"SOLVER.WARMUP_METHOD '{method}' is not supported; use 'linear' or 'constant'")
    if length >= 1.0:
        return warm
    return CompositeParamScheduler(
        [warm, schedule], lengths=[length, 1.0 - length],
        interval_scaling=["rescaled", "rescaled" if rescale_interval else "fixed"],
    )


def build_lr_scheduler(cfg, optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LRScheduler:
    """``SOLVER.LR_SCHEDULER_NAME``: WarmupPolyLR, WarmupMultiStepLR or WarmupCosineLR (per iteration)."""
    s = cfg.SOLVER
    name = s.LR_SCHEDULER_NAME
    if name == "WarmupPolyLR":
        return WarmupPolyLR(
            optimizer, s.MAX_ITER, warmup_factor=s.WARMUP_FACTOR, warmup_iters=s.WARMUP_ITERS,
            warmup_method=s.WARMUP_METHOD, power=s.POLY_LR_POWER, constant_ending=s.POLY_LR_CONSTANT_ENDING,
            end_lr=s.BASE_LR_END,
        )
    if name == "WarmupMultiStepLR":
        steps = [x for x in s.STEPS if x <= s.MAX_ITER]
        if len(steps) != len(s.STEPS):
            logger.warning("SOLVER.STEPS %s contains values larger than SOLVER.MAX_ITER %d; those are ignored",
                           list(s.STEPS), s.MAX_ITER)
        schedule: ParamScheduler = MultiStepParamScheduler(
            values=[s.GAMMA ** k for k in range(len(steps) + 1)], milestones=steps, num_updates=s.MAX_ITER
        )
    elif name == "WarmupCosineLR":
        end_value = s.BASE_LR_END / s.BASE_LR if s.BASE_LR > 0 else 0.0
        schedule = CosineParamScheduler(1.0, end_value)
    else:
        raise ValueError(
            f"SOLVER.LR_SCHEDULER_NAME '{name}' is unknown; use WarmupPolyLR, WarmupMultiStepLR or WarmupCosineLR"
        )
    schedule = _with_warmup(
        schedule, s.WARMUP_FACTOR, s.WARMUP_ITERS, s.MAX_ITER, s.WARMUP_METHOD, bool(s.RESCALE_INTERVAL)
    )
    return LRMultiplier(optimizer, schedule, s.MAX_ITER)


# ----------------------------------------------------------------------------- clipping


def build_gradient_clipper(cfg) -> Optional[Callable[[Iterable[torch.Tensor]], Optional[torch.Tensor]]]:
    """A function ``clip(params)`` from ``SOLVER.CLIP_GRADIENTS``, or None when disabled.

    full_model: one norm over all gradients (Mask2Former's default, returns the total norm);
    norm: each parameter's gradient norm clipped on its own; value: elementwise clamp.
    Gradients must be unscaled (AMP) before the call; the engine's precision plugin does that.
    """
    clip = cfg.SOLVER.CLIP_GRADIENTS
    if not clip.ENABLED:
        return None
    clip_type = clip.CLIP_TYPE
    value = float(clip.CLIP_VALUE)
    norm_type = float(clip.NORM_TYPE)
    if value <= 0:
        raise ValueError(f"SOLVER.CLIP_GRADIENTS.CLIP_VALUE must be positive, got {clip.CLIP_VALUE}")

    def _with_grad(params: Iterable[torch.Tensor]) -> List[torch.Tensor]:
        return [p for p in params if p.grad is not None]

    if clip_type == "full_model":
        def clip_full(params: Iterable[torch.Tensor]) -> Optional[torch.Tensor]:
            return torch.nn.utils.clip_grad_norm_(_with_grad(params), value, norm_type)
        return clip_full
    if clip_type == "norm":
        def clip_norm(params: Iterable[torch.Tensor]) -> None:
            for p in _with_grad(params):
                torch.nn.utils.clip_grad_norm_(p, value, norm_type)
        return clip_norm
    if clip_type == "value":
        def clip_value(params: Iterable[torch.Tensor]) -> None:
            torch.nn.utils.clip_grad_value_(_with_grad(params), value)
        return clip_value
    raise ValueError(
        f"SOLVER.CLIP_GRADIENTS.CLIP_TYPE '{clip_type}' is unknown; use 'full_model', 'norm' or 'value'"
    )
