"""DToP: dynamic token pruning (Tang et al. 2023, as used by STEP, papers/003;
``MODEL.TOKEN_REDUCTION.NAME: "DTOP"``, keys ``...DTOP.*``).

After each prune layer an auxiliary head predicts a class for every live patch token. A token
whose top class score exceeds theta is finalised: it leaves the packed sequence (later blocks
neither see it nor pay for it) with the auxiliary prediction, which stands for its cells in
the final map (:meth:`DTOP.overlay`). The exception: in every image the k most confident live
tokens of each predicted class stay, however confident, so that later heads still see every
class. The rank behind that rule is one segmented sort of all live tokens by (image, class,
confidence): no loop over images, one host sync per prune layer (the kept counts).

Layer numbering: as the papers, layer l is the l-th block (1-based) and pruning "at layer l"
reads its output; ``PRUNE_LAYERS`` uses that numbering, so [6, 8] (DToP ViT-B) prunes after
0-based blocks 5 and 7, [8, 16] (ViT-L) after 7 and 15, [18] (STEP@[18]) after 17.

Auxiliary heads: ``"linear"`` (LayerNorm + Linear per token; confidence = max softmax
probability) or ``"atm"`` (a one-level ATM decoder on the live tokens with a padding mask;
confidence = max over classes of softmax(class) x sigmoid(mask), SegViT's score).

The decoder: token-wise heads (linear, mask transformer, ATM) decode only the tokens that reach
the last block (``output_kind`` "tokens"; ATM's shallower levels are read for those tokens
only); grid heads (SETR) decode the full grid, pruned cells holding their features from the
prune layer (``output_kind`` "dense"). Either way the finalised cells then take the auxiliary
prediction, in the space the Segmenter turns into probabilities:

* heads whose scores are logits (softmax at inference): the linear head's logits, or the log of
  an ATM auxiliary head's scores, replace the decoder's per-token logits (``"pred_tokens"``,
  before the bilinear upsampling) or its class maps' blocks (``"pred_maps"``);
* ATM as the main head (scores = softmax(class) x sigmoid(mask), no softmax after): the
  auxiliary class probabilities (softmax of the linear head, or the ATM head's scores) replace
  the score map's blocks of the finalised cells (``"final_scores"`` / ``"final_cells"``, read
  by :meth:`~eco_m2f.modeling.heads.atm.ATMHead.semantic_logits`); for the ATM loss in training,
  their mask logits become logit(p) of those probabilities (query k is class k).

Training (step 2, fine-tuning a dense model): each auxiliary head's loss on the tokens live at
its layer, weight ``AUX_LOSS_WEIGHT``; with ``PRUNE_IN_TRAINING`` tokens are pruned as in
inference and their auxiliary predictions stand in the map the main loss sees (gradients reach
the auxiliary heads through them). theta >= 1 prunes nothing and runs no head in inference:
the dense Segmenter, exactly. With ``MODEL.TOKEN_REDUCTION.GRAPH_DECISIONS`` a decision of the
linear heads is captured in the CUDA graph of the blocks before it (:meth:`DTOP.static_decision`:
the head, the ranking, the removal and the finalised values on the graph's rows; only the
kept counts wait for the host); ATM auxiliary heads, which attend over each image's tokens,
decide eagerly. Cost records: ``pruned`` (tokens pruned at each prune layer);
token map ``"pruned at layer"``.
"""
from __future__ import annotations

from typing import Any, Dict, Optional, Tuple

import torch
import torch.nn as nn
from timm.layers import trunc_normal_

from ...heads.vit_decode_head import tokens_to_map
from ..flops import token_wise_flops
from ..packing import HostCopy
from ..plugin import TOKEN_REDUCTION_REGISTRY, ReductionState, TokenReducer, overlay_final_logits, paper_layers
from ..static_decision import StaticDecision, finish_keep, patch_row_images, static_keep
from ..token_set import TokenSet
from ..token_targets import cell_class_counts, live_token_cross_entropy

__all__ = ["AUX_HEADS", "DTOP", "PRUNED_MAP", "prune_mask", "rank_within_class"]

_KEY = "MODEL.TOKEN_REDUCTION.DTOP"
AUX_HEADS = ("linear", "atm")
#: Name of DToP's token map: the prune layer of each cell's token (0: reached the last head).
PRUNED_MAP = "pruned at layer"
_MASK_FILL = -1e4  # mask logit of a cell that an auxiliary ATM head does not see (sigmoid 0)
_PROB_EPS = 1e-6


