"""Token-reduction methods as plug-ins of the Segmenter's encoder loop (``MODEL.TOKEN_REDUCTION.NAME``).

A method is a :class:`TokenReducer` registered in :data:`TOKEN_REDUCTION_REGISTRY` and built as
``cls(cfg, backbone, head)`` (the Segmenter's ViT and main decode head). When
``MODEL.TOKEN_REDUCTION.NAME`` names one, the Segmenter's encoder becomes
(:class:`~.encoder_loop.ReductionLoop`)::

    tokens = reducer.embed(backbone, images, state)             # a TokenSet
    for each run of blocks up to the next decision layer:
        tokens = run_blocks(run, tokens)                        # CUDA graphs in half-precision inference
        tokens = reducer.reduce(layer, tokens, state)           # after each of reducer.decision_layers
    decoder input: reducer.output_kind
        "dense":  every cell's token (live, or finalised with its features) back on the grid,
                  in the original order (PAUMER, DoViT);
        "tokens": the live tokens with a padding mask, for token-wise heads; their per-token
                  outputs are copied back to every cell each token stands for (CTS, dCTS);
    outputs = reducer.overlay(outputs, tokens, state)           # finalised logits over the map (DToP, early exit)

Everything a method learns or spends in one forward pass goes into the :class:`ReductionState`
it is handed: extra training losses (joined to the Segmenter's loss dict; losses on the decoder's
output, e.g. distillation, come from :meth:`TokenReducer.output_losses`), FLOPs spent outside
the ViT blocks (auxiliary heads, a policy network; the blocks, embedding, final norm and decode
head are counted by the framework), per-image cost fields, and token maps for pictures.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Sequence, Set, Tuple, Union

import torch
import torch.nn as nn
from fvcore.common.registry import Registry

from .token_set import TokenSet

if TYPE_CHECKING:  # only for annotations: the backbone and heads import nothing from here
    from ..backbone.vit import ViTBackbone, ViTFeatures
    from ..heads.vit_decode_head import ViTDecodeHead
    from .static_decision import StaticDecision

__all__ = [
    "OUTPUT_KINDS",
    "TOKEN_REDUCTION_REGISTRY",
    "ReductionState",
    "TokenMap",
    "TokenReducer",
    "overlay_final_logits",
    "paper_layers",
]

TOKEN_REDUCTION_REGISTRY = Registry("TOKEN_REDUCTION")
TOKEN_REDUCTION_REGISTRY.__doc__ = "Token-reduction methods: cls(cfg, backbone, head) -> TokenReducer."

#: How the decode head sees the reduced encoder's result (see the module docstring).
OUTPUT_KINDS = ("dense", "tokens")

#: FLOP scopes a method may charge in :meth:`ReductionState.add_flops` (the Segmenter's report names).
FLOP_SCOPES = ("backbone", "token_reducer")


@dataclass
class TokenMap:
    """What became of each grid cell's token, for one image: ``values`` (h x w long) and what each
    value means (``labels``: value -> legend text), under ``title``."""

    values: torch.Tensor
    labels: Dict[int, str]
    title: str


@dataclass
class ReductionState:
    """One forward pass of a reduced encoder: its inputs, and what the method leaves behind.

    Attributes:
        images: B x 3 x H x W normalised, padded input.
        grid: (h, w) patch grid of the input.
        targets: B x H x W int64 labels (ignore value where unknown) in training, else None.
        losses: extra training losses of the method, already weighted (joined to the Segmenter's).
        flops: scope ("backbone" or "token_reducer") -> per-image FLOPs the method spent outside
            the ViT blocks and the decode head (its embedding, auxiliary heads, a policy network).
        cost: per-image cost fields of the method (numbers or lists of numbers, each one additive,
            so that sliding windows and test-time augmentation sum them).
        record_maps: True when token maps are wanted (pictures); methods skip them otherwise.
        token_maps: name -> B x h*w long values of a method's own map (e.g. the window size of
            each cell's shared token), with ``token_map_labels[name]``: value -> legend text.
        scratch: anything else the method keeps between its calls within the pass.
    """

    images: torch.Tensor
    grid: Tuple[int, int]
    targets: Optional[torch.Tensor] = None
    losses: Dict[str, torch.Tensor] = field(default_factory=dict)
    flops: Dict[str, List[int]] = field(default_factory=dict)
    cost: List[Dict[str, Any]] = field(default_factory=list)
    record_maps: bool = False
    token_maps: Dict[str, torch.Tensor] = field(default_factory=dict)
    token_map_labels: Dict[str, Dict[int, str]] = field(default_factory=dict)
    scratch: Dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.cost:
            self.cost = [{} for _ in range(self.batch_size)]

    @property
    def batch_size(self) -> int:
        return int(self.images.shape[0])

    @property
    def training(self) -> bool:
        """True in a training step (targets given)."""
        return self.targets is not None

    def add_flops(self, scope: str, per_image: Union[int, Sequence[int]]) -> None:
        """Charge FLOPs to ``scope``: one number for every image, or one per image."""
        if scope not in FLOP_SCOPES:
            raise ValueError(f"unknown FLOP scope '{scope}'; a token-reduction method charges one of {list(FLOP_SCOPES)}")
        values = [int(per_image)] * self.batch_size if isinstance(per_image, (int, float)) else [int(v) for v in per_image]
        if len(values) != self.batch_size:
            raise ValueError(f"add_flops('{scope}') got {len(values)} values for a batch of {self.batch_size}")
        old = self.flops.get(scope, [0] * self.batch_size)
        self.flops[scope] = [a + b for a, b in zip(old, values)]

    def add_cost(self, name: str, per_image: Sequence[Any]) -> None:
        """Set the cost field ``name`` of every image (numbers or lists of numbers, additive)."""
        if len(per_image) != self.batch_size:
            raise ValueError(f"add_cost('{name}') got {len(per_image)} values for a batch of {self.batch_size}")
        for record, value in zip(self.cost, per_image):
            record[name] = value


class TokenReducer(nn.Module):
    """Base class of the token-reduction methods of the Segmenter.

    Subclasses set :attr:`decision_layers` (in ``__init__``, from their config) and implement
    :meth:`reduce`; the other hooks have defaults that suit a method which only removes tokens.
    Their parameters (auxiliary heads...) live in the module and are saved under
    ``token_reducer.*`` in the Segmenter's state dict.
    """

    #: "dense" or "tokens": how the decode head sees the result (see the module docstring).
    output_kind: str = "dense"
    #: False when the FLOPs of an image depend only on its size (e.g. top-k with fixed ratios),
    #: so that one count per input size serves every image.
    content_dependent_cost: bool = True

    def __init__(self, cfg: Any, backbone: "ViTBackbone", head: "ViTDecodeHead") -> None:
        super().__init__()
        #: 0-based block indices after which :meth:`reduce` runs, ascending.
        self.decision_layers: Tuple[int, ...] = ()

    # ------------------------------------------------------------------ the loop
    def embed(self, backbone: "ViTBackbone", images: torch.Tensor, state: ReductionState) -> TokenSet:
        """Images -> the token set the first block sees. Default: the ViT's own embedding, one
        token per patch (a method that shares tokens builds its superpatches here and charges
        their FLOPs; the framework then counts nothing for the embedding)."""
        from .cost import patch_embedding_flops

        tokens, grid = backbone.prepare_tokens(images)
        state.add_flops("backbone", patch_embedding_flops(backbone, grid))
        return TokenSet.from_dense(tokens, grid, backbone.num_prefix_tokens)

    def reduce(self, layer: int, tokens: TokenSet, state: ReductionState) -> TokenSet:
        """After block ``layer`` (0-based, one of :attr:`decision_layers`): the tokens that go on."""
        raise NotImplementedError(f"{type(self).__name__} does not implement reduce()")

    def static_decision(self, layer: int, tokens: TokenSet, state: ReductionState) -> Optional["StaticDecision"]:
        """The decision after block ``layer`` as a :class:`~.static_decision.StaticDecision`, to be
        captured in the CUDA graph of the blocks before it, for ``tokens`` (the set those blocks
        get); None (the default) runs :meth:`reduce` instead. Asked only in graph-replayed
        inference with ``MODEL.TOKEN_REDUCTION.GRAPH_DECISIONS``; its result must equal
        :meth:`reduce`'s."""
        return None

    def overlay(self, outputs: Dict[str, Any], tokens: TokenSet, state: ReductionState) -> Dict[str, Any]:
        """The decode head's dense outputs with every finalised cell's logits put over them
        (the cells whose token left with ``save_logits``); unchanged when none did."""
        return overlay_final_logits(outputs, tokens)

    # ------------------------------------------------------------------ description
    def describe_exit(self, blocks: int, depth: int) -> str:
        """Legend of a cell whose token went through ``blocks`` of the ``depth`` blocks."""
        return f"all {depth} blocks" if blocks >= depth else f"left after block {blocks}"

    def check_head(self, head: "ViTDecodeHead") -> None:
        """Raise when the method cannot feed ``head`` (called once by the Segmenter)."""
        if self.output_kind == "tokens" and head.input_kind == "grid":
            raise ValueError(
                f"{type(self).__name__} hands live tokens to the decoder, but {type(head).__name__} needs the "
                "dense grid; use a token-wise head (SegmenterLinearHead, SegmenterMaskTransformerHead, ATMHead)"
            )

    # ------------------------------------------------------------------ checkpoints
    def load_extra_weights(self) -> None:
        """Load the parts whose weights live in files of their own (e.g. a frozen policy
        network), which the constructor only names; the Segmenter's ``load_extra_weights`` calls
        it once, after construction."""

    def keys_loaded_elsewhere(self) -> Set[str]:
        """Keys of this module's state dict that :meth:`load_extra_weights` filled (a Segmenter
        checkpoint may lack them)."""
        return set()

    # ------------------------------------------------------------------ training
    def on_train_iteration(self, iteration: int, max_iter: int) -> None:
        """Forwarded from the Segmenter before every training step (schedules)."""

    def output_losses(self, head: "ViTDecodeHead", outputs: Dict[str, Any], features: "ViTFeatures", state: ReductionState) -> None:
        """Training: losses on what the decoder made of the reduced encoder (e.g. distillation from
        a teacher), into ``state.losses``. ``outputs`` are the main head's dense outputs (copied
        back and overlaid), ``features`` its input. Default: none."""


def paper_layers(values: Sequence[Any], depth: int, key: str) -> Tuple[int, ...]:
    """Layers in the papers' numbering (layer l = the l-th of ``depth`` blocks, 1-based; a method
    acting "after layer l" reads its output) -> the 0-based blocks after which it acts. ``key``
    names the config list in the error (distinct, ascending, within 1..depth - 1)."""
    layers = [int(v) for v in values]
    if not layers or layers != sorted(set(layers)) or not all(1 <= v < depth for v in layers):
        raise ValueError(
            f"{key} {list(values)}: distinct ascending layers in 1..{depth - 1} "
            f"(the papers' numbering: layer l is block l - 1 of the {depth})"
        )
    return tuple(v - 1 for v in layers)


def overlay_final_logits(outputs: Dict[str, Any], tokens: TokenSet) -> Dict[str, Any]:
    """Dense head outputs with the finalised logits of ``tokens`` over their cells: on the
    per-token class logits ``"pred_tokens"`` (B x G x K), or on ``"pred_maps"`` (B x K x H' x W',
    each cell covering an s x s block of it)."""
    if "logits" not in tokens.finals:
        return outputs
    cells = tokens.final_cells("logits")  # B x G
    out = dict(outputs)
    if "pred_tokens" in out:
        out["pred_tokens"] = tokens.overlay_final(out["pred_tokens"], "logits")
        return out
    if "pred_maps" not in out:
        raise ValueError("finalised logits need per-token class logits ('pred_tokens') or class maps ('pred_maps')")
    maps = out["pred_maps"]
    (b, k, hh, ww), (h, w) = maps.shape, tokens.grid
    if hh % h or ww % w:
        raise ValueError(f"class maps of {hh} x {ww} do not cover the {h} x {w} grid in whole blocks")
    final = tokens.overlay_final(maps.new_zeros(b, h * w, k), "logits").transpose(1, 2).reshape(b, k, h, w)
    mask = cells.view(b, 1, h, w)
    up = (hh // h, ww // w)
    final = final.repeat_interleave(up[0], dim=2).repeat_interleave(up[1], dim=3)  # B x K x H' x W'
    mask = mask.repeat_interleave(up[0], dim=2).repeat_interleave(up[1], dim=3)
    out["pred_maps"] = torch.where(mask, final, maps)
    return out
