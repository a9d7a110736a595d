"""Backbones on timm: shapes, freezing, numerics, and the backbone half of the checkpoint key contract."""
from __future__ import annotations

import json
import math
import pickle
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from eco_m2f.checkpoint import load_weights
from eco_m2f.config import get_cfg
from eco_m2f.modeling.backbone import ResNetBackbone, SwinBackbone
from eco_m2f.modeling.backbone import key_maps
from eco_m2f.modeling.registry import BACKBONE_REGISTRY, ShapeSpec

REFERENCE = Path(__file__).resolve().parents[2] / "shared" / "reference" / "m2f_state_dict_keys.json"
BUFFER_SUFFIXES = ("running_mean", "running_var", "num_batches_tracked", "relative_position_index")


def _build(cfg) -> nn.Module:
    return BACKBONE_REGISTRY.get(cfg.MODEL.BACKBONE.NAME)(cfg, ShapeSpec(channels=3))


def _build_meta(cfg) -> nn.Module:
    """Structure only (no memory, no init): enough for keys, shapes and parameter counts."""
    with torch.device("meta"):
        return _build(cfg)


@pytest.fixture(scope="module")
def r50() -> nn.Module:
    return _build(_cfg_coco_r50()).eval()


@pytest.fixture(scope="module")
def swin_t() -> nn.Module:
    torch.manual_seed(0)
    return _build(_cfg_swin_tiny()).eval()


def _cfg_coco_r50():
    cfg = get_cfg()
    cfg.MODEL.BACKBONE.NAME = "build_resnet_backbone"
    cfg.MODEL.RESNETS.DEPTH = 50
    cfg.MODEL.RESNETS.STRIDE_IN_1X1 = False
    cfg.MODEL.RESNETS.NORM = "FrozenBN"
    cfg.MODEL.RESNETS.STEM_TYPE = "basic"  # as the official configs set them
    cfg.MODEL.RESNETS.RES5_MULTI_GRID = [1, 1, 1]
    return cfg


def _cfg_cityscapes_r50():
    cfg = _cfg_coco_r50()
    cfg.MODEL.RESNETS.NORM = "SyncBN"
    return cfg


def _cfg_swin_tiny():
    cfg = get_cfg()
    cfg.MODEL.BACKBONE.NAME = "D2SwinTransformer"
    cfg.MODEL.SWIN.EMBED_DIM = 96
    cfg.MODEL.SWIN.DEPTHS = [2, 2, 6, 2]
    cfg.MODEL.SWIN.NUM_HEADS = [3, 6, 12, 24]
    cfg.MODEL.SWIN.WINDOW_SIZE = 7
    cfg.MODEL.SWIN.APE = False
    cfg.MODEL.SWIN.DROP_PATH_RATE = 0.3
    return cfg


REFERENCE_CONFIGS = {
    "coco_panoptic_R50": _cfg_coco_r50,
    "cityscapes_panoptic_R50": _cfg_cityscapes_r50,
    "coco_panoptic_swin_tiny": _cfg_swin_tiny,
}


class _WithBackbone(nn.Module):
    """Stand-in meta-architecture: a backbone and a head."""

    def __init__(self, backbone: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = nn.Conv2d(8, 2, 1)


def _resnet18(**kw) -> ResNetBackbone:
    return ResNetBackbone(depth=18, **kw)


def _tiny_swin(**kw) -> SwinBackbone:
    args = dict(embed_dim=24, depths=(2, 2, 2, 2), num_heads=(1, 2, 3, 4), window_size=7, drop_path_rate=0.0)
    args.update(kw)
    return SwinBackbone(**args)


def _randomize_frozen_bn(model: nn.Module) -> None:
    """Non-trivial BN statistics/affine so that a mis-mapped norm key changes the output."""
    from torchvision.ops import FrozenBatchNorm2d

    g = torch.Generator().manual_seed(0)
    for m in model.modules():
        if isinstance(m, (FrozenBatchNorm2d, nn.BatchNorm2d)):
            with torch.no_grad():
                m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)


# ------------------------------------------------------------------------------- key contract


@pytest.fixture(scope="module")
def reference() -> dict:
    if not REFERENCE.is_file():
        pytest.skip(f"{REFERENCE} not present")
    return json.loads(REFERENCE.read_text())


