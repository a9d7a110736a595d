"""``MaskFormerHead``: the pixel decoder and the transformer decoder ("predictor") under one module.

State-dict keys: ``pixel_decoder.*`` and ``predictor.*`` (``sem_seg_head.*`` inside the model),
exactly the official ones. Besides the official ``forward(features)``, the head exposes the
exits of its pixel decoder's encoder (ECO-M2F builds on them): the encoder inputs, a fixed exit,
several exits from one encoder pass, and one exit per image.
"""
from __future__ import annotations

from typing import Any, Dict, Mapping, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from .. import pixel_decoder as _pixel_decoders  # noqa: F401  (registers the builtin pixel decoders)
from .. import transformer_decoder as _transformer_decoders  # noqa: F401  (registers the builtin decoders)
from ..pixel_decoder.msdeform_encoder import EncoderInputs
from ..registry import PIXEL_DECODER_REGISTRY, SEM_SEG_HEADS_REGISTRY, TRANSFORMER_DECODER_REGISTRY, ShapeSpec, lookup

__all__ = ["MaskFormerHead"]

_TRANSFORMER_IN_FEATURES = ("multi_scale_pixel_decoder",)


@SEM_SEG_HEADS_REGISTRY.register()
class MaskFormerHead(nn.Module):
    """Built ``MaskFormerHead(cfg, input_shape)`` with input_shape the backbone's {name: ShapeSpec}."""

    def __init__(self, cfg, input_shape: Mapping[str, ShapeSpec]) -> None:
        super().__init__()
        head = cfg.MODEL.SEM_SEG_HEAD
        mf = cfg.MODEL.MASK_FORMER
        input_shape = {k: v for k, v in input_shape.items() if k in head.IN_FEATURES}
        self.in_features = [k for k, _ in sorted(input_shape.items(), key=lambda kv: kv[1].stride)]
        self.ignore_value = head.IGNORE_VALUE
        self.common_stride = 4
        self.loss_weight = head.LOSS_WEIGHT
        self.num_classes = head.NUM_CLASSES

        self.transformer_in_feature = mf.TRANSFORMER_IN_FEATURE
        if self.transformer_in_feature not in _TRANSFORMER_IN_FEATURES:
            raise ValueError(
                f"MODEL.MASK_FORMER.TRANSFORMER_IN_FEATURE='{self.transformer_in_feature}' is not supported; "
                f"use one of {list(_TRANSFORMER_IN_FEATURES)}"
            )
        pixel_decoder_cls = lookup(PIXEL_DECODER_REGISTRY, head.PIXEL_DECODER_NAME, "MODEL.SEM_SEG_HEAD.PIXEL_DECODER_NAME")
        self.pixel_decoder = pixel_decoder_cls(cfg, input_shape)
        predictor_cls = lookup(
            TRANSFORMER_DECODER_REGISTRY, mf.TRANSFORMER_DECODER_NAME, "MODEL.MASK_FORMER.TRANSFORMER_DECODER_NAME"
        )
        # the decoder reads the pixel decoder's multi-scale maps, which have CONVS_DIM channels
        self.predictor = predictor_cls(cfg, head.CONVS_DIM, mask_classification=True)

    @property
    def num_encoder_layers(self) -> int:
        """K: the deepest exit of the pixel decoder's encoder."""
        return self.pixel_decoder.num_encoder_layers

    def project_inputs(self, features: Mapping[str, torch.Tensor]) -> EncoderInputs:
        """The encoder's inputs (projected, flattened levels); ``.s1`` is the res5 level after
        ``input_proj``, ECO-M2F's gate input. Pass the result to the forwards below to reuse it."""
        return self.pixel_decoder.project_inputs(features)

    def forward(
        self,
        features: Mapping[str, torch.Tensor],
        mask: Optional[torch.Tensor] = None,
        exit_layer: Optional[int] = None,
        inputs: Optional[EncoderInputs] = None,
    ) -> Dict[str, Any]:
        """Predictions {"pred_logits", "pred_masks", "aux_outputs"}; ``exit_layer`` k stops the encoder after k layers.

        ``inputs``: :meth:`project_inputs` of ``features`` if already computed.
        """
        mask_features, _, multi_scale_features = self.pixel_decoder.forward_features(
            features, exit_layer=exit_layer, inputs=inputs
        )
        return self.predictor(multi_scale_features, mask_features, mask)

    def forward_multi_exit(
        self,
        features: Mapping[str, torch.Tensor],
        exits: Sequence[int],
        inputs: Optional[EncoderInputs] = None,
        images: Optional[Mapping[int, torch.Tensor]] = None,
    ) -> Dict[int, Dict[str, Any]]:
        """{k: predictions at exit k} from one cumulative encoder pass (the decoder runs once per exit).

        ``images[k]`` (LongTensor of batch positions, optional) restricts the decoder at exit k to
        those images; the predictions at k then hold only them, in that order.
        ``inputs``: :meth:`project_inputs` of ``features`` if already computed.
        """
        decoded = self.pixel_decoder.forward_features_multi_exit(features, exits, inputs=inputs)
        out: Dict[int, Dict[str, Any]] = {}
        for k, (mask_features, _, multi_scale) in decoded.items():
            if images is not None and k in images:
                idx = images[k]
                multi_scale = [x.index_select(0, idx) for x in multi_scale]
                mask_features = mask_features.index_select(0, idx)
            out[k] = self.predictor(multi_scale, mask_features)
        return out

    def forward_exit_subsets(
        self,
        features: Mapping[str, torch.Tensor],
        images: Mapping[int, torch.Tensor],
        inputs: Optional[EncoderInputs] = None,
    ) -> Dict[str, Any]:
        """One transformer-decoder pass over the images of several exits.

        ``images[k]`` (LongTensor of batch positions) picks the images decoded at exit k; the
        predictions hold them exit by exit in the order of ``images``, the images of an exit in
        the order given: what :meth:`forward_multi_exit` gives for each exit, concatenated over
        the batch axis. The encoder runs once, cumulatively, as there; the decoder's fixed cost per
        call (and the criterion's after it) is paid once instead of once per exit.
        """
        exits = list(images)
        decoded = self.pixel_decoder.forward_features_multi_exit(features, exits, inputs=inputs)
        mask_features = torch.cat([decoded[k][0].index_select(0, images[k]) for k in exits])  # [sum n_k, C, H, W]
        levels = len(decoded[exits[0]][2])
        multi_scale = [torch.cat([decoded[k][2][level].index_select(0, images[k]) for k in exits])
                       for level in range(levels)]
        return self.predictor(multi_scale, mask_features)

    def forward_per_image_exit(
        self, features: Mapping[str, torch.Tensor], exit_per_image: torch.Tensor, inputs: Optional[EncoderInputs] = None
    ) -> Dict[str, Any]:
        """Predictions for the batch where image b leaves the encoder after ``exit_per_image[b]`` layers.

        ``inputs``: :meth:`project_inputs` of ``features`` if already computed.
        """
        mask_features, _, multi_scale_features = self.pixel_decoder.forward_features_per_image_exit(
            features, exit_per_image, inputs=inputs
        )
        return self.predictor(multi_scale_features, mask_features)

    def benchmark_stages(self) -> Dict[str, Tuple[nn.Module, str]]:
        """The head's stages for the benchmark: pixel decoder and transformer decoder."""
        return {
            "pixel decoder": (self.pixel_decoder, "forward_features"),
            "transformer decoder": (self.predictor, "forward"),
        }
