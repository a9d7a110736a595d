"""DoViT, dynamic token pass (Liu et al. 2023, papers/001), as a token-reduction plug-in.

After each decision layer a pointwise auxiliary head (:class:`~..dovit_aux_head.PointwiseAuxHead`)
classifies the live tokens; a token whose max softmax probability exceeds xi stops (Eq. 3-5):
it leaves the packed sequence with its features, so later blocks neither see it nor pay for
it, and it can never come back. The class token stays and absorbs the stopped tokens (Eq. 8).
The decoder sees the dense grid, each stopped token put back in its place with the features it
stopped with (token reconstruction). xi = 1.0 stops nothing: the dense Segmenter, exactly.

Decision layers follow the paper's count (``DECISION_LAYERS`` 3, 6, 9: after the 3rd, 6th and
9th block, i.e. 0-based blocks 2, 5, 8 of the framework).

Training (Eq. 12): the Segmenter's own loss + alpha x the auxiliary heads' cross-entropy (on the
reconstructed map, bilinearly upsampled as the decode head's, or on the live tokens only) +
beta x KL to a frozen dense teacher (:mod:`..teacher`, Eq. 11), optionally + the official
code's feature MSE; xi can ramp from 1.0 to its target (the code), driven by the per-iteration
hook. Inference: the heads run on live tokens only and each image's cost record holds their
FLOPs and ``stopped`` (tokens stopped at each decision layer, a list).
"""
from __future__ import annotations

import functools
from typing import Any, Dict, Optional

import torch
import torch.nn as nn

from ...heads.vit_decode_head import pixel_cross_entropy, resize_logits
from ..distillation import KL_DIRECTIONS, feature_mse, pixel_kl
from ..dovit_aux_head import PointwiseAuxHead
from ..dovit_rules import StoppedSum, merge_stopped_into_cls, ramped_threshold, stop_mask
from ..packing import HostCopy
from ..plugin import TOKEN_REDUCTION_REGISTRY, ReductionState, TokenReducer, paper_layers
from ..static_decision import StaticDecision, finish_keep, patch_row_images, static_keep
from ..teacher import FrozenTeacher, build_teacher_model
from ..token_set import TokenSet
from ..token_targets import cell_class_counts, live_token_cross_entropy

__all__ = ["DoViT"]

AUX_LOSS_TOKENS = ("all", "live")


