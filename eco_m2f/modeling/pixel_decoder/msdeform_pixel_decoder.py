"""Mask2Former's pixel decoder (``MSDeformAttnPixelDecoder``) with ECO-M2F encoder exits.

Path: res3..res5 -> 1x1 conv + GroupNorm (``input_proj``) -> deformable-attention encoder over
all three levels -> split back into maps -> FPN step with res2 (``adapter_1``, ``layer_1``) ->
``mask_features`` (stride 4). An exit at k runs encoder layers 1..k and then the unchanged
rest; the encoder keeps its token count, so the rest does not depend on k.

Entry points (features: dict name -> (B, C, H, W) backbone maps):
``forward_features(features, exit_layer=None)``, ``project_inputs(features)``,
``forward_features_multi_exit(features, exits)``, ``forward_features_per_image_exit(features, exit_per_image)``.
Each returns (or maps exits to) the official triple
(mask_features (B, MASK_DIM, H/4, W/4), encoder output at the lowest resolution (B, C, H/32, W/32),
multi_scale_features: 3 maps low -> high resolution (res5, res4, res3 scales)).
"""
from __future__ import annotations

import functools
import math
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..registry import PIXEL_DECODER_REGISTRY, ShapeSpec
from .msdeform_encoder import EncoderInputs, MSDeformAttnTransformerEncoderOnly
from .position_encoding import PositionEmbeddingSine

__all__ = ["Conv2dNormAct", "MSDeformAttnPixelDecoder", "PixelDecoderOutput", "c2_xavier_fill", "get_norm"]

# (mask_features, encoder output at the lowest resolution, multi-scale features low -> high res)
PixelDecoderOutput = Tuple[torch.Tensor, torch.Tensor, List[torch.Tensor]]


def c2_xavier_fill(module: nn.Module) -> None:
    """Caffe2's XavierFill as Detectron2 applies it: kaiming-uniform with a=1, zero bias."""
    nn.init.kaiming_uniform_(module.weight, a=1)
    if getattr(module, "bias", None) is not None:
        nn.init.constant_(module.bias, 0)


def get_norm(norm: str, out_channels: int) -> Optional[nn.Module]:
    """Detectron2's norm names used by Mask2Former heads: "GN" (32 groups), "BN", "" (none)."""
    if norm in ("", None):
        return None
    if norm == "GN":
        if out_channels % 32 != 0:
            raise ValueError(f"MODEL.SEM_SEG_HEAD.NORM='GN' uses 32 groups; CONVS_DIM={out_channels} is not a multiple of 32")
        return nn.GroupNorm(32, out_channels)
    if norm == "BN":
        return nn.BatchNorm2d(out_channels)
    raise ValueError(f"MODEL.SEM_SEG_HEAD.NORM='{norm}' is not supported; use 'GN', 'BN' or ''")