def rank_within_class(confidence: torch.Tensor, label: torch.Tensor, image: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(T,) rank of every token among the tokens of its image with the same ``label``, by
    ``confidence`` descending (0 = the most confident). One segmented sort, no loop."""
    t = confidence.shape[0]
    if t == 0:
        return torch.zeros(0, dtype=torch.long, device=confidence.device)
    order = confidence.argsort(descending=True, stable=True)
    group = image.long() * num_classes + label.long()  # (T,) segment of every token
    order = order.index_select(0, group.index_select(0, order).argsort(stable=True))  # by segment, then confidence
    sorted_group = group.index_select(0, order)
    position = torch.arange(t, device=confidence.device)
    # first position of each segment: positions where the segment changes
    start = torch.ones(t, dtype=torch.bool, device=confidence.device)
    start[1:] = sorted_group[1:] != sorted_group[:-1]
    first = torch.cummax(torch.where(start, position, 0), 0).values
    return torch.empty_like(position).index_copy(0, order, position - first)


def prune_mask(confidence: torch.Tensor, label: torch.Tensor, image: torch.Tensor, num_classes: int, theta: float, top_k: int) -> torch.Tensor:
    """(T,) bool: tokens above ``theta`` that are not among the ``top_k`` most confident of
    their predicted class in their image."""
    above = confidence > theta
    if top_k <= 0:
        return above
    return above & (rank_within_class(confidence, label, image, num_classes) >= top_k)


@TOKEN_REDUCTION_REGISTRY.register()
class DTOP(TokenReducer):
    """Dynamic token pruning by auxiliary heads inside the ViT; see the module docstring."""

    def __init__(self, cfg: Any, backbone, head) -> None:
        super().__init__(cfg, backbone, head)
        d = cfg.MODEL.TOKEN_REDUCTION.DTOP
        self.decision_layers = paper_layers(d.PRUNE_LAYERS, backbone.depth, f"{_KEY}.PRUNE_LAYERS")
        layers = [v + 1 for v in self.decision_layers]
        self.theta = float(d.THETA)
        if not self.theta > 0:
            raise ValueError(f"{_KEY}.THETA must be > 0 (1.0 or more prunes nothing), got {d.THETA}")
        self.top_k = int(d.TOP_K_PER_CLASS)
        if self.top_k < 0 or self.top_k != float(d.TOP_K_PER_CLASS):
            raise ValueError(f"{_KEY}.TOP_K_PER_CLASS must be an integer >= 0 (0 = no exception), got {d.TOP_K_PER_CLASS}")
        self.aux_head = str(d.AUX_HEAD)
        if self.aux_head not in AUX_HEADS:
            raise ValueError(f"{_KEY}.AUX_HEAD '{d.AUX_HEAD}' is not one of {list(AUX_HEADS)}")
        self.aux_loss_weight = float(d.AUX_LOSS_WEIGHT)
        if self.aux_loss_weight < 0:
            raise ValueError(f"{_KEY}.AUX_LOSS_WEIGHT must be >= 0, got {d.AUX_LOSS_WEIGHT}")
        self.prune_in_training = bool(d.PRUNE_IN_TRAINING)
        #: prune layers in the papers' numbering
        self.prune_layers: Tuple[int, ...] = tuple(layers)
        self.output_kind = "dense" if head.input_kind == "grid" else "tokens"
        #: False when the main head's scores are probabilities already (ATM): finalised cells then hold probabilities
        self.logit_space = bool(head.scores_are_logits)
        if not self.logit_space and not hasattr(head, "token_scores"):
            raise ValueError(f"DTOP cannot put finalised scores over the outputs of {type(head).__name__}")
        self.num_classes = int(head.num_classes)
        self.ignore_value = int(head.ignore_value)
        self.patch_size = int(backbone.patch_size)
        self.heads = nn.ModuleDict({f"layer{v}": self._build_head(cfg, backbone) for v in layers})

    def _build_head(self, cfg: Any, backbone) -> nn.Module:
        if self.aux_head == "atm":
            from ...heads.atm import ATMHead

            return ATMHead(cfg, backbone.output_shape(), auxiliary=True)
        dim = int(backbone.embed_dim)
        linear = nn.Linear(dim, self.num_classes)
        trunc_normal_(linear.weight, std=0.02)
        nn.init.zeros_(linear.bias)
        return nn.Sequential(nn.LayerNorm(dim), linear)

    def describe_exit(self, blocks: int, depth: int) -> str:
        return f"all {depth} layers" if blocks >= depth else f"pruned after layer {blocks}"

    # ------------------------------------------------------------------ the loop
    def embed(self, backbone, images: torch.Tensor, state: ReductionState) -> TokenSet:
        return self.start(super().embed(backbone, images, state), state)

    def start(self, tokens: TokenSet, state: ReductionState) -> TokenSet:
        """The pass's pruning records, on the token set the first block sees (any embedding:
        STEP's shared windows too)."""
        state.add_cost("pruned", [[0] * len(self.prune_layers) for _ in range(state.batch_size)])
        if state.record_maps:
            state.token_maps[PRUNED_MAP] = torch.zeros_like(tokens.owner)
            labels = {0: "not pruned (last head)"}
            labels.update({v: f"pruned at layer {v}" for v in self.prune_layers})
            state.token_map_labels[PRUNED_MAP] = labels
        return tokens

    def _predict(self, head: nn.Module, tokens: TokenSet, state: ReductionState) -> Tuple[torch.Tensor, Dict[str, Any]]:
        """The auxiliary head on the live tokens: ((Tp, K) scores whose max is the confidence:
        logits for "linear", ATM scores for "atm"; the head's raw outputs), FLOPs charged."""
        live = list(tokens.live_counts)
        k = self.num_classes
        if self.aux_head == "linear":
            logits = head(tokens.patches())  # (Tp, K)
            state.add_flops("token_reducer", [token_wise_flops(head) * n for n in live])
            return logits, {}
        padded, real = tokens.padded()  # B x L x C, True at real tokens
        out = head([padded], None if len(set(live)) == 1 else ~real)
        state.add_flops("token_reducer", [head.forward_flops(n) + k * k * n for n in live])  # + the class x mask product
        return tokens.unpad(head.token_scores(out)), out

    def _probabilities(self, scores: torch.Tensor) -> torch.Tensor:
        """(Tp, K) class probabilities (linear: softmax; ATM: its scores as they are)."""
        return scores.float().softmax(-1) if self.aux_head == "linear" else scores.float()

    def _final_values(self, scores: torch.Tensor) -> torch.Tensor:
        """(Tp, K) what a finalised token leaves in the map, in the main head's score space."""
        if self.logit_space:
            return scores if self.aux_head == "linear" else scores.float().clamp(min=_PROB_EPS).log()
        return self._probabilities(scores)

    def reduce(self, layer: int, tokens: TokenSet, state: ReductionState) -> TokenSet:
        index = self.decision_layers.index(layer)
        prune_layer = self.prune_layers[index]
        prunes = self.theta < 1.0 and (self.prune_in_training or not state.training)
        if not prunes and not state.training:
            return tokens  # nothing can exceed theta: the head is not run
        if tokens.layout.num_patches == 0:
            return tokens
        head = self.heads[f"layer{prune_layer}"]
        scores, raw = self._predict(head, tokens, state)
        if state.training and self.aux_loss_weight > 0:
            state.losses[f"loss_dtop_aux{prune_layer}"] = self.aux_loss_weight * self._aux_loss(head, scores, raw, tokens, state)
        if not prunes:
            return tokens
        confidence, label = self._probabilities(scores.detach()).max(dim=-1)  # (Tp,)
        prune = prune_mask(confidence, label, tokens.layout.patch_batch_index(), self.num_classes, self.theta, self.top_k)
        before = tokens.live_cells() if state.record_maps else None
        # the decision's one wait for host counts comes inside keep, after its kernels are queued
        kept = tokens.keep(~prune, save_features=self.output_kind == "dense", save_logits=self._final_values(scores))
        pruned = [n - k for n, k in zip(tokens.live_counts, kept.live_counts)]
        for record, n in zip(state.cost, pruned):
            record["pruned"][index] = n
        if not any(pruned):
            return tokens
        if before is not None:
            maps = state.token_maps[PRUNED_MAP]
            state.token_maps[PRUNED_MAP] = torch.where(before & ~kept.live_cells(), prune_layer, maps)
        return kept

    def static_decision(self, layer: int, tokens: TokenSet, state: ReductionState) -> Optional[StaticDecision]:
        """:meth:`reduce` in inference with linear heads, for capture after the blocks (see
        :mod:`..static_decision`): the head on every row of the graph, the confidence, the
        per-class ranking of each image's patch rows (prefix and padding rows form a group of
        their own, so that they take no top-k place), the removal and the finalised values."""
        if state.training or self.theta >= 1.0 or self.aux_head != "linear" or tokens.layout.num_patches == 0:
            return None
        index = self.decision_layers.index(layer)
        prune_layer = self.prune_layers[index]
        head, theta, top_k, k, p = self.heads[f"layer{prune_layer}"], self.theta, self.top_k, self.num_classes, tokens.num_prefix
        save_features = self.output_kind == "dense"
        logit_space = self.logit_space
        live = list(tokens.live_counts)

        def compute(rows: torch.Tensor, layout, inputs: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
            owner = inputs["owner"]
            b = owner.shape[0]
            image, patch = patch_row_images(rows.shape[0], layout, b, p)  # (R,) each; image b on padding rows
            scores = head(rows)  # (R, K): prefix and padding rows are cut by `patch`
            probs = scores.float().softmax(-1)
            confidence, label = probs.max(dim=-1)
            prune = patch & prune_mask(confidence, label, torch.where(patch, image, b), k, theta, top_k)
            final = scores if logit_space else probs  # what a finalised token leaves (_final_values)
            return static_keep(rows, layout, owner, p, prune, permute={"logits": final}, image=image)

        def finish(after: TokenSet, outputs: Dict[str, torch.Tensor]) -> TokenSet:
            kept_counts = HostCopy(outputs["kept"])  # queued first; the host work below overlaps it
            state.add_flops("token_reducer", [token_wise_flops(head) * n for n in live])
            kept = finish_keep(after, outputs, save_features=save_features, kept=kept_counts, save_logits=True)
            pruned = [n - m for n, m in zip(live, kept.live_counts)]
            for record, n in zip(state.cost, pruned):
                record["pruned"][index] = n
            if not any(pruned):
                return after
            if state.record_maps:
                maps = state.token_maps[PRUNED_MAP]
                state.token_maps[PRUNED_MAP] = torch.where(after.live_cells() & ~kept.live_cells(), prune_layer, maps)
            return kept

        return StaticDecision(("dtop", layer, theta, top_k, logit_space, save_features), {"owner": tokens.owner}, compute, finish)

    # ------------------------------------------------------------------ training
    def _aux_loss(self, head: nn.Module, scores: torch.Tensor, raw: Dict[str, Any], tokens: TokenSet, state: ReductionState) -> torch.Tensor:
        """The auxiliary head's loss on the tokens live at its layer."""
        if self.aux_head == "linear":
            key = "dtop_cell_counts"
            if key not in state.scratch:
                state.scratch[key] = cell_class_counts(state.targets, tokens.grid, self.patch_size, self.num_classes, self.ignore_value)
            return live_token_cross_entropy(scores, tokens, state.scratch[key])
        # SegViT's loss on the live cells: the others are ignored and their masks empty (nearest
        # upsampling, so that no empty cell leaks into a live one)
        masks = tokens.to_dense(tokens.unpad(raw["pred_masks"]), final=None, fill=_MASK_FILL)  # B x G x K
        p = self.patch_size
        maps = tokens_to_map(masks.float(), tokens.grid).repeat_interleave(p, 2).repeat_interleave(p, 3)
        live = tokens.live_cells().view(-1, 1, *tokens.grid).repeat_interleave(p, 2).repeat_interleave(p, 3)[:, 0]
        targets = state.targets
        h, w = targets.shape[-2:]
        targets = torch.where(live[:, :h, :w], targets, self.ignore_value)
        losses = head.criterion(raw["pred_logits"].float(), maps[:, :, :h, :w], targets)
        return sum(losses.values())

    # ------------------------------------------------------------------ the final map
    def overlay(self, outputs: Dict[str, Any], tokens: TokenSet, state: ReductionState) -> Dict[str, Any]:
        """Finalised cells take their auxiliary prediction (see the module docstring)."""
        if "logits" not in tokens.finals:
            return outputs
        if self.logit_space:
            return overlay_final_logits(outputs, tokens)
        out = dict(outputs)
        b, g = tokens.owner.shape
        cells = tokens.final_cells("logits")  # B x G
        probs = tokens.overlay_final(torch.zeros(b, g, self.num_classes, device=cells.device), "logits")  # B x G x K
        out["final_scores"], out["final_cells"] = probs, cells
        mask_logits = probs.clamp(_PROB_EPS, 1 - _PROB_EPS).logit()  # query k is class k

        def with_masks(level: Dict[str, Any]) -> Dict[str, Any]:
            level = dict(level)
            masks = level["pred_masks"]  # B x G x K
            level["pred_masks"] = torch.where(cells.unsqueeze(-1), mask_logits.to(masks.dtype), masks)
            return level

        out.update(with_masks(out))
        if isinstance(out.get("aux_outputs"), list):
            out["aux_outputs"] = [with_masks(level) for level in out["aux_outputs"]]
        return out
