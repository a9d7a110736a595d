"""Plain-ViT semantic segmentation (``MODEL.META_ARCHITECTURE: "Segmenter"``).

ViT encoder (``MODEL.BACKBONE.NAME: "build_vit_backbone"``) -> decode head
(``MODEL.SEM_SEG_HEAD.NAME``: ``SegmenterLinearHead``, ``SegmenterMaskTransformerHead``,
``SETRNaiveHead``, ``SETRPUPHead``, ``ATMHead``) -> bilinear upsampling to the padded input ->
crop of the padding (Strudel et al. 2021; SETR; SegViT). Images are padded at the bottom/right
to a multiple of the patch size. Optional auxiliary heads (``MODEL.SEM_SEG_HEAD.AUX_LAYERS``)
on intermediate blocks train with their own weights and loss weight.

Training targets are ``batched_inputs[i]["sem_seg"]`` (int64 H x W, ignore label where unknown),
so any semantic mapper works. Inference: whole image or sliding window (``TEST.SLIDE``),
optionally over scales and flips (``TEST.AUG``); ``"sem_seg"`` holds class probabilities
(K x height x width) at the original size.

Token reduction takes over :meth:`Segmenter.encode`, the one place where images become the
decoder's tokens: with ``MODEL.TOKEN_REDUCTION.NAME`` set, the registered
:class:`~eco_m2f.modeling.token_reduction.plugin.TokenReducer` acts between the ViT's blocks
(:class:`~eco_m2f.modeling.token_reduction.encoder_loop.ReductionLoop`) and hands back the dense
map or live tokens with a ``padding_mask`` for the token-wise heads; its extra losses join the
loss dict. Without it the Segmenter is the dense model. Every eval output carries its per-image
``"cost"`` record (:mod:`eco_m2f.modeling.token_reduction.cost`: live tokens per block, GFLOPs),
the dense model's too.
"""
from __future__ import annotations

from collections import defaultdict
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Set, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..backbone.vit import ViTBackbone, ViTFeatures
from ..heads.vit_decode_head import ViTDecodeHead, resize_logits, tokens_to_map
from ..registry import META_ARCH_REGISTRY, SEM_SEG_HEADS_REGISTRY
from ..token_reduction.cost import cost_records, dense_cost_records, merge_cost_records
from ..token_reduction.encoder_loop import ReducedPass, ReductionLoop, grid_outputs
from ..token_reduction.build import build_token_reducer
from ..token_reduction.graphed_head import GraphedHead
from ..token_reduction.plugin import TokenMap, TokenReducer
from .base import SegmentationModel
from .dense_inference import predict_sliding, predict_whole
from .segmenter_keys import is_official_segmenter_state_dict, official_segmenter_to_ours

__all__ = ["Segmenter", "build_vit_head"]


def build_vit_head(cfg: Any, name: str, backbone: ViTBackbone, *, auxiliary: bool = False) -> ViTDecodeHead:
    """The registered decode head ``name`` on ``backbone``'s tokens (a clear error for unknown names)."""
    key = "MODEL.SEM_SEG_HEAD.AUX_NAME" if auxiliary else "MODEL.SEM_SEG_HEAD.NAME"
    try:
        cls = SEM_SEG_HEADS_REGISTRY.get(name)
    except KeyError as exc:
        known = sorted(n for n, c in SEM_SEG_HEADS_REGISTRY if isinstance(c, type) and issubclass(c, ViTDecodeHead))
        raise KeyError(f"{key} '{name}' is not a registered decode head; the Segmenter heads are {known}") from exc
    if not (isinstance(cls, type) and issubclass(cls, ViTDecodeHead)):
        raise TypeError(f"{key} '{name}' is not a ViT decode head (a {ViTDecodeHead.__name__})")
    return cls(cfg, backbone.output_shape(), auxiliary=auxiliary)


def _pair(value: Sequence[int], key: str) -> Tuple[int, int]:
    values = [int(v) for v in value]
    if len(values) != 2 or min(values) <= 0:
        raise ValueError(f"{key} must be two positive integers (height, width), got {list(value)}")
    return values[0], values[1]


