"""The deformable-attention transformer encoder of Mask2Former's pixel decoder, runnable layer by layer.

Every layer maps the same token sequence (all levels concatenated) to a sequence of the
same length, so stopping after layer k (an ECO-M2F exit) only skips the layers after it.
``EncoderInputs`` holds what all layers share (positions, reference points, shapes), so a
caller can run layers [start, stop) on any subset of the batch and continue later.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from ..activation import get_activation
from .ms_deform_attn import MSDeformAttn

__all__ = [
    "EncoderInputs",
    "MSDeformAttnEncoder",
    "MSDeformAttnEncoderLayer",
    "MSDeformAttnTransformerEncoderOnly",
]



def _activation(name: str):
    return get_activation(name, "encoder activation")


class MSDeformAttnEncoderLayer(nn.Module):
    """Post-norm layer: x = LN(x + MSDeformAttn(x + pos)); x = LN(x + FFN(x))."""

    def __init__(
        self,
        d_model: int = 256,
        d_ffn: int = 1024,
        dropout: float = 0.1,
        activation: str = "relu",
        n_levels: int = 4,
        n_heads: int = 8,
        n_points: int = 4,
        impl: str = "auto",
    ) -> None:
        super().__init__()
        # self attention
        self.self_attn = MSDeformAttn(d_model, n_levels, n_heads, n_points, impl=impl)
        self.dropout1 = nn.Dropout(dropout)
        self.norm1 = nn.LayerNorm(d_model)
        # ffn
        self.linear1 = nn.Linear(d_model, d_ffn)
        self.activation = _activation(activation)
        self.dropout2 = nn.Dropout(dropout)
        self.linear2 = nn.Linear(d_ffn, d_model)
        self.dropout3 = nn.Dropout(dropout)
        self.norm2 = nn.LayerNorm(d_model)

    def forward_ffn(self, src: torch.Tensor) -> torch.Tensor:
        src2 = self.linear2(self.dropout2(self.activation(self.linear1(src))))
        return self.norm2(src + self.dropout3(src2))

    def forward(
        self,
        src: torch.Tensor,
        pos: Optional[torch.Tensor],
        reference_points: torch.Tensor,
        spatial_shapes,
        level_start_index: Optional[torch.Tensor] = None,
        padding_mask: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """src, pos: (B, S, C); reference_points: (B or 1, S, L, 2). Returns (B, S, C)."""
        query = src if pos is None else src + pos
        src2 = self.self_attn(query, reference_points, src, spatial_shapes, level_start_index, padding_mask)
        src = self.norm1(src + self.dropout1(src2))
        return self.forward_ffn(src)


@dataclass
class EncoderInputs:
    """Everything the encoder layers need, for a batch of B images (levels ordered low -> high resolution).

    src: (B, S, C) projected tokens of all levels, concatenated (the input of layer 1);
    pos: (B, S, C) sine position code + level embedding; reference_points: (1, S, L, 2)
    (shared by all images: no padding inside a batch); srcs: the projected maps per level
    (B, C, H_l, W_l), ``srcs[0]`` being the res5 level (ECO-M2F's gate input s1).
    """

    src: torch.Tensor
    pos: torch.Tensor
    reference_points: torch.Tensor
    spatial_shapes: List[Tuple[int, int]]
    level_start_index: torch.Tensor
    srcs: List[torch.Tensor]
    padding_mask: Optional[torch.Tensor] = None

    @property
    def s1(self) -> torch.Tensor:
        """The lowest-resolution level after input projection, before the encoder: (B, C, H5, W5)."""
        return self.srcs[0]

    @property
    def batch_size(self) -> int:
        return self.src.shape[0]

    @property
    def spatial_shapes_tensor(self) -> torch.Tensor:
        """(L, 2) int64 (H, W) per level, as the official encoder returns it."""
        return torch.as_tensor(self.spatial_shapes, dtype=torch.long, device=self.src.device)

    def select(self, index: torch.Tensor) -> "EncoderInputs":
        """The same inputs restricted to the images ``index`` (a LongTensor of batch positions)."""
        return replace(
            self,
            src=self.src.index_select(0, index),
            pos=self.pos.index_select(0, index),
            srcs=[s.index_select(0, index) for s in self.srcs],
            padding_mask=None if self.padding_mask is None else self.padding_mask.index_select(0, index),
        )


class MSDeformAttnEncoder(nn.Module):
    """A stack of ``MSDeformAttnEncoderLayer`` s (parameter names ``layers.N.*``)."""

    def __init__(self, layers: Sequence[nn.Module]) -> None:
        super().__init__()
        self.layers = nn.ModuleList(layers)
        self.num_layers = len(self.layers)

    @staticmethod
    def get_reference_points(
        spatial_shapes: Sequence[Tuple[int, int]],
        valid_ratios: Optional[torch.Tensor],
        device: torch.device,
    ) -> torch.Tensor:
        """Pixel centres of every level as (x, y) in [0, 1]; (B, S, L, 2), B = 1 without valid ratios.

        valid_ratios: (B, L, 2) fraction (w, h) of each level not covered by padding.
        """
        refs = []
        for lvl, (h, w) in enumerate(spatial_shapes):
            ref_y, ref_x = torch.meshgrid(
                torch.linspace(0.5, h - 0.5, h, dtype=torch.float32, device=device),
                torch.linspace(0.5, w - 0.5, w, dtype=torch.float32, device=device),
                indexing="ij",
            )
            if valid_ratios is None:
                ref_y = ref_y.reshape(-1)[None] / h
                ref_x = ref_x.reshape(-1)[None] / w
            else:
                ref_y = ref_y.reshape(-1)[None] / (valid_ratios[:, None, lvl, 1] * h)
                ref_x = ref_x.reshape(-1)[None] / (valid_ratios[:, None, lvl, 0] * w)
            refs.append(torch.stack((ref_x, ref_y), -1))
        # (B, S, 2) -> (B, S, L, 2): the same point expressed on every level
        reference_points = torch.cat(refs, 1)[:, :, None]
        if valid_ratios is None:
            return reference_points.expand(-1, -1, len(spatial_shapes), -1)
        return reference_points * valid_ratios[:, None]

    def run_layers(self, src: torch.Tensor, inputs: EncoderInputs, start: int = 0, stop: Optional[int] = None) -> torch.Tensor:
        """Apply layers ``start .. stop-1`` (0-based) to ``src`` (B, S, C); ``inputs`` must hold the same images."""
        stop = self.num_layers if stop is None else stop
        if not 0 <= start <= stop <= self.num_layers:
            raise ValueError(f"encoder layer range [{start}, {stop}) outside the {self.num_layers} layers")
        for layer in self.layers[start:stop]:
            src = layer(
                src, inputs.pos, inputs.reference_points, inputs.spatial_shapes, inputs.level_start_index, inputs.padding_mask
            )
        return src

    def forward(self, inputs: EncoderInputs, num_layers: Optional[int] = None) -> torch.Tensor:
        """The output of the first ``num_layers`` layers (all when None): (B, S, C)."""
        return self.run_layers(inputs.src, inputs, 0, num_layers)


class MSDeformAttnTransformerEncoderOnly(nn.Module):
    """Level embedding + encoder (parameter names ``level_embed``, ``encoder.layers.N.*`` as the official one)."""

    def __init__(
        self,
        d_model: int = 256,
        nhead: int = 8,
        num_encoder_layers: int = 6,
        dim_feedforward: int = 1024,
        dropout: float = 0.1,
        activation: str = "relu",
        num_feature_levels: int = 4,
        enc_n_points: int = 4,
        impl: str = "auto",
    ) -> None:
        super().__init__()
        self.d_model = d_model
        self.nhead = nhead
        self.num_feature_levels = num_feature_levels
        self.encoder = MSDeformAttnEncoder(
            [
                MSDeformAttnEncoderLayer(
                    d_model, dim_feedforward, dropout, activation, num_feature_levels, nhead, enc_n_points, impl=impl
                )
                for _ in range(num_encoder_layers)
            ]
        )
        self.level_embed = nn.Parameter(torch.empty(num_feature_levels, d_model))
        self._reset_parameters()

    def _reset_parameters(self) -> None:
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)
        for m in self.modules():
            if isinstance(m, MSDeformAttn):
                m._reset_parameters()
        nn.init.normal_(self.level_embed)

    @property
    def num_layers(self) -> int:
        return self.encoder.num_layers

    def prepare(self, srcs: Sequence[torch.Tensor], pos_embeds: Sequence[torch.Tensor]) -> EncoderInputs:
        """Flatten the levels into one token sequence and compute what every layer shares.

        srcs, pos_embeds: per level (B, C, H_l, W_l), low -> high resolution.
        """
        if len(srcs) != self.num_feature_levels or len(pos_embeds) != self.num_feature_levels:
            raise ValueError(
                f"encoder built for {self.num_feature_levels} levels, got {len(srcs)} maps and {len(pos_embeds)} position codes"
            )
        src_flatten, pos_flatten, spatial_shapes = [], [], []
        for lvl, (src, pos_embed) in enumerate(zip(srcs, pos_embeds)):
            _, _, h, w = src.shape
            spatial_shapes.append((h, w))
            # (B, C, H, W) -> (B, H*W, C)
            src_flatten.append(src.flatten(2).transpose(1, 2))
            pos_flatten.append(pos_embed.flatten(2).transpose(1, 2) + self.level_embed[lvl].view(1, 1, -1))
        src_all = torch.cat(src_flatten, 1)
        sizes = torch.as_tensor([h * w for h, w in spatial_shapes], dtype=torch.long, device=src_all.device)
        level_start_index = torch.cat((sizes.new_zeros((1,)), sizes.cumsum(0)[:-1]))
        return EncoderInputs(
            src=src_all,
            pos=torch.cat(pos_flatten, 1),
            reference_points=MSDeformAttnEncoder.get_reference_points(spatial_shapes, None, src_all.device),
            spatial_shapes=spatial_shapes,
            level_start_index=level_start_index,
            srcs=list(srcs),
        )

    def forward(
        self, srcs: Sequence[torch.Tensor], pos_embeds: Sequence[torch.Tensor], num_layers: Optional[int] = None
    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(memory (B, S, C), spatial_shapes (L, 2), level_start_index (L,)), as the official encoder returns."""
        inputs = self.prepare(srcs, pos_embeds)
        memory = self.encoder(inputs, num_layers)
        return memory, inputs.spatial_shapes_tensor, inputs.level_start_index
