"""Swin Transformer backbone (``MODEL.SWIN.*``, Detectron2 name ``D2SwinTransformer``) on timm's modules.

The parameters live in timm's ``SwinTransformer`` modules (patch embedding, stages with patch
merging, blocks with window attention and relative position bias), so timm's ImageNet weights
load as they are. The forward pass follows the Swin *segmentation* backbone that Mask2Former
uses, which differs from timm's classification forward in ways that change the numbers:

* any input size divisible by 32 (the input is padded to 32 by :class:`Backbone`), without
  resizing windows: every block uses the configured window (7) and every odd block the shift
  ``window // 2``, even when a stage's feature map is smaller than one window;
* in every block, after ``norm1``, the feature map is zero-padded at the bottom/right to a
  multiple of the window, *then* cyclically shifted; the shifted-window attention mask is built
  for the padded size (regions ``[0, Hp-w)``, ``[Hp-w, Hp-s)``, ``[Hp-s, Hp)``, -100 between
  regions) once per stage and forward. (timm shifts before padding, which differs whenever the
  map is not a multiple of the window, e.g. 256 / 7 for a 1024 input);
* an output LayerNorm per stage (``norm0``..``norm3``, Detectron2's names) on res2..res5;
* optional absolute position embedding (``APE``), bicubically resized to the input;
* ``QK_SCALE`` overrides the attention scale ``head_dim ** -0.5``.

Buffers ``relative_position_index`` (per window size) and the attention masks (per input size)
are recomputed, not stored: they are dropped from loaded checkpoints (see :mod:`.key_maps`).
``MODEL.BACKBONE.FREEZE_AT`` is not used by this backbone (as in Mask2Former).
"""
from __future__ import annotations

from typing import Mapping, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint as tcp
from timm.layers import DropPath, trunc_normal_
from timm.models.swin_transformer import SwinTransformer, window_partition, window_reverse

from ..registry import BACKBONE_REGISTRY, ShapeSpec
from .base import Backbone, load_timm_pretrained
from .key_maps import map_swin_state_dict

__all__ = ["SwinBackbone", "D2SwinTransformer", "shifted_window_mask", "timm_swin_pretrained_name"]

_STAGES = ("res2", "res3", "res4", "res5")

# (EMBED_DIM, DEPTHS, WINDOW_SIZE, PRETRAIN_IMG_SIZE) -> timm weights Mask2Former's backbones start from
# (Swin-B/L: ImageNet-22k, as Mask2Former's best models).
_TIMM_SWIN_WEIGHTS = {
    (96, (2, 2, 6, 2), 7, 224): "swin_tiny_patch4_window7_224.ms_in1k",
    (96, (2, 2, 18, 2), 7, 224): "swin_small_patch4_window7_224.ms_in1k",
    (128, (2, 2, 18, 2), 7, 224): "swin_base_patch4_window7_224.ms_in22k",
    (128, (2, 2, 18, 2), 12, 384): "swin_base_patch4_window12_384.ms_in22k",
    (192, (2, 2, 18, 2), 7, 224): "swin_large_patch4_window7_224.ms_in22k",
    (192, (2, 2, 18, 2), 12, 384): "swin_large_patch4_window12_384.ms_in22k",
}


def timm_swin_pretrained_name(embed_dim: int, depths: Sequence[int], window_size: int, img_size: int) -> str:
    """timm's pretrained tag for a Swin configuration (ValueError if timm has none)."""
    key = (embed_dim, tuple(depths), window_size, img_size)
    if key not in _TIMM_SWIN_WEIGHTS:
        raise ValueError(
            f"MODEL.BACKBONE.PRETRAINED: no timm ImageNet weights for Swin EMBED_DIM={embed_dim} DEPTHS={list(depths)} "
            f"WINDOW_SIZE={window_size} PRETRAIN_IMG_SIZE={img_size}; known: {sorted(_TIMM_SWIN_WEIGHTS)}"
        )
    return _TIMM_SWIN_WEIGHTS[key]