@META_ARCH_REGISTRY.register()
class Segmenter(SegmentationModel):
    """ViT + decode head for semantic segmentation; see the module docstring."""

    def __init__(self, cfg: Any) -> None:
        from ..backbone.build import build_backbone

        backbone = build_backbone(cfg)
        if not isinstance(backbone, ViTBackbone):
            raise TypeError(
                f"Segmenter needs a ViT backbone (MODEL.BACKBONE.NAME 'build_vit_backbone'), "
                f"got '{cfg.MODEL.BACKBONE.NAME}' ({type(backbone).__name__})"
            )
        super().__init__(cfg, size_divisibility=backbone.patch_size, tasks={"sem_seg"})
        self.backbone = backbone
        head = cfg.MODEL.SEM_SEG_HEAD
        self.sem_seg_head = build_vit_head(cfg, head.NAME, backbone)
        # A head on intermediate levels (ATM) leaves the final norm, and any block after its
        # deepest level, without gradient: DDP must look for unused parameters then.
        self.find_unused_parameters = self.sem_seg_head.input_kind == "levels"
        self.num_classes = int(head.NUM_CLASSES)
        self.ignore_value = int(head.IGNORE_VALUE)

        self.aux_layers: Tuple[int, ...] = backbone.block_indices(head.AUX_LAYERS, "MODEL.SEM_SEG_HEAD.AUX_LAYERS")
        missing = [i for i in self.aux_layers if i not in backbone.out_indices]
        if missing:
            raise ValueError(
                f"MODEL.SEM_SEG_HEAD.AUX_LAYERS {list(head.AUX_LAYERS)}: blocks {missing} are not in "
                f"MODEL.VIT.OUT_INDICES {list(cfg.MODEL.VIT.OUT_INDICES)}"
            )
        aux_name = head.AUX_NAME or head.NAME
        self.auxiliary_heads = nn.ModuleList(
            build_vit_head(cfg, aux_name, backbone, auxiliary=True) for _ in self.aux_layers
        )

        reduction = cfg.MODEL.TOKEN_REDUCTION
        #: the token-reduction method acting between the blocks; None: the dense encoder
        self.token_reducer: Optional[TokenReducer] = None
        self._reduction: Optional[ReductionLoop] = None
        #: graph replay of a token-wise head on the dense grid a reduced pass hands back (GRAPH_HEAD)
        self._graphed_head: Optional[GraphedHead] = None
        if reduction.NAME:
            self.token_reducer = build_token_reducer(cfg, backbone, self.sem_seg_head)
            self._reduction = ReductionLoop(backbone, self.token_reducer, str(reduction.ATTENTION), bool(reduction.CUDA_GRAPHS),
                                            bool(reduction.GRAPH_DECISIONS), bool(reduction.COMPILE_DECISIONS))
            if self._reduction.cuda_graphs and bool(reduction.GRAPH_HEAD):
                self._graphed_head = GraphedHead(options=self._reduction.inference_options())  # the blocks' buckets and attention
        self._init_inference(cfg)
        self._check_train_crop(cfg)

    def _init_inference(self, cfg: Any) -> None:
        patch = self.backbone.patch_size
        slide = cfg.TEST.SLIDE
        self.slide = bool(slide.ENABLED)
        self.slide_crop = _pair(slide.CROP_SIZE, "TEST.SLIDE.CROP_SIZE")
        self.slide_stride = _pair(slide.STRIDE, "TEST.SLIDE.STRIDE")
        self.slide_batch_size = int(slide.BATCH_SIZE)
        if self.slide:
            if any(c % patch for c in self.slide_crop):
                raise ValueError(
                    f"TEST.SLIDE.CROP_SIZE {list(self.slide_crop)} is not a multiple of the patch size {patch}"
                )
            if any(s > c for s, c in zip(self.slide_stride, self.slide_crop)):
                raise ValueError(
                    f"TEST.SLIDE.STRIDE {list(self.slide_stride)} exceeds TEST.SLIDE.CROP_SIZE {list(self.slide_crop)}: "
                    "pixels between windows would get no prediction"
                )
            if self.slide_batch_size < 0:
                raise ValueError(f"TEST.SLIDE.BATCH_SIZE must be >= 0 (0 = all windows at once), got {slide.BATCH_SIZE}")
        aug = cfg.TEST.AUG
        sizes: List[Optional[int]] = [int(s) for s in aug.MIN_SIZES] if aug.ENABLED else [None]
        if aug.ENABLED and (not sizes or min(sizes) <= 0):
            raise ValueError(f"TEST.AUG.MIN_SIZES must be positive sizes, got {list(aug.MIN_SIZES)}")
        flips = (False, True) if aug.ENABLED and aug.FLIP else (False,)
        #: (shortest edge or None for the input's own size, horizontal flip) of every test pass
        self.test_variants: List[Tuple[Optional[int], bool]] = [(s, f) for s in sizes for f in flips]
        self.test_max_size = int(aug.MAX_SIZE)

    def _check_train_crop(self, cfg: Any) -> None:
        crop = cfg.INPUT.CROP
        if crop.ENABLED and crop.TYPE == "absolute":
            size = [int(s) for s in crop.SIZE]
            if any(s % self.backbone.patch_size for s in size):
                raise ValueError(
                    f"INPUT.CROP.SIZE {size} is not a multiple of the patch size {self.backbone.patch_size}: "
                    "every crop would be padded"
                )

    # ------------------------------------------------------------------ network
    def encode(self, images: torch.Tensor) -> ViTFeatures:
        """Normalised, padded B x 3 x H x W -> the decoder's tokens (the dense ViT, or the
        token-reduction loop)."""
        if self._reduction is None:
            return self.backbone(images)
        return self._reduction.encode(images).features

    def run_head(self, head: ViTDecodeHead, features: ViTFeatures, layer: Optional[int] = None) -> Dict[str, Any]:
        """``head`` on the final tokens (``layer`` None) or on block ``layer``'s output, in the head's input kind."""
        if layer is None:
            tokens = features.tokens
            levels = [features.layers[i] for i in self.backbone.out_indices]
        else:
            tokens = features.layers[layer]
            levels = [tokens]
        if head.input_kind == "tokens":
            # tokens whose shape depends on the batch alone: the dense grid, or a fixed count per image
            # (fixed-S CTS); counts that follow the content would capture a graph per count
            graphed = self._graphed_head
            if graphed is not None and graphed.applies(head, tokens) and (
                features.dense or (features.padding_mask is None and not self.token_reducer.content_dependent_cost)
            ):
                return graphed(head, tokens)
            # counts that follow the content: the packed live rows in a graph per row bucket
            lengths = features.lengths
            if lengths is None and features.padding_mask is None:
                lengths = (tokens.shape[1],) * tokens.shape[0]
            if graphed is not None and not features.dense and lengths is not None and graphed.applies_packed(head, tokens):
                return graphed.packed(head, tokens, lengths)
            return head(tokens, features.padding_mask, lengths=features.lengths)
        if head.input_kind == "levels":
            return head(levels, features.padding_mask)
        if not features.dense:
            raise ValueError(f"{type(head).__name__} needs the dense token grid; scatter the live tokens back first")
        return head(tokens_to_map(tokens, features.grid))  # B x C x h x w

    def head_outputs(
        self, head: ViTDecodeHead, features: ViTFeatures, reduced: Optional[ReducedPass] = None, layer: Optional[int] = None
    ) -> Dict[str, Any]:
        """:meth:`run_head`; after a reduced pass, with the per-token outputs copied back to the
        grid and (main head) the reducer's finalised logits put over them."""
        outputs = self.run_head(head, features, layer)
        if reduced is None:
            return outputs
        if self.token_reducer.output_kind == "tokens":
            outputs = grid_outputs(outputs, head, reduced.tokens)
        if layer is None:
            outputs = self.token_reducer.overlay(outputs, reduced.tokens, reduced.state)
        return outputs

    def network(self, images: torch.Tensor, cost: Optional[Mapping[str, Any]] = None) -> torch.Tensor:
        """Class scores B x K x H x W of a normalised batch padded to the patch size (logits,
        or SegViT's class x mask probabilities for ``ATMHead``), at the input's size. A token
        reducer's path depends only on the image, so ``cost`` is not needed to retrace it."""
        if self._reduction is not None:
            return self.reduced_network(images)[0]
        features = self.encode(images)
        outputs = self.run_head(self.sem_seg_head, features)
        return self.sem_seg_head.semantic_logits(outputs, features.grid, images.shape[-2:])

    def reduced_network(self, images: torch.Tensor, record_maps: bool = False) -> Tuple[torch.Tensor, ReducedPass]:
        """:meth:`network` of a token-reduction Segmenter, with the pass it ran."""
        if self._reduction is None:
            raise ValueError("reduced_network needs a token-reduction method (MODEL.TOKEN_REDUCTION.NAME)")
        reduced = self._reduction.encode(images, record_maps=record_maps)
        outputs = self.head_outputs(self.sem_seg_head, reduced.features, reduced)
        return self.sem_seg_head.semantic_logits(outputs, reduced.features.grid, images.shape[-2:]), reduced

    def cost_records(self, reduced: ReducedPass, size: Sequence[int]) -> List[Dict[str, Any]]:
        """Per image of a reduced pass with outputs of ``size`` (H, W): its cost record."""
        return cost_records(
            self.backbone, self.sem_seg_head, reduced.tokens, reduced.state, size, reduced.norm_tokens, reduced.head_tokens
        )

    @property
    def records_token_maps(self) -> bool:
        """Every token-reduction method records at least the framework's ``"blocks"`` map."""
        return self._reduction is not None

    @torch.no_grad()
    def token_maps(self, images: torch.Tensor) -> List[Dict[str, TokenMap]]:
        """Per image of a normalised padded batch, what became of each cell's token: the
        framework's ``"blocks"`` map (blocks each token went through) and the method's own."""
        if self._reduction is None:
            raise ValueError("token maps need a token-reduction method (MODEL.TOKEN_REDUCTION.NAME)")
        return self._reduction.token_maps(self.reduced_network(images, record_maps=True)[1])

    @property
    def dynamic_cost(self) -> bool:
        return self.token_reducer is not None and self.token_reducer.content_dependent_cost

    def flop_scopes(self) -> Dict[str, str]:
        scopes = {"backbone": "backbone", "decode_head": "sem_seg_head"}
        if self.token_reducer is not None:
            scopes["token_reducer"] = "token_reducer"
        return scopes

    def benchmark_stages(self) -> Dict[str, Tuple[Any, str]]:
        encoder = (self, "encode") if self._reduction is None else (self._reduction, "encode")
        return {"backbone": encoder, "decode_head": (self.sem_seg_head, "forward")}

    # ------------------------------------------------------------------ training
    def prepare_targets(self, batched_inputs: List[Dict[str, Any]], size: Tuple[int, int]) -> torch.Tensor:
        """B x H_pad x W_pad int64 labels, the padding ignored; labels outside the classes are an error."""
        targets = torch.full((len(batched_inputs), *size), self.ignore_value, dtype=torch.int64)
        for i, x in enumerate(batched_inputs):
            if "sem_seg" not in x:
                raise KeyError(f"Segmenter trains on 'sem_seg' labels; input {x.get('file_name', i)!r} has none")
            sem = x["sem_seg"]
            bad = (sem != self.ignore_value) & ((sem < 0) | (sem >= self.num_classes))
            if bool(bad.any()):
                raise ValueError(
                    f"{x.get('file_name', f'input {i}')}: sem_seg holds labels {sorted(sem[bad].unique().tolist())[:10]} "
                    f"outside 0..{self.num_classes - 1} (MODEL.SEM_SEG_HEAD.NUM_CLASSES) and the ignore label "
                    f"{self.ignore_value}"
                )
            targets[i, : sem.shape[-2], : sem.shape[-1]] = sem
        return targets.to(self.device, non_blocking=True)

    def losses(self, images: torch.Tensor, targets: torch.Tensor) -> Dict[str, torch.Tensor]:
        """The main head's weighted losses, plus ``<name>_aux<layer>`` of every auxiliary head
        and the token reducer's own losses."""
        reduced = None if self._reduction is None else self._reduction.encode(images, targets)
        features = self.encode(images) if reduced is None else reduced.features
        main = self.head_outputs(self.sem_seg_head, features, reduced)
        losses = self.sem_seg_head.losses(main, targets, features.grid)
        for layer, head in zip(self.aux_layers, self.auxiliary_heads):
            aux = head.losses(self.head_outputs(head, features, reduced, layer), targets, features.grid)
            losses.update({f"{name}_aux{layer}": value for name, value in aux.items()})
        if reduced is not None:
            self.token_reducer.output_losses(self.sem_seg_head, main, features, reduced.state)
            clash = sorted(set(reduced.state.losses) & set(losses))
            if clash:
                raise ValueError(f"{type(self.token_reducer).__name__} names losses {clash} that the Segmenter already has")
            losses.update(reduced.state.losses)
        return losses

    def on_train_iteration(self, iteration: int, max_iter: int) -> None:
        if self.token_reducer is not None:
            self.token_reducer.on_train_iteration(iteration, max_iter)

    def forward(self, batched_inputs: List[Dict[str, Any]]) -> Any:
        """Losses in training mode; ``[{"sem_seg": K x height x width, "cost": record}]`` in eval mode."""
        if self.training:
            images = self.preprocess_image(batched_inputs)
            return self.losses(images.tensor, self.prepare_targets(batched_inputs, images.tensor.shape[-2:]))
        return self.inference(batched_inputs)

    # ------------------------------------------------------------------ inference
    def predict(self, images: Sequence[torch.Tensor], recorder: Optional[_CostRecorder] = None) -> List[torch.Tensor]:
        """Scores K x h x w of each normalised C x h x w image: sliding window or whole image;
        ``recorder`` runs the network instead and keeps every pass's cost records."""
        network: Callable[[torch.Tensor], torch.Tensor] = self.network if recorder is None else recorder
        on_batch = None if recorder is None else recorder.assign
        if self.slide:
            return predict_sliding(
                network, images, self.slide_crop, self.slide_stride, self.size_divisibility, self.slide_batch_size,
                on_batch=on_batch,
            )
        return predict_whole(network, images, self.size_divisibility, on_batch=on_batch)

    def _rescaled(self, image: torch.Tensor, short_edge: Optional[int]) -> torch.Tensor:
        from ...data.augmentations import shortest_edge_output_shape

        if short_edge is None:
            return image
        size = shortest_edge_output_shape(image.shape[-2], image.shape[-1], short_edge, self.test_max_size)
        if tuple(size) == tuple(image.shape[-2:]):
            return image
        return F.interpolate(image[None], size=size, mode="bilinear", align_corners=False)[0]

    @torch.no_grad()
    def inference(self, batched_inputs: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
        """Class probabilities at each image's original size, averaged over the test variants
        (logits are averaged over overlapping windows, resized, then turned into probabilities),
        and each image's cost record (``"passes"``: network passes spent on it)."""
        images = [
            (x["image"].to(self.device, non_blocking=True).float() - self.pixel_mean) / self.pixel_std
            for x in batched_inputs
        ]
        out_sizes = [(int(x.get("height", im.shape[-2])), int(x.get("width", im.shape[-1]))) for x, im in zip(batched_inputs, images)]
        totals: List[Optional[torch.Tensor]] = [None] * len(images)
        recorder = _CostRecorder(self)
        for short_edge, flip in self.test_variants:
            variant = [self._rescaled(im, short_edge) for im in images]
            if flip:
                variant = [im.flip(-1) for im in variant]
            for i, scores in enumerate(self.predict(variant, recorder)):
                if flip:
                    scores = scores.flip(-1)
                scores = resize_logits(scores[None].float(), out_sizes[i])[0]
                if self.sem_seg_head.scores_are_logits:
                    scores = scores.softmax(dim=0)
                totals[i] = scores if totals[i] is None else totals[i] + scores
        return [
            {"sem_seg": t / len(self.test_variants), "cost": merge_cost_records(recorder.records[i])}
            for i, t in enumerate(totals)
        ]

    # ------------------------------------------------------------------ devices
    def _apply(self, fn, *args, **kwargs):
        """Moving or casting the parameters invalidates the captured CUDA graphs."""
        out = super()._apply(fn, *args, **kwargs)
        if getattr(self, "_reduction", None) is not None:
            self._reduction.reset()
        if getattr(self, "_graphed_head", None) is not None:
            self._graphed_head.reset()
        return out

    # ------------------------------------------------------------------ checkpoints
    def load_extra_weights(self) -> None:
        """The token reducer's own files (e.g. the frozen policy network of CTS / dCTS)."""
        if self.token_reducer is not None:
            self.token_reducer.load_extra_weights()

    def keys_loaded_elsewhere(self) -> Set[str]:
        if self.token_reducer is None:
            return set()
        return {f"token_reducer.{k}" for k in self.token_reducer.keys_loaded_elsewhere()}

    def checkpoint_layout_map(self, state_dict: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        """Official Segmenter names (``encoder.*`` / ``decoder.*``) -> ours; other layouts pass unchanged."""
        if is_official_segmenter_state_dict(state_dict):
            return official_segmenter_to_ours(state_dict)
        return dict(state_dict)


class _CostRecorder:
    """The network of a Segmenter for the dense-inference helpers, keeping the cost record of
    every image of every pass (windows, test variants) under the image's index."""

    def __init__(self, model: Segmenter) -> None:
        self.model = model
        self.records: Dict[int, List[Dict[str, Any]]] = defaultdict(list)
        self._pending: List[Dict[str, Any]] = []

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        model, size = self.model, images.shape[-2:]
        if model.token_reducer is None:
            patch = model.backbone.patch_size
            grid = (-(-size[0] // patch), -(-size[1] // patch))
            self._pending = dense_cost_records(model.backbone, model.sem_seg_head, images.shape[0], grid, size)
            return model.network(images)
        logits, reduced = model.reduced_network(images)
        self._pending = model.cost_records(reduced, size)
        return logits

    def assign(self, indices: Sequence[int]) -> None:
        """The rows of the last pass belong to these images."""
        if len(indices) != len(self._pending):
            raise RuntimeError(f"{len(indices)} images for a pass of {len(self._pending)}")
        for i, record in zip(indices, self._pending):
            self.records[int(i)].append(record)
        self._pending = []
