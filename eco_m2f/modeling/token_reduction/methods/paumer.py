"""PAUMER: patch pausing (papers/000; ``MODEL.TOKEN_REDUCTION.NAME: "PAUMER"``, keys ``...PAUMER.*``).

After each pause layer an auxiliary linear classifier predicts a class distribution for every
live patch token; each image keeps the ``N - int(tau * N)`` tokens of highest entropy (the
least sure) of its ``N`` live ones (top-k) and pauses the rest. Paused tokens keep their
features, which go back to their cells after the last block, before the decoder (the patch
assembler of Algorithm 1); the class token is never paused. Training draws tau ~ U(0.2, 0.8)
independently at every pause layer and step and adds each classifier's cross-entropy with weight
0.1, from a trained Segmenter. In inference the pause configuration (layers and ratios) comes
from the config; with the early exit (Appendix I) paused tokens take their classifier's
prediction instead of the decoder's.

Layer numbering: the paper's layer l is its l-th transformer layer T_l (1-based), and "pausing
after layer 3" acts on the output of T_3. ``PAUSE_LAYERS`` uses that numbering; here layer l is
the 0-based block ``l - 1``, so (3, 5, 7) pauses after blocks 2, 4 and 6.

N is the image's live patch tokens at that layer (Algorithm 1 computes the current token count
and then writes N), so the ratios compound: (3, 5, 7) at 0.4 runs blocks 3-4 on 60%, 5-6 on 36%
and 7-11 on 21.6% of the patches.
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
from timm.layers import trunc_normal_

from ..flops import token_wise_flops
from ..packing import host_ints
from ..plugin import TOKEN_REDUCTION_REGISTRY, ReductionState, TokenReducer, paper_layers
from ..static_decision import StaticDecision, finish_keep, patch_row_images, row_slots, static_keep
from ..token_set import TokenSet
from ..token_targets import cell_class_counts, live_token_cross_entropy

__all__ = ["PAUMER", "kept_counts", "token_entropy", "topk_rows"]

_KEY = "MODEL.TOKEN_REDUCTION.PAUMER"


def token_entropy(logits: torch.Tensor) -> torch.Tensor:
    """(T, K) logits -> (T,) entropy of their softmax, in float32."""
    log_p = logits.float().log_softmax(dim=-1)
    return -(log_p.exp() * log_p).sum(dim=-1)


def kept_counts(live: Sequence[int], ratio: float) -> List[int]:
    """Tokens each image keeps at a pause layer: ``N - int(tau * N)`` of its ``N`` live ones."""
    return [int(n) - int(ratio * int(n)) for n in live]


def topk_rows(scores: torch.Tensor, image: torch.Tensor, offsets: torch.Tensor, width: int, keep: torch.Tensor,
              k_max: int) -> torch.Tensor:
    """(R,) bool: the ``keep[b]`` rows of highest ``scores`` in each image b of packed rows.

    ``image`` (R,) is each row's image (``B`` on padding rows, which are never chosen),
    ``offsets`` (B + 1,) the images' first rows on the device, ``width`` a bound on every
    image's length, the padding's included, and ``k_max >= max(keep)``: every size is fixed by
    the host, so this runs inside a CUDA graph. Rows that must not be chosen (prefix tokens)
    carry ``-inf``.
    """
    b = keep.numel()
    slot = row_slots(image, offsets, width)  # (R,)
    padded = scores.new_full(((b + 1) * width,), float("-inf")).index_copy(0, slot, scores)  # the padding image last
    top = padded[: b * width].view(b, width).topk(k_max, dim=1, largest=True, sorted=True).indices  # (B, k_max)
    valid = torch.arange(k_max, device=scores.device).view(1, -1) < keep.view(-1, 1)
    chosen = torch.zeros(b, width, dtype=torch.bool, device=scores.device).scatter(1, top, valid)
    return torch.cat([chosen.view(-1), chosen.new_zeros(width)]).index_select(0, slot)


def _check_ratio(value: float, key: str) -> float:
    value = float(value)
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{_KEY}.{key}: pause ratios lie in [0, 1], got {value}")
    return value


@TOKEN_REDUCTION_REGISTRY.register()
class PAUMER(TokenReducer):
    """Patch pausing by the entropy of auxiliary classifiers; see the module docstring."""

    content_dependent_cost = False  # top-k with fixed ratios: the cost depends on the size only

    def __init__(self, cfg: Any, backbone, head) -> None:
        super().__init__(cfg, backbone, head)
        p = cfg.MODEL.TOKEN_REDUCTION.PAUMER
        self.decision_layers = paper_layers(p.PAUSE_LAYERS, backbone.depth, f"{_KEY}.PAUSE_LAYERS")
        layers = [v + 1 for v in self.decision_layers]
        ratios = [_check_ratio(v, "PAUSE_RATIOS") for v in p.PAUSE_RATIOS]
        if len(ratios) == 1:
            ratios = ratios * len(layers)
        if len(ratios) != len(layers):
            raise ValueError(f"{_KEY}.PAUSE_RATIOS {ratios}: one value, or one per pause layer {layers}")
        low, high = (_check_ratio(v, "TRAIN_RATIO_RANGE") for v in p.TRAIN_RATIO_RANGE)
        if low > high:
            raise ValueError(f"{_KEY}.TRAIN_RATIO_RANGE [{low}, {high}]: low exceeds high")
        #: pause layers in the paper's numbering, and their inference ratios
        self.pause_layers = tuple(layers)
        self.pause_ratios = tuple(ratios)
        self.train_ratio_range = (low, high)
        self.aux_loss_weight = float(p.AUX_LOSS_WEIGHT)
        self.early_exit = bool(p.EARLY_EXIT)
        # early exit with a token-wise head: the decoder sees only the tokens that reached the end
        self.output_kind = "tokens" if self.early_exit and head.input_kind != "grid" else "dense"
        self.num_classes = int(head.num_classes)
        self.ignore_value = int(head.ignore_value)
        self.patch_size = int(backbone.patch_size)
        dim = int(backbone.embed_dim)
        self.classifiers = nn.ModuleDict({f"layer{v}": self._classifier(dim, bool(p.AUX_NORM)) for v in layers})
        #: (kept counts, device) -> their device tensor, read by the captured pause steps
        self._keep_tensors: Dict[Tuple[Tuple[int, ...], str], torch.Tensor] = {}

    def _classifier(self, dim: int, norm: bool) -> nn.Module:
        linear = nn.Linear(dim, self.num_classes)
        trunc_normal_(linear.weight, std=0.02)
        nn.init.zeros_(linear.bias)
        return nn.Sequential(nn.LayerNorm(dim), linear) if norm else linear

    # ------------------------------------------------------------------ the loop
    def embed(self, backbone, images: torch.Tensor, state: ReductionState) -> TokenSet:
        tokens = super().embed(backbone, images, state)
        state.add_cost("paused", [[0] * len(self.pause_layers) for _ in range(state.batch_size)])
        if state.training:
            state.scratch["cell_counts"] = cell_class_counts(
                state.targets, tokens.grid, self.patch_size, self.num_classes, self.ignore_value
            )
        return tokens

    def ratio(self, index: int, training: bool) -> float:
        """tau at the ``index``-th pause layer: drawn from the training range, else configured."""
        if training:
            low, high = self.train_ratio_range
            return float(torch.empty(()).uniform_(low, high))
        return self.pause_ratios[index]

    def reduce(self, layer: int, tokens: TokenSet, state: ReductionState) -> TokenSet:
        index = self.decision_layers.index(layer)
        pause_layer = self.pause_layers[index]
        live = list(tokens.live_counts)
        keep = kept_counts(live, self.ratio(index, state.training))
        if keep == live and not state.training:
            return tokens  # nothing pauses here: the classifier is not run
        classifier = self.classifiers[f"layer{pause_layer}"]
        logits = classifier(tokens.patches())  # (Tp, K): live tokens only
        state.add_flops("token_reducer", [token_wise_flops(classifier) * n for n in live])
        if state.training:
            loss = live_token_cross_entropy(logits, tokens, state.scratch["cell_counts"])
            state.losses[f"loss_paumer_aux{pause_layer}"] = self.aux_loss_weight * loss
        for record, n, k in zip(state.cost, live, keep):
            record["paused"][index] = n - k
        if keep == live:
            return tokens
        return tokens.keep_topk(
            token_entropy(logits), keep, largest=True,
            save_features=self.output_kind == "dense", save_logits=logits if self.early_exit else None,
        )

    def static_decision(self, layer: int, tokens: TokenSet, state: ReductionState) -> Optional[StaticDecision]:
        """:meth:`reduce` in inference, for capture after the blocks (see :mod:`..static_decision`):
        the classifier and the entropy on every row of the graph, the per-image top-k and the
        removal. The counts are known on the host (``N - int(tau * N)``), so the pass never waits
        for the GPU here: the blocks, the decision and the next blocks are queued back to back."""
        if state.training:
            return None
        index = self.decision_layers.index(layer)
        pause_layer = self.pause_layers[index]
        live = list(tokens.live_counts)
        keep = kept_counts(live, self.pause_ratios[index])
        if keep == live:
            return None  # nothing pauses: reduce() hands the tokens on without running the classifier
        classifier = self.classifiers[f"layer{pause_layer}"]
        p, b, k_max, early = tokens.num_prefix, tokens.batch_size, max(keep), self.early_exit

        def compute(rows: torch.Tensor, layout, inputs: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
            image, patch = patch_row_images(rows.shape[0], layout, b, p)  # (R,) each; image b on padding rows
            logits = classifier(rows)  # (R, K): prefix and padding rows are never chosen
            scores = torch.where(patch, token_entropy(logits), float("-inf"))
            offsets = layout.offsets(torch.int32)[: b + 1]
            stays = topk_rows(scores, image, offsets, layout.max_len, inputs["keep"], k_max)
            return static_keep(rows, layout, inputs["owner"], p, patch & ~stays, {"logits": logits} if early else None, image=image)

        def finish(after: TokenSet, outputs: Dict[str, torch.Tensor]) -> TokenSet:
            state.add_flops("token_reducer", [token_wise_flops(classifier) * n for n in live])
            for record, n, k in zip(state.cost, live, keep):
                record["paused"][index] = n - k
            return finish_keep(after, outputs, save_features=self.output_kind == "dense", kept=[p + k for k in keep],
                               save_logits=early)

        key = (tuple(keep), str(tokens.x.device))
        if key not in self._keep_tensors:  # the same counts every pass of a batch size: copied once
            self._keep_tensors[key] = host_ints(keep, tokens.x.device)
        inputs = {"owner": tokens.owner, "keep": self._keep_tensors[key]}
        return StaticDecision(("paumer", layer, tuple(keep), early, self.output_kind), inputs, compute, finish)

    def describe_exit(self, blocks: int, depth: int) -> str:
        return f"all {depth} layers" if blocks >= depth else f"paused after layer {blocks}"