def shifted_window_mask(
    height: int,
    width: int,
    window: tuple[int, int],
    shift: tuple[int, int],
    device: torch.device | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Attention mask (num_windows x N x N, 0 / -100) of shifted windows on a padded Hp x Wp map.

    After the cyclic shift, tokens that came from different regions of the un-shifted map must
    not attend to each other: label the three row bands and three column bands and forbid pairs
    with different labels.
    """
    labels = torch.zeros((1, height, width, 1), device=device, dtype=dtype)
    count = 0
    for rows in (slice(0, -window[0]), slice(-window[0], -shift[0]), slice(-shift[0], None)):
        for cols in (slice(0, -window[1]), slice(-window[1], -shift[1]), slice(-shift[1], None)):
            labels[:, rows, cols, :] = count
            count += 1
    windows = window_partition(labels, window).view(-1, window[0] * window[1])  # nW x N
    diff = windows.unsqueeze(1) - windows.unsqueeze(2)  # nW x N x N
    return diff.masked_fill(diff != 0, -100.0).masked_fill(diff == 0, 0.0)


class SwinBackbone(Backbone):
    """Swin-T/S/B/L with res2..res5 outputs (strides 4, 8, 16, 32; channels C, 2C, 4C, 8C)."""

    def __init__(
        self,
        pretrain_img_size: int = 224,
        patch_size: int = 4,
        in_channels: int = 3,
        embed_dim: int = 96,
        depths: Sequence[int] = (2, 2, 6, 2),
        num_heads: Sequence[int] = (3, 6, 12, 24),
        window_size: int = 7,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        qk_scale: Optional[float] = None,
        drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        drop_path_rate: float = 0.3,
        ape: bool = False,
        patch_norm: bool = True,
        out_features: Sequence[str] = _STAGES,
        use_checkpoint: bool = False,
    ) -> None:
        super().__init__()
        if len(depths) != 4 or len(num_heads) != 4:
            raise ValueError(f"MODEL.SWIN.DEPTHS/NUM_HEADS need 4 stages, got {list(depths)} / {list(num_heads)}")
        unknown = [f for f in out_features if f not in _STAGES]
        if unknown or not out_features:
            raise ValueError(f"MODEL.SWIN.OUT_FEATURES {list(out_features)}: unknown {unknown}; use {list(_STAGES)}")
        if 32 % patch_size:
            raise ValueError(f"MODEL.SWIN.PATCH_SIZE must divide 32, got {patch_size}")
        self._in_channels = in_channels
        self.embed_dim = embed_dim
        self.depths = tuple(depths)
        self.window_size = window_size
        self.pretrain_img_size = pretrain_img_size
        self.qk_scale = qk_scale
        self.use_checkpoint = use_checkpoint
        self.ape = ape

        net = SwinTransformer(
            img_size=pretrain_img_size,
            patch_size=patch_size,
            in_chans=in_channels,
            num_classes=0,
            global_pool="",
            embed_dim=embed_dim,
            depths=tuple(depths),
            num_heads=tuple(num_heads),
            window_size=window_size,
            always_partition=True,  # keep the configured window/shift at every feature size
            strict_img_size=False,  # no fixed input size, no precomputed attention masks
            mlp_ratio=mlp_ratio,
            qkv_bias=qkv_bias,
            proj_drop_rate=drop_rate,
            attn_drop_rate=attn_drop_rate,
            drop_path_rate=0.0,  # set below, linearly over all blocks as in Swin
        )
        self.patch_embed = net.patch_embed
        if not patch_norm:
            self.patch_embed.norm = nn.Identity()
        if ape:
            grid = pretrain_img_size // patch_size
            self.absolute_pos_embed = nn.Parameter(torch.zeros(1, embed_dim, grid, grid))
            trunc_normal_(self.absolute_pos_embed, std=0.02)
        self.pos_drop = nn.Dropout(p=drop_rate)
        self.layers = net.layers
        del net

        total = sum(depths)  # stochastic depth grows linearly over all blocks, 0 -> drop_path_rate
        rates = [drop_path_rate * i / (total - 1) if total > 1 else 0.0 for i in range(total)]
        blocks = [blk for stage in self.layers for blk in stage.blocks]
        for blk, rate in zip(blocks, rates):
            blk.drop_path1 = DropPath(rate) if rate > 0 else nn.Identity()
            blk.drop_path2 = DropPath(rate) if rate > 0 else nn.Identity()

        channels = [embed_dim * 2**i for i in range(4)]
        for i, ch in enumerate(channels):
            self.add_module(f"norm{i}", nn.LayerNorm(ch))
        self._out_features = list(out_features)
        self._out_feature_channels = {name: channels[_STAGES.index(name)] for name in self._out_features}
        self._out_feature_strides = {name: patch_size * 2 ** _STAGES.index(name) for name in self._out_features}


    def load_pretrained(self) -> "SwinBackbone":
        """timm's ImageNet weights of this Swin (``MODEL.BACKBONE.PRETRAINED``, read by the builder)."""
        name = timm_swin_pretrained_name(self.embed_dim, self.depths, self.window_size, self.pretrain_img_size)
        load_timm_pretrained(self, name)
        return self

    # ------------------------------------------------------------------ forward

    def _window_attention(self, attn: nn.Module, x: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
        """Multi-head self-attention inside windows with relative position bias (+ shift mask).

        x: (B * nW) x N x C with N = window area; mask: nW x N x N or None.
        """
        bw, n, c = x.shape
        heads = attn.num_heads
        qkv = attn.qkv(x).reshape(bw, n, 3, heads, -1).permute(2, 0, 3, 1, 4)  # 3 x BnW x heads x N x d
        q, k, v = qkv.unbind(0)
        table = attn.relative_position_bias_table  # (2w-1)^2 x heads
        bias = table[attn.relative_position_index.view(-1)].view(n, n, heads).permute(2, 0, 1)  # heads x N x N
        if mask is None:
            bias = bias.unsqueeze(0)  # 1 x heads x N x N (broadcast over windows)
        else:
            nw = mask.shape[0]
            bias = bias.unsqueeze(0) + mask.unsqueeze(1)  # nW x heads x N x N
            bias = bias.unsqueeze(0).expand(bw // nw, -1, -1, -1, -1).reshape(bw, heads, n, n)
        scale = self.qk_scale if self.qk_scale is not None else attn.scale
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=bias.to(q.dtype), dropout_p=attn.attn_drop.p if self.training else 0.0, scale=scale
        )
        out = out.transpose(1, 2).reshape(bw, n, -1)  # BnW x N x C
        return attn.proj_drop(attn.proj(out))

    def _block(self, blk: nn.Module, x: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
        """One Swin block on B x H x W x C: pad to the window, shift, window attention, unshift, crop; MLP."""
        b, h, w, c = x.shape
        win, shift = tuple(blk.window_size), tuple(blk.shift_size)
        y = blk.norm1(x)
        pad_b = (win[0] - h % win[0]) % win[0]
        pad_r = (win[1] - w % win[1]) % win[1]
        y = F.pad(y, (0, 0, 0, pad_r, 0, pad_b))
        hp, wp = h + pad_b, w + pad_r
        shifted = any(shift)
        if shifted:
            y = torch.roll(y, shifts=(-shift[0], -shift[1]), dims=(1, 2))
        windows = window_partition(y, win).view(-1, win[0] * win[1], c)  # (B*nW) x N x C
        windows = self._window_attention(blk.attn, windows, mask if shifted else None)
        y = window_reverse(windows.view(-1, win[0], win[1], c), win, hp, wp)  # B x Hp x Wp x C
        if shifted:
            y = torch.roll(y, shifts=shift, dims=(1, 2))
        y = y[:, :h, :w, :]
        x = x + blk.drop_path1(y)
        x = x + blk.drop_path2(blk.mlp(blk.norm2(x)))
        return x

    def _stage_mask(self, stage: nn.Module, x: torch.Tensor) -> Optional[torch.Tensor]:
        """The shift mask of a stage for the current (padded) feature size, or None without shifts."""
        shifted = [blk for blk in stage.blocks if any(blk.shift_size)]
        if not shifted:
            return None
        win, shift = tuple(shifted[0].window_size), tuple(shifted[0].shift_size)
        h, w = x.shape[1:3]
        hp = -(-h // win[0]) * win[0]
        wp = -(-w // win[1]) * win[1]
        return shifted_window_mask(hp, wp, win, shift, device=x.device, dtype=x.dtype)

    def forward_features(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        x = self.patch_embed(x)  # B x H/4 x W/4 x C (NHWC)
        if self.ape:
            pos = F.interpolate(self.absolute_pos_embed, size=x.shape[1:3], mode="bicubic")
            x = x + pos.permute(0, 2, 3, 1)
        x = self.pos_drop(x)
        outputs: dict[str, torch.Tensor] = {}
        last = max(_STAGES.index(f) for f in self._out_features)
        for i, stage in enumerate(self.layers):
            if i > last:
                break
            x = stage.downsample(x)  # patch merging (Identity in stage 0)
            mask = self._stage_mask(stage, x)
            for blk in stage.blocks:
                if self.use_checkpoint and self.training and torch.is_grad_enabled():
                    x = tcp.checkpoint(self._block, blk, x, mask, use_reentrant=False)
                else:
                    x = self._block(blk, x, mask)
            name = _STAGES[i]
            if name in self._out_features:
                out = getattr(self, f"norm{i}")(x)
                outputs[name] = out.permute(0, 3, 1, 2).contiguous()  # B x C x H x W
        return outputs

    # ------------------------------------------------------------------ checkpoints

    def checkpoint_key_map(self, state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Detectron2 / original Swin / timm names -> ours (see :mod:`.key_maps`)."""
        return map_swin_state_dict(state_dict)

    def keys_not_in_pretrained_weights(self) -> set[str]:
        """The per-stage output norms exist only in detection/segmentation checkpoints."""
        return {f"norm{i}.{p}" for i in range(4) for p in ("weight", "bias")}


@BACKBONE_REGISTRY.register()
def D2SwinTransformer(cfg, input_shape: ShapeSpec) -> SwinBackbone:  # noqa: N802  (Mask2Former's registered name)
    """Mask2Former's registered Swin backbone: a SwinBackbone from ``MODEL.SWIN.*``, with timm's
    ImageNet weights when ``MODEL.BACKBONE.PRETRAINED`` (read here, not in the constructor)."""
    s = cfg.MODEL.SWIN
    backbone = SwinBackbone(
        pretrain_img_size=s.PRETRAIN_IMG_SIZE,
        patch_size=s.PATCH_SIZE,
        in_channels=input_shape.channels or 3,
        embed_dim=s.EMBED_DIM,
        depths=list(s.DEPTHS),
        num_heads=list(s.NUM_HEADS),
        window_size=s.WINDOW_SIZE,
        mlp_ratio=s.MLP_RATIO,
        qkv_bias=s.QKV_BIAS,
        qk_scale=s.QK_SCALE,
        drop_rate=s.DROP_RATE,
        attn_drop_rate=s.ATTN_DROP_RATE,
        drop_path_rate=s.DROP_PATH_RATE,
        ape=s.APE,
        patch_norm=s.PATCH_NORM,
        out_features=list(s.OUT_FEATURES),
        use_checkpoint=s.USE_CHECKPOINT,
    )
    return backbone.load_pretrained() if cfg.MODEL.BACKBONE.PRETRAINED else backbone