@pytest.mark.parametrize("name", sorted(REFERENCE_CONFIGS))
def test_reference_backbone_keys_map_onto_ours(reference: dict, name: str) -> None:
    ref_sd = reference[name]["state_dict"]
    ref_backbone = {k[len("backbone."):]: tuple(s) for k, s in ref_sd.items() if k.startswith("backbone.")}
    assert ref_backbone, "reference has no backbone keys"
    backbone = _build_meta(REFERENCE_CONFIGS[name]())
    ours = {k: tuple(v.shape) for k, v in backbone.state_dict().items()}

    fake = {k: torch.empty(s, device="meta") for k, s in ref_backbone.items()}
    mapped = backbone.checkpoint_key_map(fake)
    mapped_shapes = {k: tuple(v.shape) for k, v in mapped.items()}

    kept = {id(v) for v in mapped.values()}
    dropped = {k for k in ref_backbone if id(fake[k]) not in kept}
    # only the documented recomputed buffers may be dropped: one relative_position_index per Swin block
    assert all(k.endswith(key_maps.SWIN_DROPPED_BUFFERS) for k in dropped), sorted(dropped)[:5]
    assert len(dropped) == (sum([2, 2, 6, 2]) if "swin" in name else 0)
    assert set(mapped_shapes) == set(ours), (
        f"not ours: {sorted(set(mapped_shapes) - set(ours))[:5]}, not hit: {sorted(set(ours) - set(mapped_shapes))[:5]}"
    )
    wrong = {k: (mapped_shapes[k], ours[k]) for k in ours if mapped_shapes[k] != ours[k]}
    assert not wrong, wrong


@pytest.mark.parametrize("name", sorted(REFERENCE_CONFIGS))
def test_reference_backbone_parameter_count(reference: dict, name: str) -> None:
    entry = reference[name]
    sd = entry["state_dict"]

    def count(keys):
        return sum(math.prod(sd[k]) for k in keys if not k.endswith(BUFFER_SUFFIXES))

    # head parameters (criterion.empty_weight is a buffer); the rest of num_params is the backbone's,
    # which excludes FrozenBN's affine buffers in the COCO R50 config.
    head = count(k for k in sd if k.startswith("sem_seg_head."))
    expected = entry["num_params"] - head
    backbone = _build_meta(REFERENCE_CONFIGS[name]())
    ours = sum(p.numel() for p in backbone.parameters())
    assert ours == expected, (name, ours, expected)
    if name == "coco_panoptic_R50":  # every backbone.* key counted, FrozenBN affine included
        frozen_affine = count(k for k in sd if k.startswith("backbone.") and ".norm." in k)
        assert ours + frozen_affine == count(k for k in sd if k.startswith("backbone."))


def test_reference_swin_checkpoint_loads_through_the_model_map(reference: dict) -> None:
    """Full-model Detectron2 keys -> load_weights finds the backbone's map by itself."""
    ref_sd = reference["coco_panoptic_swin_tiny"]["state_dict"]
    g = torch.Generator().manual_seed(0)
    ckpt = {k: torch.randn(tuple(s), generator=g) for k, s in ref_sd.items() if k.startswith("backbone.")}
    model = _WithBackbone(_build(_cfg_swin_tiny()))
    ckpt.update({f"head.{k}": v for k, v in model.head.state_dict().items()})
    report = load_weights(model, ckpt)
    assert report.clean and not report.backbone_only
    # d2 puts the patch merging at the end of stage 0, timm at the start of stage 1
    assert torch.equal(
        model.backbone.layers[1].downsample.reduction.weight, ckpt["backbone.layers.0.downsample.reduction.weight"]
    )
    assert torch.equal(model.backbone.norm3.weight, ckpt["backbone.norm3.weight"])


@pytest.mark.parametrize("src,dst", [("coco_panoptic_R50", _cfg_cityscapes_r50), ("cityscapes_panoptic_R50", _cfg_coco_r50)])
def test_reference_resnet_checkpoints_load_across_norms(reference: dict, src: str, dst) -> None:
    """FrozenBN (no num_batches_tracked) <-> SyncBN (with it) checkpoints load both ways."""
    ref_sd = reference[src]["state_dict"]
    ckpt = {
        k: (torch.zeros(tuple(s), dtype=torch.long) if k.endswith("num_batches_tracked") else torch.rand(tuple(s)) + 0.5)
        for k, s in ref_sd.items()
        if k.startswith("backbone.")
    }
    model = _WithBackbone(_build(dst()))
    model.head = nn.Identity()
    report = load_weights(model, ckpt)
    assert report.clean and len(report.loaded) == 265
    assert torch.equal(model.backbone.layer4[2].bn3.running_var, ckpt["backbone.res5.2.conv3.norm.running_var"])
    assert torch.equal(model.backbone.layer1[0].downsample[0].weight, ckpt["backbone.res2.0.shortcut.weight"])


