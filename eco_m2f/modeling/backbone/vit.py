"""Plain Vision Transformer backbone (``MODEL.VIT.*``, registered as ``build_vit_backbone``) on timm's modules.

The parameters are timm's ``VisionTransformer`` parts under timm's names (``patch_embed.proj``,
``cls_token``, [``dist_token``], ``pos_embed``, ``blocks.i.*``, ``norm``), so timm's ImageNet
weights and the encoder of official Segmenter checkpoints load as they are. This module owns
the block loop, so that token-reduction methods can act between blocks with the same parts:

* :meth:`ViTBackbone.prepare_tokens`: patch embedding + prefix tokens + position embedding
  resized **bilinearly** to the input's grid (as Segmenter; any input size, non-square too);
* :attr:`ViTBackbone.blocks` (``nn.ModuleList`` of timm ``Block``), :attr:`ViTBackbone.norm`;
* :meth:`ViTBackbone.position_embedding`: the (resized) position embedding of any grid;
* :meth:`ViTBackbone.forward`: the plain dense loop, returning :class:`ViTFeatures`.

Token sequences are batch-first, prefix tokens (class token, then distillation token) first,
then the patches in row-major order of the grid.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import partial
from typing import Dict, Mapping, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint as tcp

from ..registry import BACKBONE_REGISTRY, ShapeSpec
from .base import load_timm_pretrained, pad_to_multiple

__all__ = ["ViTBackbone", "ViTFeatures", "build_vit_backbone", "resize_position_embedding"]

#: Checkpoint keys of timm's ImageNet classifiers, which the backbone has no use for.
_CLASSIFIER_PREFIXES = ("head.", "head_dist.")


@dataclass
class ViTFeatures:
    """What the encoder hands to the decode heads.

    Attributes:
        tokens: B x N x C final patch tokens, after the encoder's ``norm`` (prefix tokens removed).
        prefix: B x P x C final prefix tokens (class token first), after ``norm``.
        layers: block index (0-based) -> B x N x C raw output of that block (no norm, prefix
            removed), for every index of ``out_indices``.
        grid: (h, w) patch grid of the padded input.
        padding_mask: B x N bool, True where a sequence slot holds no token (a batch whose
            images keep different numbers of tokens); None when every image has all h*w
            patches in row-major order (the dense case).
        lengths: with ``padding_mask``, the number of real tokens of each image as host
            integers (what the mask says, known without asking the GPU), so that a head can
            run on the packed tokens alone; None where unknown.
    """

    tokens: torch.Tensor
    prefix: torch.Tensor
    grid: Tuple[int, int]
    layers: Dict[int, torch.Tensor] = field(default_factory=dict)
    padding_mask: Optional[torch.Tensor] = None
    lengths: Optional[Tuple[int, ...]] = None

    @property
    def dense(self) -> bool:
        """True when the tokens are the full h x w grid in row-major order."""
        return self.padding_mask is None and self.tokens.shape[1] == self.grid[0] * self.grid[1]


def resize_position_embedding(
    pos_embed: torch.Tensor, old_grid: Sequence[int], new_grid: Sequence[int], num_prefix_tokens: int
) -> torch.Tensor:
    """1 x (P + h0*w0) x C -> 1 x (P + h*w) x C: the patch part resized bilinearly, the prefix kept.

    Bilinear without antialiasing and without corner alignment, as Segmenter resizes it.
    """
    from timm.layers import resample_abs_pos_embed

    if tuple(old_grid) == tuple(new_grid):
        return pos_embed
    return resample_abs_pos_embed(
        pos_embed, list(new_grid), list(old_grid), num_prefix_tokens=num_prefix_tokens,
        interpolation="bilinear", antialias=False,
    )


def _is_patchify(conv: nn.Module, patch: int) -> bool:
    """True for a p x p convolution of stride p without padding, dilation or groups: one
    output per non-overlapping patch, i.e. a linear map of each patch."""
    return (
        isinstance(conv, nn.Conv2d) and tuple(conv.kernel_size) == (patch, patch) and tuple(conv.stride) == (patch, patch)
        and tuple(conv.padding) == (0, 0) and tuple(conv.dilation) == (1, 1) and conv.groups == 1
        and conv.padding_mode == "zeros"
    )


class ViTBackbone(nn.Module):
    """ViT-Ti/S/B/L (and DeiT) with the block loop in this module.

    Args:
        img_size: input size (square) whose grid the stored ``pos_embed`` covers.
        patch_size, embed_dim, depth, num_heads, mlp_ratio, qkv_bias: the architecture.
        drop_path_rate: stochastic depth, linear from 0 over the blocks.
        ln_eps: LayerNorm epsilon of blocks and final norm (official Segmenter: 1e-5).
        distilled: add a distillation token (DeiT distilled; 2 prefix tokens).
        out_indices: 0-based blocks whose raw outputs :meth:`forward` returns (negative: from the end).
        use_checkpoint: activation checkpointing of each block in training.
        timm_name: build timm's architecture of this name instead (the architecture arguments
            are then not used).
        pretrained: load timm's ImageNet weights of ``timm_name`` (needs network or timm's cache).
    """

    def __init__(
        self,
        img_size: int = 224,
        patch_size: int = 16,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop_path_rate: float = 0.0,
        ln_eps: float = 1e-6,
        distilled: bool = False,
        out_indices: Sequence[int] = (-1,),
        use_checkpoint: bool = False,
        in_channels: int = 3,
        timm_name: str = "",
        pretrained: bool = False,
    ) -> None:
        super().__init__()
        norm_layer = partial(nn.LayerNorm, eps=ln_eps)
        net = self._build_timm(
            timm_name, img_size=img_size, patch_size=patch_size, in_chans=in_channels, embed_dim=embed_dim,
            depth=depth, num_heads=num_heads, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias,
            drop_path_rate=drop_path_rate, norm_layer=norm_layer, distilled=distilled,
        )
        self.patch_embed = net.patch_embed
        self.cls_token = net.cls_token
        self.dist_token = getattr(net, "dist_token", None)
        self.pos_embed = net.pos_embed
        self.blocks = nn.ModuleList(list(net.blocks))
        self.norm = net.norm
        del net

        self.patch_size: int = int(self.patch_embed.patch_size[0])
        if img_size <= 0 or img_size % self.patch_size:
            raise ValueError(f"MODEL.VIT.IMG_SIZE {img_size} must be a positive multiple of the patch size {self.patch_size}")
        self.embed_dim: int = int(self.cls_token.shape[-1])
        self.num_heads: int = int(self.blocks[0].attn.num_heads)
        self.depth: int = len(self.blocks)
        self.num_prefix_tokens: int = 1 + (self.dist_token is not None)
        #: (h0, w0): the grid the stored ``pos_embed`` covers.
        self.pos_grid: Tuple[int, int] = tuple(int(g) for g in self.patch_embed.grid_size)
        self.out_indices: Tuple[int, ...] = self.block_indices(out_indices, "MODEL.VIT.OUT_INDICES")
        self.use_checkpoint = use_checkpoint
        self._in_channels = in_channels
        if pretrained:
            if not timm_name:
                raise ValueError("MODEL.BACKBONE.PRETRAINED needs MODEL.VIT.NAME (the timm model whose weights to load)")
            load_timm_pretrained(self, timm_name)

    # ------------------------------------------------------------------ construction
    @staticmethod
    def _build_timm(timm_name: str, *, distilled: bool, **kwargs) -> nn.Module:
        import timm
        from timm.models.deit import VisionTransformerDistilled
        from timm.models.vision_transformer import VisionTransformer

        if timm_name:
            keep = ("img_size", "drop_path_rate", "norm_layer", "in_chans")
            try:
                net = timm.create_model(timm_name, pretrained=False, num_classes=0, **{k: kwargs[k] for k in keep})
            except (RuntimeError, TypeError) as exc:  # unknown name, or a model without img_size (not a ViT)
                raise ValueError(f"MODEL.VIT.NAME '{timm_name}' is not a timm VisionTransformer ({exc})") from exc
            if not isinstance(net, VisionTransformer):
                raise ValueError(f"MODEL.VIT.NAME '{timm_name}' is a timm {type(net).__name__}, not a VisionTransformer")
            unsupported = [
                what for what, bad in (
                    ("no class token", not net.has_class_token), ("register tokens", net.num_reg_tokens > 0),
                    ("no position embedding of the class token", net.no_embed_class),
                    ("a pre-norm", not isinstance(net.norm_pre, nn.Identity)),
                ) if bad
            ]
            if unsupported:
                raise ValueError(f"MODEL.VIT.NAME '{timm_name}' has {', '.join(unsupported)}: not supported by ViTBackbone")
            return net
        cls = VisionTransformerDistilled if distilled else VisionTransformer
        return cls(num_classes=0, global_pool="token", class_token=True, **kwargs)

    def block_indices(self, indices: Sequence[int], key: str) -> Tuple[int, ...]:
        """Sorted distinct 0-based block indices (negative ones counted from the end); ``key`` names the setting in errors."""
        out = []
        for i in indices:
            j = int(i) + self.depth if int(i) < 0 else int(i)
            if not 0 <= j < self.depth:
                raise ValueError(f"{key} {list(indices)}: {i} is outside the {self.depth} blocks")
            out.append(j)
        return tuple(sorted(set(out)))

    # ------------------------------------------------------------------ tokens
    def position_embedding(self, grid: Tuple[int, int]) -> torch.Tensor:
        """1 x (P + h*w) x C: the prefix tokens' embeddings, then the patches' for an h x w grid
        (row-major), the stored grid resized bilinearly (a no-op for the stored grid)."""
        return resize_position_embedding(self.pos_embed, self.pos_grid, grid, self.num_prefix_tokens)

    def prefix_tokens(self, batch_size: int) -> torch.Tensor:
        """B x P x C class (and distillation) tokens, without position embedding."""
        tokens = [self.cls_token] + ([self.dist_token] if self.dist_token is not None else [])
        return torch.cat(tokens, dim=1).expand(batch_size, -1, -1)

    def prepare_tokens(self, images: torch.Tensor) -> Tuple[torch.Tensor, Tuple[int, int]]:
        """B x 3 x H x W -> (B x (P + h*w) x C tokens with position embedding, grid (h, w)).

        The input is zero-padded at the bottom/right to a multiple of the patch size first.
        """
        if images.dim() != 4 or images.shape[1] != self._in_channels:
            raise ValueError(f"ViTBackbone expects a B x {self._in_channels} x H x W tensor, got {tuple(images.shape)}")
        images = pad_to_multiple(images, self.patch_size)
        x, grid = self.embed_patches(images)  # B x h*w x C
        x = self.patch_embed.norm(x)
        x = torch.cat([self.prefix_tokens(x.shape[0]).to(x.dtype), x], dim=1)  # B x (P + h*w) x C
        return x + self.position_embedding(grid).to(x.dtype), grid

    def embed_patches(self, images: torch.Tensor) -> Tuple[torch.Tensor, Tuple[int, int]]:
        """B x 3 x H x W images (H, W multiples of the patch size) -> (B x h*w x C patch
        embeddings, grid (h, w)), before the embedding's norm.

        The projection is timm's p x p convolution of stride p. It runs as one matrix product on
        the non-overlapping p x p patches: the same arithmetic, but cuDNN's kernel for this
        convolution takes about 1 ms for 8 images of 1024 x 1024 on an H200, the product a tenth.
        """
        proj = self.patch_embed.proj
        p = self.patch_size
        if not _is_patchify(proj, p):
            x = proj(images)  # B x C x h x w
            return x.flatten(2).transpose(1, 2), (int(x.shape[-2]), int(x.shape[-1]))
        b, ch, height, width = images.shape
        h, w = height // p, width // p
        if torch.is_autocast_enabled(images.device.type):  # cast before the re-layout: half the bytes moved
            images = images.to(torch.get_autocast_dtype(images.device.type))
        patches = images.view(b, ch, h, p, w, p).permute(0, 2, 4, 1, 3, 5).reshape(b, h * w, ch * p * p)  # B x h*w x (ch p p)
        return F.linear(patches, proj.weight.flatten(1), proj.bias), (h, w)

    def run_block(self, index: int, tokens: torch.Tensor, attn_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Block ``index`` on B x L x C tokens; ``attn_mask`` as timm's (e.g. B x 1 x 1 x L bool, True = attend)."""
        block = self.blocks[index]
        if self.use_checkpoint and self.training and torch.is_grad_enabled():
            return tcp.checkpoint(block, tokens, attn_mask, use_reentrant=False)
        return block(tokens, attn_mask=attn_mask)

    def forward(self, images: torch.Tensor) -> ViTFeatures:
        """The dense encoder: every patch through every block, then the final norm."""
        x, grid = self.prepare_tokens(images)
        p = self.num_prefix_tokens
        layers: Dict[int, torch.Tensor] = {}
        for i in range(self.depth):
            x = self.run_block(i, x)
            if i in self.out_indices:
                layers[i] = x[:, p:]
        x = self.norm(x)
        return ViTFeatures(tokens=x[:, p:], prefix=x[:, :p], grid=grid, layers=layers)

    def output_shape(self) -> Dict[str, ShapeSpec]:
        """Channels and stride of the final tokens (``"tokens"``) and of every kept block (``"layer{i}"``)."""
        spec = ShapeSpec(channels=self.embed_dim, stride=self.patch_size)
        return {"tokens": spec, **{f"layer{i}": spec for i in self.out_indices}}

    # ------------------------------------------------------------------ optimisation
    def layer_id(self, param_name: str) -> int:
        """Depth of a parameter for layer-wise lr decay: 0 embeddings, i + 1 block i, depth + 1 the rest."""
        if param_name.startswith(("patch_embed.", "cls_token", "dist_token", "pos_embed")):
            return 0
        if param_name.startswith("blocks."):
            return int(param_name.split(".")[1]) + 1
        return self.depth + 1

    # ------------------------------------------------------------------ checkpoints
    def checkpoint_key_map(self, state_dict: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        """timm (and Segmenter encoder) names are ours; the classifier is dropped and a position
        embedding of another square grid is resized to ours (bilinearly). A checkpoint of another
        width keeps its shapes, so the loader reports every mismatched key."""
        out = {k: v for k, v in state_dict.items() if not k.startswith(_CLASSIFIER_PREFIXES)}
        pos = out.get("pos_embed")
        if pos is not None and pos.dim() == 3 and pos.shape[-1] == self.embed_dim and pos.shape != self.pos_embed.shape:
            side = math.isqrt(max(pos.shape[1] - self.num_prefix_tokens, 0))
            if side > 0 and side * side == pos.shape[1] - self.num_prefix_tokens:  # checkpoints store square grids
                out["pos_embed"] = resize_position_embedding(pos, (side, side), self.pos_grid, self.num_prefix_tokens)
        return out

    def keys_not_in_pretrained_weights(self) -> set:
        """ImageNet ViT weights hold every backbone key."""
        return set()


@BACKBONE_REGISTRY.register()
def build_vit_backbone(cfg, input_shape: ShapeSpec) -> ViTBackbone:
    """The ViT of ``MODEL.VIT.*``."""
    v = cfg.MODEL.VIT
    return ViTBackbone(
        img_size=int(v.IMG_SIZE),
        patch_size=int(v.PATCH_SIZE),
        embed_dim=int(v.EMBED_DIM),
        depth=int(v.DEPTH),
        num_heads=int(v.NUM_HEADS),
        mlp_ratio=float(v.MLP_RATIO),
        qkv_bias=bool(v.QKV_BIAS),
        drop_path_rate=float(v.DROP_PATH_RATE),
        ln_eps=float(v.LN_EPS),
        distilled=bool(v.DISTILLED),
        out_indices=list(v.OUT_INDICES),
        use_checkpoint=bool(v.USE_CHECKPOINT),
        in_channels=input_shape.channels or 3,
        timm_name=str(v.NAME),
        pretrained=bool(cfg.MODEL.BACKBONE.PRETRAINED),
    )
