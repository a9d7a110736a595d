"""Official Segmenter checkpoints (rstrudel/segmenter) <-> our Segmenter's state-dict names.

An official ``checkpoint.pth`` is ``{"model": state_dict}`` with ``encoder.*`` (timm's ViT names)
and ``decoder.*`` (``head.*`` for the linear decoder; ``cls_emb``, ``proj_dec``, ``proj_patch``,
``proj_classes``, ``blocks.i.*``, ``decoder_norm``, ``mask_norm`` for the mask transformer).
Ours keeps every name and only changes the two prefixes:

=====================  =========================================================
``encoder.head.*``     dropped (the ImageNet classifier, unused by segmentation)
``encoder.X``          ``backbone.X``
``decoder.X``          ``sem_seg_head.X``
=====================  =========================================================

A position embedding stored for another grid is resized afterwards by the backbone's key map.
"""
from __future__ import annotations

from typing import Dict, Mapping

import torch

__all__ = ["is_official_segmenter_state_dict", "official_segmenter_to_ours", "ours_to_official_segmenter"]

StateDict = Dict[str, torch.Tensor]

_RENAMES = (("encoder.", "backbone."), ("decoder.", "sem_seg_head."))
_DROPPED = ("encoder.head.",)


def is_official_segmenter_state_dict(state_dict: Mapping[str, torch.Tensor]) -> bool:
    """True when the keys are the official release's (``encoder.*`` with ``decoder.*``)."""
    keys = list(state_dict)
    return any(k.startswith("encoder.") for k in keys) and any(k.startswith("decoder.") for k in keys)


def official_segmenter_to_ours(state_dict: Mapping[str, torch.Tensor]) -> StateDict:
    """Official names -> ours (see the module docstring); any other key is kept as it is."""
    out: StateDict = {}
    for key, value in state_dict.items():
        if key.startswith(_DROPPED):
            continue
        for old, new in _RENAMES:
            if key.startswith(old):
                key = new + key[len(old):]
                break
        out[key] = value
    return out


def ours_to_official_segmenter(state_dict: Mapping[str, torch.Tensor]) -> StateDict:
    """Our Segmenter's state dict -> the official layout (without the unused ``encoder.head``).

    Raises:
        KeyError: keys the official model has no place for (e.g. auxiliary heads).
    """
    out: StateDict = {}
    homeless = []
    for key, value in state_dict.items():
        for new, old in _RENAMES:
            if key.startswith(old):
                out[new + key[len(old):]] = value
                break
        else:
            homeless.append(key)
    if homeless:
        raise KeyError(f"no official Segmenter name for {len(homeless)} keys, e.g. {homeless[:5]}")
    return out