# ------------------------------------------------------------------------------- ResNet


def _check_shapes(backbone: nn.Module, sizes) -> None:
    shapes = backbone.output_shape()
    for h, w in sizes:
        hp, wp = math.ceil(h / 32) * 32, math.ceil(w / 32) * 32  # non-multiples of 32 are padded
        with torch.no_grad():
            out = backbone(torch.randn(1, 3, h, w))
        assert list(out) == list(shapes)
        for name, spec in shapes.items():
            assert tuple(out[name].shape) == (1, spec.channels, hp // spec.stride, wp // spec.stride), (name, h, w)


def test_resnet_output_shapes(r50) -> None:
    assert {k: (v.channels, v.stride) for k, v in r50.output_shape().items()} == {
        "res2": (256, 4), "res3": (512, 8), "res4": (1024, 16), "res5": (2048, 32)
    }
    assert r50.size_divisibility == 32
    _check_shapes(r50, [(64, 64), (96, 160), (100, 70)])


def test_backbone_rejects_wrong_input() -> None:
    backbone = _resnet18()
    with pytest.raises(ValueError, match=r"B x 3 x H x W.*\(3, 64, 64\)"):
        backbone(torch.randn(3, 64, 64))


def test_frozen_bn_has_no_trainable_norm_params(r50) -> None:
    backbone = r50
    names = [n for n, _ in backbone.named_parameters()]
    assert names and all(n.endswith(".weight") and ("conv" in n or "downsample.0" in n) for n in names)
    assert all(p.requires_grad for p in backbone.parameters())  # FREEZE_AT 0: convs train


def test_freeze_at() -> None:
    from torchvision.ops import FrozenBatchNorm2d

    cfg = _cfg_cityscapes_r50()
    cfg.MODEL.RESNETS.DEPTH = 18
    cfg.MODEL.RESNETS.RES2_OUT_CHANNELS = 64
    cfg.MODEL.BACKBONE.FREEZE_AT = 2
    backbone = _build(cfg)
    assert not backbone.conv1.weight.requires_grad
    assert not any(p.requires_grad for p in backbone.layer1.parameters())
    assert all(p.requires_grad for p in backbone.layer2.parameters())
    assert isinstance(backbone.bn1, FrozenBatchNorm2d) and isinstance(backbone.layer1[0].bn1, FrozenBatchNorm2d)
    assert isinstance(backbone.layer2[0].bn1, nn.BatchNorm2d)
    cfg.MODEL.BACKBONE.FREEZE_AT = 0
    assert all(p.requires_grad for p in _build(cfg).parameters())
    cfg.MODEL.BACKBONE.FREEZE_AT = 7
    with pytest.raises(ValueError, match="FREEZE_AT"):
        _build(cfg)


def test_resnet_matches_torchvision(r50) -> None:
    """timm's modules under Detectron2's outputs compute torchvision's ResNet-50."""
    import torchvision
    from torchvision.ops import FrozenBatchNorm2d

    ours = r50
    _randomize_frozen_bn(ours)
    tv = torchvision.models.resnet50(weights=None, norm_layer=FrozenBatchNorm2d).eval()
    missing, unexpected = tv.load_state_dict(ours.state_dict(), strict=False)
    assert set(missing) == {"fc.weight", "fc.bias"} and not unexpected
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        out = ours(x)
        y = tv.maxpool(tv.relu(tv.bn1(tv.conv1(x))))
        for name, layer in zip(["res2", "res3", "res4", "res5"], [tv.layer1, tv.layer2, tv.layer3, tv.layer4]):
            y = layer(y)
            torch.testing.assert_close(out[name], y, rtol=0, atol=0)


def test_resnet_detectron2_export_reload_is_identical(tmp_path: Path) -> None:
    """ours -> Detectron2 names (.pkl of numpy arrays, backbone.* keys) -> load_weights -> same outputs."""
    src = _WithBackbone(_resnet18(norm="FrozenBN")).eval()
    _randomize_frozen_bn(src)
    d2 = key_maps.export_resnet_state_dict_to_d2(src.backbone.state_dict())
    assert "stem.conv1.norm.running_mean" in d2 and "res2.0.conv1.weight" in d2 and "res3.0.shortcut.norm.bias" in d2
    full = {f"backbone.{k}": v.numpy() for k, v in d2.items()}
    full.update({f"head.{k}": v.detach().numpy() for k, v in src.head.state_dict().items()})
    path = tmp_path / "model_final.pkl"
    with open(path, "wb") as f:
        pickle.dump({"model": full, "__author__": "test"}, f)
    dst = _WithBackbone(_resnet18(norm="FrozenBN")).eval()
    report = load_weights(dst, path)
    assert report.clean and len(report.loaded) == len(src.state_dict())
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        a, b = src.backbone(x), dst.backbone(x)
    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_backbone_only_imagenet_checkpoints() -> None:
    """Detectron2's matching-heuristics R-50.pkl layout and torchvision weights load into model.backbone."""
    import torchvision

    tv = torchvision.models.resnet18(weights=None)
    model = _WithBackbone(_resnet18(norm="BN"))
    head_before = model.head.weight.clone()
    report = load_weights(model, tv.state_dict())  # conv1.weight, layer1.0..., fc.* (dropped)
    assert report.clean and report.backbone_only
    assert set(report.untouched) == {"head.weight", "head.bias"}
    assert torch.equal(model.backbone.layer3[1].conv2.weight, tv.layer3[1].conv2.weight)
    assert torch.equal(model.head.weight, head_before)

    d2 = {k: v.numpy() for k, v in key_maps.export_resnet_state_dict_to_d2(model.backbone.state_dict()).items()}
    other = _WithBackbone(_resnet18(norm="BN"))
    report = load_weights(other, {"model": d2, "matching_heuristics": True})  # stem.conv1.weight, res2.0...
    assert report.clean and report.backbone_only
    assert torch.equal(other.backbone.bn1.running_var, tv.bn1.running_var)

    broken = dict(tv.state_dict())
    broken.pop("layer1.0.conv1.weight")
    with pytest.raises(Exception, match=r"backbone\.layer1\.0\.conv1\.weight \[64, 64, 3, 3\]"):
        load_weights(_WithBackbone(_resnet18(norm="BN")), broken)


def test_resnet_stride_in_1x1_and_dilation() -> None:
    cfg = _cfg_coco_r50()
    cfg.MODEL.RESNETS.STRIDE_IN_1X1 = True
    cfg.MODEL.RESNETS.RES5_DILATION = 2
    backbone = _build(cfg).eval()
    block = backbone.layer2[0]
    assert block.conv1.stride == (2, 2) and block.conv2.stride == (1, 1)
    assert all(b.conv2.dilation == (2, 2) and b.conv2.padding == (2, 2) for b in backbone.layer4)
    assert backbone.output_shape()["res5"].stride == 16
    with torch.no_grad():
        out = backbone(torch.randn(1, 3, 64, 96))
    assert tuple(out["res3"].shape) == (1, 512, 8, 12) and tuple(out["res5"].shape) == (1, 2048, 4, 6)


def test_resnet_config_errors() -> None:
    cfg = _cfg_coco_r50()
    cfg.MODEL.RESNETS.NORM = "LayerNorm"
    with pytest.raises(ValueError, match=r"NORM 'LayerNorm'"):
        _build(cfg)
    cfg = _cfg_coco_r50()
    cfg.MODEL.RESNETS.DEPTH = 42
    with pytest.raises(ValueError, match="DEPTH 42"):
        _build(cfg)
    cfg = _cfg_coco_r50()
    cfg.MODEL.RESNETS.OUT_FEATURES = ["res4"]
    backbone = _build(cfg)
    assert not hasattr(backbone, "layer4") and list(backbone.output_shape()) == ["res4"]


def test_pretrained_without_network_is_a_clear_error(monkeypatch) -> None:
    import timm

    real = timm.create_model

    def offline(name, pretrained=False, **kw):
        if pretrained:
            raise OSError("no network")
        return real(name, pretrained=False, **kw)

    monkeypatch.setattr(timm, "create_model", offline)
    cfg = _cfg_coco_r50()
    cfg.MODEL.RESNETS.DEPTH = 18
    cfg.MODEL.RESNETS.RES2_OUT_CHANNELS = 64
    cfg.MODEL.BACKBONE.PRETRAINED = True
    with pytest.raises(RuntimeError, match=r"resnet18\.tv_in1k.*MODEL\.WEIGHTS"):
        _build(cfg)
    cfg.MODEL.BACKBONE.PRETRAINED = False  # the default never touches the network
    _build(cfg)


# ------------------------------------------------------------------------------- Swin


def test_swin_output_shapes(swin_t) -> None:
    assert {k: (v.channels, v.stride) for k, v in swin_t.output_shape().items()} == {
        "res2": (96, 4), "res3": (192, 8), "res4": (384, 16), "res5": (768, 32)
    }
    _check_shapes(swin_t, [(64, 64), (224, 96), (70, 100)])


def test_swin_matches_timm_when_maps_are_window_multiples() -> None:
    """At sizes whose stage maps are multiples of the window, timm's own forward is the same function."""
    from timm.models.swin_transformer import SwinTransformer

    ours = _tiny_swin().eval()
    ref = SwinTransformer(
        embed_dim=24, depths=(2, 2, 2, 2), num_heads=(1, 2, 3, 4), window_size=7, num_classes=0,
        always_partition=True, strict_img_size=False,
    ).eval()
    missing, unexpected = ref.load_state_dict(ours.state_dict(), strict=False)
    assert set(missing) == {"norm.weight", "norm.bias"} and all(k.startswith("norm") for k in unexpected)
    x = torch.randn(1, 3, 224, 448)  # stages 56x112, 28x56, 14x28, 7x14
    with torch.no_grad():
        out = ours(x)
        inter = ref.forward_intermediates(x, intermediates_only=True)
    for i, name in enumerate(["res2", "res3", "res4", "res5"]):
        expected = getattr(ours, f"norm{i}")(inter[i].permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        torch.testing.assert_close(out[name], expected, rtol=1e-4, atol=1e-4)


def _dense_reference_block(blk: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Swin block written as ONE global attention over the padded, shifted map.

    Tokens may attend only within their window (-inf elsewhere), with -100 between tokens that
    came from different regions of the un-shifted map; padding happens before the shift.
    """
    b, h, w, c = x.shape
    ws, shift = blk.window_size[0], blk.shift_size[0]
    attn = blk.attn
    y = blk.norm1(x)
    hp, wp = math.ceil(h / ws) * ws, math.ceil(w / ws) * ws
    y = F.pad(y, (0, 0, 0, wp - w, 0, hp - h))
    if shift:
        y = torch.roll(y, (-shift, -shift), (1, 2))
    rows, cols = torch.meshgrid(torch.arange(hp), torch.arange(wp), indexing="ij")
    rows, cols = rows.flatten(), cols.flatten()  # token coordinates in the shifted map
    window = (rows // ws) * (wp // ws) + cols // ws

    def band(coord, size):
        if not shift:
            return torch.zeros_like(coord)
        return (coord >= size - ws).long() + (coord >= size - shift).long()

    region = band(rows, hp) * 3 + band(cols, wp)
    dr = (rows % ws)[:, None] - (rows % ws)[None, :] + ws - 1
    dc = (cols % ws)[:, None] - (cols % ws)[None, :] + ws - 1
    bias = attn.relative_position_bias_table[dr * (2 * ws - 1) + dc].permute(2, 0, 1)  # heads x T x T
    mask = torch.zeros(len(rows), len(rows))
    mask[region[:, None] != region[None, :]] = -100.0
    mask[window[:, None] != window[None, :]] = float("-inf")
    t = y.reshape(b, hp * wp, c)
    qkv = attn.qkv(t).reshape(b, hp * wp, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]
    logits = (q * attn.scale) @ k.transpose(-2, -1) + bias + mask
    z = (logits.softmax(-1) @ v).transpose(1, 2).reshape(b, hp * wp, c)
    z = attn.proj(z).reshape(b, hp, wp, c)
    if shift:
        z = torch.roll(z, (shift, shift), (1, 2))
    x = x + z[:, :h, :w]
    return x + blk.mlp(blk.norm2(x))


def test_swin_matches_dense_reference_on_non_square_input(swin_t) -> None:
    """96x160: no stage map (24x40, 12x20, 6x10, 3x5) is a multiple of the 7x7 window."""
    backbone = swin_t
    x = torch.randn(1, 3, 96, 160)
    with torch.no_grad():
        out = backbone(x)
        y = backbone.patch_embed(x)
        for i, stage in enumerate(backbone.layers):
            y = stage.downsample(y)
            for blk in stage.blocks:
                assert blk.window_size == (7, 7) and blk.shift_size in ((0, 0), (3, 3))
                y = _dense_reference_block(blk, y)
            expected = getattr(backbone, f"norm{i}")(y).permute(0, 3, 1, 2)
            torch.testing.assert_close(out[f"res{i + 2}"], expected, rtol=1e-4, atol=1e-4)


def test_swin_key_maps_round_trip_and_layouts() -> None:
    src = _tiny_swin().eval()
    with torch.no_grad():
        for p in src.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    sd = src.state_dict()
    d2 = key_maps.export_swin_state_dict_to_d2(sd, window_size=7)
    assert "layers.0.downsample.reduction.weight" in d2 and "layers.3.downsample.reduction.weight" not in d2
    assert "layers.0.blocks.1.attn.relative_position_index" in d2
    assert key_maps.swin_state_dict_is_d2_layout(d2) and not key_maps.swin_state_dict_is_d2_layout(sd)
    # only stage 1..3 downsample keys: the layout is told from shapes (in = 4C at the end of stage i)
    partial = {k: v for k, v in d2.items() if k.startswith(("layers.1.", "layers.2."))}
    assert key_maps.swin_state_dict_is_d2_layout(partial)
    assert not key_maps.swin_state_dict_is_d2_layout({k: v for k, v in sd.items() if k.startswith("layers.1.")})

    mapped = src.checkpoint_key_map(d2)
    assert set(mapped) == set(sd) and all(torch.equal(mapped[k], sd[k]) for k in sd)
    dst = _tiny_swin().eval()
    assert load_weights(dst, {f"backbone.{k}": v for k, v in d2.items()}, key_map=lambda s: {
        k[len("backbone."):]: v for k, v in s.items()
    }).clean
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        a, b = src(x), dst(x)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_swin_timm_imagenet_weights_load_as_backbone_only() -> None:
    from timm.models.swin_transformer import SwinTransformer

    timm_net = SwinTransformer(embed_dim=24, depths=(2, 2, 2, 2), num_heads=(1, 2, 3, 4), window_size=7)
    model = _WithBackbone(_tiny_swin())
    report = load_weights(model, timm_net.state_dict())  # has norm.* and head.fc.* (dropped)
    assert report.clean and report.backbone_only
    assert {f"backbone.norm{i}.{p}" for i in range(4) for p in ("weight", "bias")} <= set(report.untouched)
    assert torch.equal(model.backbone.layers[2].downsample.reduction.weight, timm_net.layers[2].downsample.reduction.weight)


def test_swin_gradient_checkpointing_and_ape_train() -> None:
    backbone = _tiny_swin(use_checkpoint=True, ape=True, drop_path_rate=0.2).train()
    out = backbone(torch.randn(1, 3, 64, 96))
    sum(v.float().mean() for v in out.values()).backward()
    assert backbone.absolute_pos_embed.grad is not None
    assert backbone.layers[0].blocks[0].attn.relative_position_bias_table.grad is not None


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_backbones_on_cuda_match_cpu_and_run_in_bf16(r50, swin_t) -> None:
    import copy

    x = torch.randn(2, 3, 96, 160)
    tf32 = (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        for model in (r50, swin_t):
            with torch.no_grad():
                expected = model(x)
                gpu = copy.deepcopy(model).cuda()
                out = gpu(x.cuda())
                for name, value in expected.items():
                    scale = float(value.abs().max())  # random weights: activations grow with depth
                    torch.testing.assert_close(out[name].cpu(), value, rtol=1e-4, atol=1e-4 * scale)
                with torch.autocast("cuda", dtype=torch.bfloat16):
                    low = gpu(x.cuda())
            for name, value in expected.items():
                assert low[name].shape == value.shape and torch.isfinite(low[name]).all()
                rel = (low[name].float().cpu() - value).norm() / value.norm()
                assert rel < 0.05, (name, float(rel))
        gpu.train()  # Swin backward on the GPU, with gradient checkpointing
        gpu.use_checkpoint = True
        out = gpu(x.cuda())
        sum(v.mean() for v in out.values()).backward()
        assert gpu.layers[3].blocks[1].attn.relative_position_bias_table.grad is not None
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = tf32
