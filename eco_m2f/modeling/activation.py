"""Activation functions by name, as the official transformer layers take them from configs."""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

_ACTIVATIONS = {"relu": F.relu, "gelu": F.gelu, "glu": F.glu}


def get_activation(name: str, where: str = "activation") -> Callable[[torch.Tensor], torch.Tensor]:
    """``F.relu`` / ``F.gelu`` / ``F.glu`` for ``name``; a clear error naming ``where`` otherwise."""
    try:
        return _ACTIVATIONS[name]
    except KeyError:
        raise ValueError(f"{where} must be relu, gelu or glu, got '{name}'") from None
