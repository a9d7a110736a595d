"""The ViT backbone: timm's numbers, any input size, the token interface token reduction builds on."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from eco_m2f.config import setup_cfg
from eco_m2f.modeling import build_backbone
from eco_m2f.modeling.backbone.vit import ViTBackbone


def _tiny(**kw) -> ViTBackbone:
    torch.manual_seed(0)
    args = dict(img_size=64, embed_dim=32, depth=3, num_heads=2, out_indices=(0, -1))
    args.update(kw)
    return ViTBackbone(**args).eval()


def test_dense_forward_equals_timm_vision_transformer():
    import timm

    ours = _tiny(ln_eps=1e-5)
    ref = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, img_size=64, embed_dim=32,
                            depth=3, num_heads=2, norm_layer=torch.nn.LayerNorm).eval()
    ref.load_state_dict(ours.state_dict())
    x = torch.randn(2, 3, 64, 64)
    features = ours(x)
    expected = ref.forward_features(x)
    assert features.grid == (4, 4) and features.dense
    assert torch.allclose(features.tokens, expected[:, 1:], atol=1e-6)
    assert torch.allclose(features.prefix, expected[:, :1], atol=1e-6)
    assert sorted(features.layers) == [0, 2]
    # the block loop by hand, through the exposed parts, gives the same tokens
    tokens, grid = ours.prepare_tokens(x)
    for blk in ours.blocks:
        tokens = blk(tokens)
    assert grid == (4, 4) and torch.allclose(ours.norm(tokens), expected, atol=1e-6)
    assert torch.allclose(features.layers[2], tokens[:, 1:], atol=1e-6)


def test_non_square_input_is_padded_and_gets_the_bilinear_position_embedding():
    ours = _tiny()
    x = torch.randn(1, 3, 50, 70)  # padded to 64 x 80: a 4 x 5 grid
    tokens, grid = ours.prepare_tokens(x)
    assert grid == (4, 5) and tokens.shape == (1, 1 + 20, 32)
    pos = ours.position_embedding((4, 5))
    stored = ours.pos_embed[:, 1:].reshape(1, 4, 4, 32).permute(0, 3, 1, 2)
    expected = F.interpolate(stored, size=(4, 5), mode="bilinear", align_corners=False).flatten(2).transpose(1, 2)
    assert torch.allclose(pos[:, 1:], expected, atol=1e-6)
    assert torch.equal(pos[:, :1], ours.pos_embed[:, :1])
    assert ours.position_embedding(ours.pos_grid) is ours.pos_embed
    padded = F.pad(x, (0, 10, 0, 14))
    patches = ours.patch_embed.proj(padded).flatten(2).transpose(1, 2)
    assert torch.allclose(tokens[:, 1:], patches + pos[:, 1:], atol=1e-6)
    assert ours(x).tokens.shape == (1, 20, 32)


def test_interface_attributes_and_distillation_token():
    ours = _tiny(distilled=True)
    assert (ours.num_prefix_tokens, ours.patch_size, ours.embed_dim, ours.num_heads, ours.depth) == (2, 16, 32, 2, 3)
    assert ours.out_indices == (0, 2) and isinstance(ours.blocks, torch.nn.ModuleList)
    tokens, _ = ours.prepare_tokens(torch.randn(2, 3, 32, 48))
    assert tokens.shape == (2, 2 + 6, 32)
    assert ours(torch.randn(1, 3, 32, 32)).prefix.shape == (1, 2, 32)
    assert ours.layer_id("pos_embed") == 0 and ours.layer_id("blocks.1.attn.qkv.weight") == 2
    assert ours.layer_id("norm.weight") == 4


def test_built_from_config_or_a_timm_name():
    cfg = setup_cfg(None, ["MODEL.BACKBONE.NAME", "build_vit_backbone", "MODEL.VIT.IMG_SIZE", "64",
                           "MODEL.VIT.EMBED_DIM", "48", "MODEL.VIT.DEPTH", "2", "MODEL.VIT.NUM_HEADS", "3",
                           "MODEL.VIT.LN_EPS", "1e-5", "MODEL.VIT.OUT_INDICES", "[-2]"])
    b = build_backbone(cfg)
    assert isinstance(b, ViTBackbone) and b.embed_dim == 48 and b.norm.eps == 1e-5 and b.out_indices == (0,)
    assert b.blocks[1].norm1.eps == 1e-5
    named = ViTBackbone(img_size=64, timm_name="vit_tiny_patch16_224", ln_eps=1e-5)
    assert (named.embed_dim, named.depth, named.num_heads) == (192, 12, 3)
    assert named.pos_embed.shape == (1, 17, 192) and named.norm.eps == 1e-5


def test_bad_settings_are_named():
    with pytest.raises(ValueError, match="MODEL.VIT.OUT_INDICES"):
        _tiny(out_indices=(3,))
    with pytest.raises(ValueError, match="MODEL.VIT.IMG_SIZE 60"):
        _tiny(img_size=60)
    with pytest.raises(ValueError, match="MODEL.VIT.NAME 'resnet18'"):
        ViTBackbone(img_size=64, timm_name="resnet18")
    with pytest.raises(ValueError, match="expects a B x 3 x H x W"):
        _tiny()(torch.randn(3, 64, 64))


def test_patch_embedding_as_a_matrix_product_equals_the_convolution():
    ours = _tiny(embed_dim=24)
    x = torch.randn(2, 3, 48, 80)
    embedded, grid = ours.embed_patches(x)
    conv = ours.patch_embed.proj(x)  # B x C x h x w, timm's own path
    assert grid == (3, 5) and embedded.shape == (2, 15, 24)
    assert torch.allclose(embedded, conv.flatten(2).transpose(1, 2), atol=1e-5)
    # under autocast the images are cast before the re-layout; the result is the conv's in bf16
    with torch.autocast("cpu", dtype=torch.bfloat16):
        half, _ = ours.embed_patches(x)
    assert half.dtype == torch.bfloat16
    assert torch.allclose(half.float(), conv.flatten(2).transpose(1, 2), atol=0.05, rtol=0.02)
    # a projection that is not a patchify (here: overlapping, stride 8) keeps the convolution
    ours.patch_embed.proj = torch.nn.Conv2d(3, 24, 16, stride=8)
    overlapping, grid = ours.embed_patches(x)
    assert grid == (5, 9) and overlapping.shape == (2, 45, 24)