class Conv2dNormAct(nn.Conv2d):
    """Conv2d followed by an optional ``norm`` submodule and activation (Detectron2's Conv2d; keys weight, norm.*)."""

    def __init__(
        self,
        *args,
        norm: Optional[nn.Module] = None,
        activation: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
        **kwargs,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.norm = norm
        self.activation = activation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = super().forward(x)
        if self.norm is not None:
            x = self.norm(x)
        if self.activation is not None:
            x = self.activation(x)
        return x


def _fp32(method):
    """Run ``method(self, features, ...)`` with autocast off when ``self.fp32`` (official: float32 encoder)."""

    @functools.wraps(method)
    def wrapper(self, features, *args, **kwargs):
        if not self.fp32:
            return method(self, features, *args, **kwargs)
        device_type = next(iter(features.values())).device.type if features else "cpu"
        with torch.autocast(device_type=device_type, enabled=False):
            return method(self, features, *args, **kwargs)

    return wrapper


@PIXEL_DECODER_REGISTRY.register()
class MSDeformAttnPixelDecoder(nn.Module):
    """Deformable-attention pixel decoder; built ``MSDeformAttnPixelDecoder(cfg, input_shape)``.

    Config: MODEL.SEM_SEG_HEAD.{IN_FEATURES, CONVS_DIM, MASK_DIM, NORM, COMMON_STRIDE,
    TRANSFORMER_ENC_LAYERS, DEFORMABLE_TRANSFORMER_ENCODER_{IN_FEATURES, N_POINTS, DIM_FEEDFORWARD},
    DEFORMABLE_ATTENTION_IMPL, PIXEL_DECODER_FP32}, MODEL.MASK_FORMER.{NHEADS, DROPOUT}: the
    encoder's heads and dropout are the official code's keys; its FFN width (1024) and points (4)
    are constants there, exposed here as DIM_FEEDFORWARD / N_POINTS with those defaults.
    """

    def __init__(self, cfg, input_shape: Mapping[str, ShapeSpec]) -> None:
        super().__init__()
        head = cfg.MODEL.SEM_SEG_HEAD
        in_features = list(head.IN_FEATURES)
        missing = [f for f in in_features if f not in input_shape]
        if missing:
            raise KeyError(
                f"MODEL.SEM_SEG_HEAD.IN_FEATURES names {missing}, which the backbone does not output "
                f"(it has {sorted(input_shape)})"
            )
        transformer_in = list(head.DEFORMABLE_TRANSFORMER_ENCODER_IN_FEATURES)
        bad = [f for f in transformer_in if f not in in_features]
        if bad:
            raise KeyError(
                f"MODEL.SEM_SEG_HEAD.DEFORMABLE_TRANSFORMER_ENCODER_IN_FEATURES names {bad}, "
                f"not in MODEL.SEM_SEG_HEAD.IN_FEATURES {in_features}"
            )
        conv_dim = head.CONVS_DIM
        mask_dim = head.MASK_DIM
        self.fp32 = bool(head.PIXEL_DECODER_FP32)
        norm = head.NORM

        # all inputs, high -> low resolution ("res2" .. "res5")
        shapes = sorted(((k, input_shape[k]) for k in in_features), key=lambda kv: kv[1].stride)
        self.in_features = [k for k, _ in shapes]
        self.feature_strides = [v.stride for _, v in shapes]
        self.feature_channels = [v.channels for _, v in shapes]
        # encoder inputs, high -> low resolution
        t_shapes = sorted(((k, input_shape[k]) for k in transformer_in), key=lambda kv: kv[1].stride)
        self.transformer_in_features = [k for k, _ in t_shapes]
        transformer_in_channels = [v.channels for _, v in t_shapes]
        self.transformer_feature_strides = [v.stride for _, v in t_shapes]
        self.transformer_num_feature_levels = len(self.transformer_in_features)

        # input_proj.i projects level i counted from the LOWEST resolution (res5 first)
        self.input_proj = nn.ModuleList(
            nn.Sequential(nn.Conv2d(c, conv_dim, kernel_size=1), nn.GroupNorm(32, conv_dim))
            for c in transformer_in_channels[::-1]
        )
        for proj in self.input_proj:
            nn.init.xavier_uniform_(proj[0].weight, gain=1)
            nn.init.constant_(proj[0].bias, 0)

        # The official decoder reads its heads from MODEL.MASK_FORMER.NHEADS (the N_HEADS key is
        # defined but never read there); a config that sets them apart would mean two things.
        nheads = cfg.MODEL.MASK_FORMER.NHEADS
        if head.DEFORMABLE_TRANSFORMER_ENCODER_N_HEADS != nheads:
            raise ValueError(
                f"MODEL.SEM_SEG_HEAD.DEFORMABLE_TRANSFORMER_ENCODER_N_HEADS={head.DEFORMABLE_TRANSFORMER_ENCODER_N_HEADS} "
                f"differs from MODEL.MASK_FORMER.NHEADS={nheads}: the encoder takes its heads from "
                "MODEL.MASK_FORMER.NHEADS, as the official code; set both to the same value"
            )
        self.transformer = MSDeformAttnTransformerEncoderOnly(
            d_model=conv_dim,
            dropout=cfg.MODEL.MASK_FORMER.DROPOUT,
            nhead=nheads,
            dim_feedforward=head.DEFORMABLE_TRANSFORMER_ENCODER_DIM_FEEDFORWARD,
            num_encoder_layers=head.TRANSFORMER_ENC_LAYERS,
            num_feature_levels=self.transformer_num_feature_levels,
            enc_n_points=head.DEFORMABLE_TRANSFORMER_ENCODER_N_POINTS,
            impl=head.DEFORMABLE_ATTENTION_IMPL,
        )
        self.pe_layer = PositionEmbeddingSine(conv_dim // 2, normalize=True)

        self.mask_dim = mask_dim
        self.mask_features = nn.Conv2d(conv_dim, mask_dim, kernel_size=1, stride=1, padding=0)
        c2_xavier_fill(self.mask_features)

        self.maskformer_num_feature_levels = 3  # the transformer decoder always reads 3 scales
        self.common_stride = head.COMMON_STRIDE
        # FPN levels below the encoder's finest stride, down to the common stride (res2 for 8 -> 4)
        stride = min(self.transformer_feature_strides)
        self.num_fpn_levels = int(round(math.log2(stride) - math.log2(self.common_stride)))
        if self.num_fpn_levels < 0:
            raise ValueError(
                f"MODEL.SEM_SEG_HEAD.COMMON_STRIDE={self.common_stride} is coarser than the encoder's finest stride {stride}"
            )
        lateral_convs, output_convs = [], []
        use_bias = norm == ""
        for idx, in_channels in enumerate(self.feature_channels[: self.num_fpn_levels]):
            lateral_conv = Conv2dNormAct(in_channels, conv_dim, kernel_size=1, bias=use_bias, norm=get_norm(norm, conv_dim))
            output_conv = Conv2dNormAct(
                conv_dim,
                conv_dim,
                kernel_size=3,
                stride=1,
                padding=1,
                bias=use_bias,
                norm=get_norm(norm, conv_dim),
                activation=F.relu,
            )
            c2_xavier_fill(lateral_conv)
            c2_xavier_fill(output_conv)
            self.add_module(f"adapter_{idx + 1}", lateral_conv)
            self.add_module(f"layer_{idx + 1}", output_conv)
            lateral_convs.append(lateral_conv)
            output_convs.append(output_conv)
        # top-down order (low -> high resolution); plain lists so the modules keep their official names
        self.lateral_convs = lateral_convs[::-1]
        self.output_convs = output_convs[::-1]

    # ------------------------------------------------------------------ pieces
    @property
    def num_encoder_layers(self) -> int:
        """K, the number of encoder layers (the deepest exit)."""
        return self.transformer.num_layers

    def _check_exit(self, exit_layer: Optional[int]) -> int:
        if exit_layer is None:
            return self.num_encoder_layers
        k = int(exit_layer)
        if k != exit_layer or not 1 <= k <= self.num_encoder_layers:
            raise ValueError(f"exit_layer must be an int in 1..{self.num_encoder_layers} or None, got {exit_layer!r}")
        return k

    def _check_features(self, features: Mapping[str, torch.Tensor]) -> None:
        missing = [f for f in self.in_features if f not in features]
        if missing:
            raise KeyError(f"pixel decoder needs features {self.in_features}; missing {missing} (got {sorted(features)})")

    @_fp32
    def project_inputs(self, features: Mapping[str, torch.Tensor]) -> EncoderInputs:
        """Project res5/res4/res3 to CONVS_DIM and flatten them into the encoder's token sequence.

        The result's ``s1`` is the res5 level after ``input_proj`` (B, C, H5, W5): ECO-M2F's gate input.
        """
        self._check_features(features)
        srcs, pos = [], []
        # low -> high resolution
        for idx, f in enumerate(self.transformer_in_features[::-1]):
            x = features[f].float() if self.fp32 else features[f]
            srcs.append(self.input_proj[idx](x))
            pos.append(self.pe_layer(x))
        return self.transformer.prepare(srcs, pos)

    def run_encoder(self, inputs: EncoderInputs, src: Optional[torch.Tensor] = None, start: int = 0, stop: Optional[int] = None) -> torch.Tensor:
        """Encoder layers ``start+1 .. stop`` (1-based) on ``src`` (default: the projected tokens): (B, S, C)."""
        return self.transformer.encoder.run_layers(inputs.src if src is None else src, inputs, start, stop)

    @_fp32
    def decode_encoder_output(
        self,
        features: Mapping[str, torch.Tensor],
        memory: torch.Tensor,
        spatial_shapes: Sequence[Tuple[int, int]],
    ) -> PixelDecoderOutput:
        """The part after the encoder: split tokens into maps, FPN step with res2, mask features.

        memory: (B, S, C) encoder output; features: the backbone maps of the same B images.
        """
        bs = memory.shape[0]
        sizes = [h * w for h, w in spatial_shapes]
        out = [
            # (B, H*W, C) -> (B, C, H, W)
            z.transpose(1, 2).reshape(bs, -1, h, w)
            for z, (h, w) in zip(torch.split(memory, sizes, dim=1), spatial_shapes)
        ]
        # extra FPN levels, low -> high resolution
        for idx, f in enumerate(self.in_features[: self.num_fpn_levels][::-1]):
            x = features[f].float() if self.fp32 else features[f]
            cur_fpn = self.lateral_convs[idx](x)
            y = cur_fpn + F.interpolate(out[-1], size=cur_fpn.shape[-2:], mode="bilinear", align_corners=False)
            out.append(self.output_convs[idx](y))
        multi_scale_features = out[: self.maskformer_num_feature_levels]
        return self.mask_features(out[-1]), out[0], multi_scale_features

    # ------------------------------------------------------------------ forwards
    @_fp32
    def forward_features(
        self,
        features: Mapping[str, torch.Tensor],
        exit_layer: Optional[int] = None,
        inputs: Optional[EncoderInputs] = None,
    ) -> PixelDecoderOutput:
        """Official output triple; ``exit_layer`` k runs only encoder layers 1..k (None: all).

        ``inputs``: ``project_inputs(features)`` when the caller already has it (e.g. for the gate).
        """
        k = self._check_exit(exit_layer)
        inputs = self.project_inputs(features) if inputs is None else inputs
        memory = self.run_encoder(inputs, stop=k)
        return self.decode_encoder_output(features, memory, inputs.spatial_shapes)

    @_fp32
    def forward_features_multi_exit(
        self,
        features: Mapping[str, torch.Tensor],
        exits: Sequence[int],
        inputs: Optional[EncoderInputs] = None,
    ) -> Dict[int, PixelDecoderOutput]:
        """One cumulative encoder pass; at each exit k the rest of the decoder branches off.

        Returns {k: triple} for the distinct exits in increasing order; equals
        ``forward_features(features, exit_layer=k)`` for each k. ``inputs`` as in forward_features.
        """
        ks = sorted({self._check_exit(k) for k in exits})
        if not ks:
            raise ValueError("forward_features_multi_exit needs at least one exit")
        inputs = self.project_inputs(features) if inputs is None else inputs
        results: Dict[int, PixelDecoderOutput] = {}
        src, done = inputs.src, 0
        for k in ks:
            src = self.run_encoder(inputs, src, start=done, stop=k)
            done = k
            results[k] = self.decode_encoder_output(features, src, inputs.spatial_shapes)
        return results

    @_fp32
    def forward_features_per_image_exit(
        self,
        features: Mapping[str, torch.Tensor],
        exit_per_image: torch.Tensor,
        inputs: Optional[EncoderInputs] = None,
    ) -> PixelDecoderOutput:
        """Image b leaves the encoder after ``exit_per_image[b]`` layers; no encoder compute is spent on it after.

        Finished images are dropped from the running batch at their exit; their tokens are
        kept and put back in batch order before the (per-image) rest of the decoder.
        ``inputs`` as in forward_features.
        """
        exits_t = torch.as_tensor(exit_per_image)
        bs = next(iter(features.values())).shape[0] if features else 0
        if exits_t.dim() != 1 or exits_t.numel() != bs:
            raise ValueError(f"exit_per_image must be a 1-D tensor of {bs} exits (one per image), got shape {tuple(exits_t.shape)}")
        if bs == 0:
            raise ValueError("forward_features_per_image_exit needs at least one image")
        exits = [self._check_exit(int(k)) for k in exits_t.tolist()]
        inputs = self.project_inputs(features) if inputs is None else inputs
        if inputs.batch_size != bs:
            raise ValueError(f"inputs hold {inputs.batch_size} images, features {bs}")
        device = inputs.src.device

        active = list(range(bs))  # batch positions still in the encoder
        running, src = inputs, inputs.src
        finished_idx: List[int] = []
        finished_tokens: List[torch.Tensor] = []
        for depth in range(1, max(exits) + 1):
            src = self.run_encoder(running, src, start=depth - 1, stop=depth)
            leave = [i for i, b in enumerate(active) if exits[b] == depth]
            if not leave:
                continue
            finished_idx.extend(active[i] for i in leave)
            finished_tokens.append(src[torch.as_tensor(leave, device=device)])
            stay = [i for i, b in enumerate(active) if exits[b] != depth]
            if not stay:
                break
            stay_t = torch.as_tensor(stay, device=device)
            running, src = running.select(stay_t), src.index_select(0, stay_t)
            active = [active[i] for i in stay]
        # back to batch order: row j of the concatenation belongs to image finished_idx[j]
        order = torch.as_tensor(finished_idx, device=device).argsort()
        memory = torch.cat(finished_tokens, 0).index_select(0, order)
        return self.decode_encoder_output(features, memory, inputs.spatial_shapes)

    def forward(self, features: Mapping[str, torch.Tensor], exit_layer: Optional[int] = None) -> PixelDecoderOutput:
        return self.forward_features(features, exit_layer)