@TOKEN_REDUCTION_REGISTRY.register()
class DoViT(TokenReducer):
    """See the module docstring; keys under ``MODEL.TOKEN_REDUCTION.DOVIT``."""

    output_kind = "dense"

    def __init__(self, cfg: Any, backbone, head) -> None:
        super().__init__(cfg, backbone, head)
        d = cfg.MODEL.TOKEN_REDUCTION.DOVIT
        key = "MODEL.TOKEN_REDUCTION.DOVIT"
        self.decision_layers = paper_layers(d.DECISION_LAYERS, backbone.depth, f"{key}.DECISION_LAYERS")
        self.threshold = float(d.THRESHOLD)
        if not 0.0 <= self.threshold <= 1.0:
            raise ValueError(f"{key}.THRESHOLD must lie in [0, 1] (1.0 stops nothing), got {d.THRESHOLD}")
        self.threshold_ramp = float(d.THRESHOLD_RAMP)
        if self.threshold_ramp < 0:
            raise ValueError(f"{key}.THRESHOLD_RAMP must be >= 0 (a fraction of SOLVER.MAX_ITER), got {d.THRESHOLD_RAMP}")
        #: xi of the training steps: THRESHOLD, or its ramped value (inference always uses THRESHOLD)
        self.current_threshold = self.threshold
        self.aux_weight = float(d.AUX_WEIGHT)
        self.aux_loss_tokens = str(d.AUX_LOSS_TOKENS)
        if self.aux_loss_tokens not in AUX_LOSS_TOKENS:
            raise ValueError(f"{key}.AUX_LOSS_TOKENS '{d.AUX_LOSS_TOKENS}' is not one of {list(AUX_LOSS_TOKENS)}")
        self.merge = bool(d.MERGE)
        self.merge_min_stopped = float(d.MERGE_MIN_STOPPED)
        self.distill_weight = float(d.DISTILL_WEIGHT)
        self.feature_distill_weight = float(d.FEATURE_DISTILL_WEIGHT)
        self.distill_kl = str(d.DISTILL_KL)
        if self.distill_kl not in KL_DIRECTIONS:
            raise ValueError(f"{key}.DISTILL_KL '{d.DISTILL_KL}' is not one of {list(KL_DIRECTIONS)}")
        for name in ("AUX_WEIGHT", "DISTILL_WEIGHT", "FEATURE_DISTILL_WEIGHT"):
            if float(d[name]) < 0:
                raise ValueError(f"{key}.{name} must be >= 0, got {d[name]}")

        self.num_classes = int(cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES)
        self.ignore_value = int(cfg.MODEL.SEM_SEG_HEAD.IGNORE_VALUE)
        self.patch_size = int(backbone.patch_size)
        self.aux_heads = nn.ModuleList(
            PointwiseAuxHead(backbone.embed_dim, self.num_classes, int(d.AUX_HIDDEN)) for _ in self.decision_layers
        )
        self._teacher = None
        if self.distill_weight > 0 or self.feature_distill_weight > 0:
            build = functools.partial(build_teacher_model, cfg, str(d.TEACHER.CONFIG), str(d.TEACHER.WEIGHTS))
            pixel = [torch.tensor([float(v) for v in values]).view(-1, 1, 1) for values in (cfg.MODEL.PIXEL_MEAN, cfg.MODEL.PIXEL_STD)]
            #: the frozen dense teacher, outside the module tree (built on the first training step)
            self._teacher = FrozenTeacher(build, *pixel)

    # ------------------------------------------------------------------ schedule
    def on_train_iteration(self, iteration: int, max_iter: int) -> None:
        """xi for the coming step: 1.0 falling to THRESHOLD over THRESHOLD_RAMP of the run."""
        self.current_threshold = ramped_threshold(iteration, max_iter, self.threshold, self.threshold_ramp)

    def describe_exit(self, blocks: int, depth: int) -> str:
        return f"all {depth} layers" if blocks >= depth else f"stopped after layer {blocks}"

    # ------------------------------------------------------------------ the loop
    def embed(self, backbone, images: torch.Tensor, state: ReductionState) -> TokenSet:
        tokens = super().embed(backbone, images, state)
        state.add_cost("stopped", [[0] * len(self.decision_layers) for _ in range(state.batch_size)])
        return tokens

    def reduce(self, layer: int, tokens: TokenSet, state: ReductionState) -> TokenSet:
        """Auxiliary head on the live tokens, stop the confident ones, merge them into the class token."""
        index = self.decision_layers.index(layer)
        head = self.aux_heads[index]
        live = list(tokens.live_counts)
        if not state.training and self.threshold >= 1.0:
            return tokens  # no probability exceeds 1: nothing can stop, the head is not run
        patches = tokens.patches()  # (Tp, C): nothing for stopped tokens
        if state.training:
            logits = self._aux_training(index, head, tokens, patches, state)
            threshold = self.current_threshold
        else:
            threshold = self.threshold
            logits = head(patches)  # (Tp, K)
            state.add_flops("token_reducer", [n * head.flops_per_token() for n in live])
        stop = stop_mask(logits.detach(), threshold)  # (Tp,)
        # queued before the decision's one wait for host counts (in keep), so the GPU stays busy
        stopped = (state.scratch.get("dovit_stopped") or StoppedSum.empty(tokens)).add(tokens, stop, patches)
        state.scratch["dovit_stopped"] = stopped
        kept = tokens.keep(~stop, save_features=True)
        stops = [n - k for n, k in zip(live, kept.live_counts)]
        for record, n in zip(state.cost, stops):
            record["stopped"][index] = n
        out = kept if any(stops) else tokens
        if self.merge:  # Eq. 8 at every decision, in the images where a token has stopped (the class token stays)
            out = merge_stopped_into_cls(out, stopped, 0.5, self.merge_min_stopped)
        return out

    def static_decision(self, layer: int, tokens: TokenSet, state: ReductionState) -> Optional[StaticDecision]:
        """:meth:`reduce` in inference, for capture after the blocks (see :mod:`..static_decision`):
        the head on every row of the graph, the stop mask on the live patch rows, the removal,
        the stopped-token sum and the class-token merge."""
        if state.training or self.threshold >= 1.0:
            return None
        index = self.decision_layers.index(layer)
        head, threshold, p = self.aux_heads[index], self.threshold, tokens.num_prefix
        merge, min_stopped, num_tokens = self.merge, self.merge_min_stopped, tokens.num_cells + tokens.num_prefix
        live = list(tokens.live_counts)
        stopped = state.scratch.get("dovit_stopped") or StoppedSum.empty(tokens)

        def compute(rows: torch.Tensor, layout, inputs: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
            owner = inputs["owner"]
            b = owner.shape[0]
            image, patch = patch_row_images(rows.shape[0], layout, b, p)  # (R,) each; image b on padding rows
            stop = patch & stop_mask(head(rows), threshold)  # the head on every row: prefix and padding are cut by `patch`
            out = static_keep(rows, layout, owner, p, stop, image=image)
            weight = stop.to(torch.float32)
            total = inputs["stopped_total"] + rows.new_zeros(b + 1, rows.shape[1], dtype=torch.float32).index_add(
                0, image, rows.float() * weight.unsqueeze(1))[:b]
            count = inputs["stopped_count"] + weight.new_zeros(b + 1).index_add(0, image, weight)[:b]
            if merge:  # Eq. 8 on the class token (prefix 0) at its new row
                starts = torch.cumsum(out["kept"], 0) - out["kept"]  # (B,)
                cls = out["x"].index_select(0, starts)
                mean = (total / count.clamp(min=1).unsqueeze(1)).to(cls.dtype)
                use = ((count > 0) & (count > min_stopped * num_tokens)).unsqueeze(1)
                out["x"] = out["x"].index_copy(0, starts, torch.where(use, 0.5 * cls + 0.5 * mean, cls))
            out.update(stopped_total=total, stopped_count=count)
            return out

        def finish(after: TokenSet, outputs: Dict[str, torch.Tensor]) -> TokenSet:
            kept = HostCopy(outputs["kept"])  # queued first; the host work below overlaps it
            state.add_flops("token_reducer", [n * head.flops_per_token() for n in live])
            state.scratch["dovit_stopped"] = StoppedSum(outputs["stopped_total"].clone(), outputs["stopped_count"].clone())
            new = finish_keep(after, outputs, save_features=True, kept=kept)
            for record, n, k in zip(state.cost, live, new.live_counts):
                record["stopped"][index] = n - k
            return new

        inputs = {"owner": tokens.owner, "stopped_total": stopped.total, "stopped_count": stopped.count}
        return StaticDecision(("dovit", layer, threshold, merge, min_stopped), inputs, compute, finish)

    def _aux_training(
        self, index: int, head: PointwiseAuxHead, tokens: TokenSet, patches: torch.Tensor, state: ReductionState,
    ) -> torch.Tensor:
        """The auxiliary head in a training step: its weighted loss into ``state``; the live tokens'
        (``patches``, Tp x C) logits (Tp, K)."""
        name = f"loss_dovit_aux{self.decision_layers[index] + 1}"
        if self.aux_loss_tokens == "live":
            logits = head(patches)
            if self.aux_weight > 0:
                key = "dovit_cell_counts"
                if key not in state.scratch:
                    state.scratch[key] = cell_class_counts(state.targets, tokens.grid, self.patch_size, self.num_classes, self.ignore_value)
                state.losses[name] = self.aux_weight * live_token_cross_entropy(logits, tokens, state.scratch[key])
            return logits
        # the reconstructed map: live tokens and, in place, the stopped ones with their stop-time features
        b, (h, w) = tokens.batch_size, tokens.grid
        dense = head(tokens.to_dense(final="features").flatten(0, 1)).view(b, h * w, -1)  # B x G x K
        if self.aux_weight > 0:
            maps = dense.transpose(1, 2).reshape(b, -1, h, w)  # B x K x h x w
            state.losses[name] = self.aux_weight * pixel_cross_entropy(resize_logits(maps, state.targets.shape[-2:]), state.targets, self.ignore_value)
        return tokens.pool_cells(dense)

    # ------------------------------------------------------------------ distillation
    def output_losses(self, head, outputs: Dict[str, Any], features, state: ReductionState) -> None:
        """Training: beta x KL(student || teacher) of the class distributions at the input size
        (Eq. 11), and the feature MSE option on the final normalised tokens, into ``state.losses``."""
        if self._teacher is None:
            return
        logits = head.semantic_logits(outputs, features.grid, state.images.shape[-2:])  # B x K x H x W
        final_tokens = features.tokens
        teacher_logits, teacher_tokens = self._teacher(state.images, want_tokens=self.feature_distill_weight > 0)
        if self.distill_weight > 0:
            state.losses["loss_dovit_distill"] = self.distill_weight * pixel_kl(logits, teacher_logits, self.distill_kl)
        if self.feature_distill_weight > 0:
            state.losses["loss_dovit_feature_distill"] = self.feature_distill_weight * feature_mse(final_tokens, teacher_tokens)

