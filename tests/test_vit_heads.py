"""Decode heads of the ViT segmenters: ragged batches, output shapes, the ATM loss, registry errors."""
from __future__ import annotations

import pytest
import torch

from eco_m2f.config import setup_cfg
from eco_m2f.architectures import build_model
from eco_m2f.modeling.heads.atm_loss import ATMLoss, present_classes
from eco_m2f.modeling.registry import SEM_SEG_HEADS_REGISTRY, ShapeSpec

K, C = 5, 32
SHAPE = {name: ShapeSpec(channels=C, stride=16) for name in ("tokens", "layer0", "layer1")}
OPTS = [
    "MODEL.SEM_SEG_HEAD.NUM_CLASSES", str(K),
    "MODEL.SEM_SEG_HEAD.MASK_TRANSFORMER.NUM_HEADS", "2",
    "MODEL.SEM_SEG_HEAD.ATM.HIDDEN_DIM", "16", "MODEL.SEM_SEG_HEAD.ATM.NUM_HEADS", "2",
    "MODEL.SEM_SEG_HEAD.ATM.NUM_LAYERS", "2",
    "MODEL.SEM_SEG_HEAD.SETR.CHANNELS", "8",
]


def _head(name: str, *opts: str, auxiliary: bool = False):
    torch.manual_seed(0)
    return SEM_SEG_HEADS_REGISTRY.get(name)(setup_cfg(None, OPTS + list(opts)), SHAPE, auxiliary=auxiliary).eval()


def _per_token(name: str, out: dict) -> torch.Tensor:
    return out["pred_masks"] if name == "ATMHead" else out["pred_tokens"]


@pytest.mark.parametrize("name", ["SegmenterLinearHead", "SegmenterMaskTransformerHead", "ATMHead"])
def test_token_heads_on_a_ragged_batch_equal_each_image_alone(name):
    """Image 0 holds 12 live tokens, image 1 only 7 (then padding): each image's outputs on its live
    tokens equal the head run on that image's tokens alone."""
    head = _head(name)
    gen = torch.Generator().manual_seed(1)
    levels = [torch.randn(2, 12, C, generator=gen) for _ in range(2)]
    padding = torch.zeros(2, 12, dtype=torch.bool)
    padding[1, 7:] = True
    for x in levels:
        x[1, 7:] = 100.0  # garbage in the empty slots must not leak
    inputs = levels if head.input_kind == "levels" else levels[-1]
    batched = head(inputs, padding)
    for i, n in ((0, 12), (1, 7)):
        alone_in = [x[i : i + 1, :n] for x in levels] if head.input_kind == "levels" else levels[-1][i : i + 1, :n]
        alone = head(alone_in)
        assert torch.allclose(_per_token(name, batched)[i, :n], _per_token(name, alone)[0], atol=1e-5)
        if name == "ATMHead":
            assert torch.allclose(batched["pred_logits"][i], alone["pred_logits"][0], atol=1e-5)


def test_mask_transformer_packed_path_equals_the_padded_one_at_real_slots():
    """With host lengths and no gradients the mask transformer runs on the packed real tokens:
    equal to the masked padded path at every real slot, also with slots wider than the longest
    image and an image that holds no token; with gradients it keeps the padded path."""
    head = _head("SegmenterMaskTransformerHead")
    gen = torch.Generator().manual_seed(2)
    lengths = (12, 7, 0, 9)
    x = torch.randn(len(lengths), 14, C, generator=gen)  # two slots past the longest image
    padding = torch.arange(14).view(1, -1) >= torch.tensor(lengths).view(-1, 1)
    x[padding] = 100.0  # garbage in the empty slots must not leak
    with torch.no_grad():
        padded = head(x, padding)["pred_tokens"]
        packed = head(x, padding, lengths=lengths)["pred_tokens"]
        assert torch.equal(head.forward_packed(x, lengths)["pred_tokens"], packed)
    real = ~padding
    assert torch.allclose(packed[real], padded[real], atol=1e-5)
    assert not torch.allclose(packed[padding], padded[padding])  # the packed path did run
    with torch.no_grad():
        for i, n in enumerate(lengths):
            if n:
                alone = head(x[i : i + 1, :n])["pred_tokens"][0]
                assert torch.allclose(packed[i, :n], alone, atol=1e-5)
    trained = head(x, padding, lengths=lengths)["pred_tokens"]  # gradients on: the padded path
    assert torch.equal(trained.detach(), padded) and trained.requires_grad
    with pytest.raises(ValueError, match="do not fit"):
        head.forward_packed(x, (12, 7, 15, 0))


