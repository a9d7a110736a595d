"""Tiny token reducers and Segmenters for the tests of the token-reduction framework."""
from __future__ import annotations

from typing import List

import torch
import torch.nn as nn

from eco_m2f.config import setup_cfg
from eco_m2f.architectures import build_model
from eco_m2f.evaluation.flops import count_flops
from eco_m2f.modeling.token_reduction import TOKEN_REDUCTION_REGISTRY, TokenReducer, TokenSet
from eco_m2f.modeling.token_reduction.flops import token_wise_flops

K = 4  # classes
TINY = [
    "MODEL.DEVICE", "cpu", "MODEL.META_ARCHITECTURE", "Segmenter", "MODEL.BACKBONE.NAME", "build_vit_backbone",
    "MODEL.PIXEL_MEAN", "[127.5, 127.5, 127.5]", "MODEL.PIXEL_STD", "[127.5, 127.5, 127.5]",
    "MODEL.VIT.IMG_SIZE", "64", "MODEL.VIT.EMBED_DIM", "32", "MODEL.VIT.DEPTH", "3", "MODEL.VIT.NUM_HEADS", "2",
    "MODEL.VIT.DROP_PATH_RATE", "0.0",
    "MODEL.SEM_SEG_HEAD.NAME", "SegmenterMaskTransformerHead", "MODEL.SEM_SEG_HEAD.NUM_CLASSES", str(K),
    "MODEL.SEM_SEG_HEAD.MASK_TRANSFORMER.NUM_HEADS", "2", "MODEL.SEM_SEG_HEAD.MASK_TRANSFORMER.DROPOUT", "0.0",
]
SETR = ["MODEL.SEM_SEG_HEAD.NAME", "SETRPUPHead", "MODEL.SEM_SEG_HEAD.SETR.CHANNELS", "8",
        "MODEL.SEM_SEG_HEAD.SETR.NUM_CONVS", "2", "MODEL.SEM_SEG_HEAD.SETR.UP_SCALE", "2"]
LINEAR = ["MODEL.SEM_SEG_HEAD.NAME", "SegmenterLinearHead"]


def tiny_segmenter(*opts: str, seed: int = 0):
    """A 3-block ViT of width 32 with the given overrides, in eval mode, weights from ``seed``."""
    torch.manual_seed(seed)
    return build_model(setup_cfg(None, TINY + list(opts))).eval()


def images(*sizes, seed: int = 0) -> torch.Tensor:
    """A normalised batch of random images, all of the first size."""
    g = torch.Generator().manual_seed(seed)
    h, w = sizes[0] if sizes else (64, 64)
    return torch.randn(len(sizes) or 1, 3, h, w, generator=g)


@TOKEN_REDUCTION_REGISTRY.register()
class KeepAllForTests(TokenReducer):
    """Decides after every block and removes nothing."""

    def __init__(self, cfg, backbone, head) -> None:
        super().__init__(cfg, backbone, head)
        self.decision_layers = tuple(range(backbone.depth))

    def reduce(self, layer: int, tokens: TokenSet, state) -> TokenSet:
        return tokens


@TOKEN_REDUCTION_REGISTRY.register()
class KeepAllTokensKindForTests(KeepAllForTests):
    """Removes nothing and hands the live tokens (all of them) to a token-wise head."""

    output_kind = "tokens"


@TOKEN_REDUCTION_REGISTRY.register()
class ThresholdForTests(TokenReducer):
    """After block 0 a linear scorer keeps the tokens scoring above 0 (so images keep
    different numbers); removed tokens keep their features and, with ``save_logits``, the
    logits of a linear classifier, whose loss joins the training losses."""

    save_logits = False

    def __init__(self, cfg, backbone, head) -> None:
        super().__init__(cfg, backbone, head)
        self.decision_layers = (0,)
        self.scorer = nn.Linear(backbone.embed_dim, 1)
        self.classifier = nn.Linear(backbone.embed_dim, head.num_classes)

    def reduce(self, layer: int, tokens: TokenSet, state) -> TokenSet:
        patches = tokens.patches()
        counts = list(tokens.live_counts)
        state.add_flops("token_reducer", [token_wise_flops(self.scorer) * n for n in counts])
        logits = None
        if self.save_logits:
            logits = self.classifier(patches)
            state.add_flops("token_reducer", [token_wise_flops(self.classifier) * n for n in counts])
        if state.training:
            state.losses["loss_test_scorer"] = self.scorer(patches).square().mean()
        state.add_cost("scored", counts)
        return tokens.keep(self.scorer(patches).view(-1) > 0, save_features=self.output_kind == "dense", save_logits=logits)


@TOKEN_REDUCTION_REGISTRY.register()
class ThresholdLogitsForTests(ThresholdForTests):
    """As ThresholdForTests, finalising the removed tokens with logits; live tokens to the head."""

    save_logits = True
    output_kind = "tokens"


@TOKEN_REDUCTION_REGISTRY.register()
class ThresholdDenseLogitsForTests(ThresholdForTests):
    """As ThresholdForTests, finalising the removed tokens with features and logits (grid heads)."""

    save_logits = True


def fvcore_gflops(model, image: torch.Tensor) -> float:
    """The project's fvcore count of ``model.network`` on one image (attention counted, BatchNorm not)."""
    return count_flops(model, image)["total"]


def per_image_counts(model, batch: torch.Tensor) -> List[int]:
    """Live tokens of each image after the reduction of a Threshold reducer."""
    with torch.no_grad():
        return list(model.reduced_network(batch)[1].tokens.live_counts)