def test_grid_heads_output_resolution_and_auxiliary_variants():
    maps = torch.randn(2, C, 3, 5)
    assert _head("SETRNaiveHead")(maps)["pred_maps"].shape == (2, K, 3, 5)
    pup = _head("SETRPUPHead", "MODEL.SEM_SEG_HEAD.SETR.NUM_CONVS", "2", "MODEL.SEM_SEG_HEAD.SETR.UP_SCALE", "4")
    assert pup(maps)["pred_maps"].shape == (2, K, 48, 80)
    assert len([m for m in pup.up_convs if isinstance(m, torch.nn.Conv2d)]) == 2
    aux = _head("SETRNaiveHead", auxiliary=True)  # SETR's auxiliary naive head: 2 convs 1x1, x4 each
    assert aux(maps)["pred_maps"].shape == (2, K, 48, 80) and aux.loss_weight == pytest.approx(0.4)
    logits = pup.semantic_logits(pup(maps), (3, 5), (40, 70))
    assert logits.shape == (2, K, 40, 70)


def test_atm_outputs_every_level_with_summed_masks():
    head = _head("ATMHead")
    out = head([torch.randn(2, 6, C), torch.randn(2, 6, C)])
    assert out["pred_logits"].shape == (2, K, K + 1) and out["pred_masks"].shape == (2, 6, K)
    assert len(out["aux_outputs"]) == 1
    scores = head.semantic_logits(out, (2, 3), (32, 48))
    assert scores.shape == (2, K, 32, 48) and scores.min() >= 0 and scores.sum(1).max() <= K


def test_atm_loss_is_small_for_a_perfect_prediction_and_large_for_a_wrong_one():
    targets = torch.tensor([[[0, 0, 2, 2], [0, 0, 2, 255]]])  # 1 x 2 x 4, classes 0 and 2 present
    assert present_classes(targets, 3, 255).tolist() == [[True, False, True]]
    loss = ATMLoss(3, 255)
    onehot = torch.stack([(targets[0] == k).float() for k in range(3)])[None]  # 1 x 3 x 2 x 4
    class_logits = torch.full((1, 3, 4), -10.0)
    class_logits[0, 0, 0] = class_logits[0, 1, 3] = class_logits[0, 2, 2] = 10.0  # query 1 -> no object
    good = loss(class_logits, 20 * onehot - 10, targets)
    bad = loss(class_logits.flip(-1), 10 - 20 * onehot, targets)
    assert all(v < 0.05 for v in good.values()), good
    assert all(bad[k] > 10 * good[k] + 0.1 for k in good), (good, bad)


def test_unknown_and_foreign_head_names_are_clear_errors():
    base = ["MODEL.DEVICE", "cpu", "MODEL.META_ARCHITECTURE", "Segmenter", "MODEL.BACKBONE.NAME", "build_vit_backbone",
            "MODEL.VIT.IMG_SIZE", "32", "MODEL.VIT.EMBED_DIM", "32", "MODEL.VIT.DEPTH", "1", "MODEL.VIT.NUM_HEADS", "2"]
    with pytest.raises(KeyError, match="MODEL.SEM_SEG_HEAD.NAME 'SegmenterHead' is not a registered decode head.*ATMHead"):
        build_model(setup_cfg(None, base + ["MODEL.SEM_SEG_HEAD.NAME", "SegmenterHead"]))
    with pytest.raises(TypeError, match="'MaskFormerHead' is not a ViT decode head"):
        build_model(setup_cfg(None, base + ["MODEL.SEM_SEG_HEAD.NAME", "MaskFormerHead"]))
    with pytest.raises(KeyError, match="MODEL.SEM_SEG_HEAD.AUX_NAME 'Nope'"):
        build_model(setup_cfg(None, base + ["MODEL.SEM_SEG_HEAD.NAME", "SegmenterLinearHead", "MODEL.SEM_SEG_HEAD.AUX_NAME",
                                            "Nope", "MODEL.SEM_SEG_HEAD.AUX_LAYERS", "[0]", "MODEL.VIT.OUT_INDICES", "[0]"]))
