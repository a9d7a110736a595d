"""``ECOMaskFormer``: Mask2Former whose pixel-decoder encoder stops at a per-image exit (papers/004).

The network and its weights are Mask2Former's; what ECO-M2F adds lives here:

* step A (``MODEL.ECO.ENABLED``): weighted stochastic depth over the exits ``MODEL.ECO.EXITS``
  (:mod:`.stochastic_depth`), the encoder run once and the decoder once per exit;
* a fixed exit for every image (``TEST.ECO.EXIT``, or ``forward(..., exit_layer=k)``);
* gated inference (``MODEL.ECO.GATE.ENABLED``): the gate of :mod:`.gate` picks each image's exit
  from the pooled res5 level; images leave the running batch at their exit;
* step B's entry points: predictions at every exit from one encoder pass, and the gate input.

Each eval output carries ``"cost": {"exit": k}``; the generic efficiency evaluator turns the
exits into GFLOPs by counting :meth:`network` along them.
"""
from __future__ import annotations

from typing import Any, Dict, List, Mapping, Optional, Sequence, Set, Tuple

import torch

from ..modeling.criterion import apply_loss_weights
from ..modeling.meta_arch.image_list import ImageList
from ..modeling.meta_arch.mask_former import MaskFormer
from ..modeling.registry import META_ARCH_REGISTRY
from ..utils.device import to_device
from .exits import check_exits, exit_set
from . import stochastic_depth
from .gate import ExitGate, load_gate_checkpoint

__all__ = ["ECOMaskFormer", "as_eco_config", "eco_architecture_overrides"]


def eco_architecture_overrides(cfg: Any) -> List[str]:
    """``KEY VALUE`` overrides that make ``cfg`` build an ECOMaskFormer: none when it already names
    one; for a plain Mask2Former config (``MaskFormer``) the same network with exits, step A and
    the gate off, which is how a Mask2Former checkpoint is evaluated at truncated depths."""
    return ["MODEL.META_ARCHITECTURE", "ECOMaskFormer"] if cfg.MODEL.META_ARCHITECTURE == "MaskFormer" else []


def as_eco_config(cfg: Any, opts: Sequence[str] = ()) -> Any:
    """A frozen copy of ``cfg`` with :func:`eco_architecture_overrides` and the ``KEY VALUE`` ``opts``."""
    cfg = cfg.clone()
    cfg.defrost()
    cfg.merge_from_list(eco_architecture_overrides(cfg) + list(opts))
    cfg.freeze()
    return cfg


@META_ARCH_REGISTRY.register()
class ECOMaskFormer(MaskFormer):
    """Mask2Former with encoder exits, step-A training and a gate (config: ``MODEL.ECO.*``, ``TEST.ECO.EXIT``)."""

    accepts_eco_config = True

    def __init__(self, cfg: Any) -> None:
        super().__init__(cfg)
        eco = cfg.MODEL.ECO
        num_layers = self.sem_seg_head.num_encoder_layers
        self.eco_exits = exit_set(eco.EXITS, num_layers)
        self.eco_train = bool(eco.ENABLED)
        self.eco_alpha = stochastic_depth.alpha_weights(self.eco_exits, eco.ALPHA)
        # Step A leaves encoder layers past the deepest sampled depth without gradient: DDP must allow it.
        self.find_unused_parameters = self.eco_train
        self.test_exit: Optional[int] = self._check_exit(int(cfg.TEST.ECO.EXIT) or None, "TEST.ECO.EXIT")
        self.gate: Optional[ExitGate] = None
        self._gate_weights = ""
        self._gate_weights_loaded = False
        if eco.GATE.ENABLED:
            self.gate = ExitGate.from_config(cfg, cfg.MODEL.SEM_SEG_HEAD.CONVS_DIM)
            self._gate_weights = str(eco.GATE.WEIGHTS)
        self._call_exit: Optional[int] = None
        self._depth_generator: Optional[torch.Generator] = None
        self._seed = int(cfg.SEED)

    def _check_exit(self, k: Optional[int], name: str) -> Optional[int]:
        if k is None:
            return None
        return check_exits([k], name=name, num_layers=self.sem_seg_head.num_encoder_layers)[0]

    # ------------------------------------------------------------------ contract
    def load_extra_weights(self) -> None:
        """The gate from ``MODEL.ECO.GATE.WEIGHTS`` (a step-C ``gate.pth``), when one is named."""
        if self.gate is None or not self._gate_weights:
            return
        state, _ = load_gate_checkpoint(self._gate_weights)
        self.gate.load_state_dict(state)
        self._gate_weights_loaded = True

    def keys_loaded_elsewhere(self) -> Set[str]:
        if self.gate is not None and self._gate_weights_loaded:
            return {f"gate.{k}" for k in self.gate.state_dict()}
        return set()

    @property
    def gated(self) -> bool:
        """True when the gate chooses the exits (gate on, no fixed exit)."""
        return self.gate is not None and self.test_exit is None

    @property
    def dynamic_cost(self) -> bool:
        return self.gated

    def cost_signature(self, cost: Mapping[str, Any]) -> Optional[int]:
        """The exit: the padded size and the exit fix the network's FLOPs."""
        return int(cost["exit"]) if cost and "exit" in cost else None

    def network(self, images: torch.Tensor, cost: Optional[Mapping[str, Any]] = None) -> Dict[str, torch.Tensor]:
        """Backbone, the gate when it chooses, the encoder up to the exit, the decoder.

        ``cost["exit"]`` (a record of an earlier output) replaces the exit the model would pick;
        the gate still runs then, since an image gated to that exit paid for it.
        """
        features = self.backbone(images)
        head = self.sem_seg_head
        k = self.cost_signature(cost) if cost else None
        k = k if k is not None else self.test_exit
        if not self.gated:
            out = head(features, exit_layer=k)
            return {"pred_logits": out["pred_logits"], "pred_masks": out["pred_masks"]}
        inputs = head.project_inputs(features)
        logits = self.gate(ExitGate.pool(inputs.s1))
        if k is None:
            out = head.forward_per_image_exit(features, self.gate.exits[logits.argmax(dim=1)], inputs=inputs)
        else:
            out = head(features, exit_layer=k, inputs=inputs)
        return {"pred_logits": out["pred_logits"], "pred_masks": out["pred_masks"], "gate_logits": logits}

    # ------------------------------------------------------------------ forward
    def forward(self, batched_inputs: List[Dict[str, Any]], exit_layer: Optional[int] = None):
        """As MaskFormer's; in eval mode the exit is, in order: ``exit_layer``, TEST.ECO.EXIT, the
        gate's choice per image (MODEL.ECO.GATE.ENABLED), full depth."""
        self._call_exit = self._check_exit(exit_layer, "exit_layer")
        try:
            return super().forward(batched_inputs)
        finally:
            self._call_exit = None

    def losses(self, features: Dict[str, torch.Tensor], targets: List[Dict[str, torch.Tensor]]) -> Dict[str, torch.Tensor]:
        if not self.eco_train:
            return super().losses(features, targets)
        return self.stochastic_depth_losses(features, targets)

    def predict(self, features: Dict[str, torch.Tensor], images: ImageList) -> Tuple[Dict[str, Any], List[Dict[str, Any]]]:
        head = self.sem_seg_head
        k = self._call_exit if self._call_exit is not None else self.test_exit
        if k is None and self.gate is not None:
            inputs = head.project_inputs(features)
            exits = self.gate.choose(self.pooled_s1(inputs.s1, images))
            outputs = head.forward_per_image_exit(features, exits, inputs=inputs)
            return outputs, [{"exit": int(e)} for e in exits.tolist()]
        k = k if k is not None else head.num_encoder_layers
        return head(features, exit_layer=k), [{"exit": int(k)} for _ in images.image_sizes]

    # ------------------------------------------------------------------ step A
    def stochastic_depth_losses(
        self, features: Dict[str, torch.Tensor], targets: List[Dict[str, torch.Tensor]]
    ) -> Dict[str, torch.Tensor]:
        """Step A (papers/004 Eq. 3): per image a depth K_i; every exit k <= K_i adds alpha_k L_k.

        The encoder runs once, cumulatively, up to the deepest sampled depth; at each exit the
        shared transformer decoder sees only the images whose K_i reaches it. The decoder and the
        criterion run once over all exits' images together, each exit's loss terms normalised
        over its own images as if it had been decoded alone.
        """
        if self._depth_generator is None:
            from ..utils.comm import get_rank

            # one stream per process, so the images of different GPUs draw independent depths
            base = self._seed if self._seed >= 0 else torch.initial_seed() % 2**62
            self._depth_generator = torch.Generator()
            self._depth_generator.manual_seed(base + 1000003 * get_rank())
        depths = stochastic_depth.sample_depths(len(targets), self.eco_exits, self._depth_generator)
        needed = [k for k in self.eco_exits if k <= int(depths.max())]
        device = next(iter(features.values())).device
        keep = {k: (depths >= k).nonzero().flatten() for k in needed}
        # one decoder pass and one criterion pass over every (image, exit) pair, exit by exit
        outputs = self.sem_seg_head.forward_exit_subsets(features, {k: to_device(idx, device) for k, idx in keep.items()})
        pairs = [(k, i) for k in needed for i in keep[k].tolist()]
        grouped = self.criterion.forward_groups(
            outputs, [targets[i] for _, i in pairs], [k for k, _ in pairs], all_groups=self.eco_exits
        )
        exit_losses = {k: apply_loss_weights(terms, self.weight_dict) for k, terms in grouped.items()}
        counts = {k: len(idx) for k, idx in keep.items()}
        return stochastic_depth.combine_exit_losses(exit_losses, counts, len(targets), self.eco_alpha)

    # ------------------------------------------------------------------ gate input, step B
    @staticmethod
    def pooled_s1(s1: torch.Tensor, images: ImageList) -> torch.Tensor:
        """z(s1) averaged over each image's own tokens, not the batch's padding.

        (s1 comes after the input projection's GroupNorm, which sees the padding, as in the
        official model; step B and evaluation both run at batch 1, so their z agree exactly.)
        """
        h_pad, w_pad = images.tensor.shape[-2:]
        _, _, h5, w5 = s1.shape
        valid = torch.zeros((s1.shape[0], h5, w5), dtype=torch.bool, device=s1.device)
        for i, (h, w) in enumerate(images.image_sizes):
            valid[i, : -(-h * h5 // h_pad), : -(-w * w5 // w_pad)] = True  # ceil: partly covered tokens count
        return ExitGate.pool(s1, valid)

    @torch.no_grad()
    def gate_input(self, batched_inputs: List[Dict[str, Any]]) -> torch.Tensor:
        """z(s1) [B, CONVS_DIM]: the pooled res5 level after input projection (the gate's input)."""
        images = self.preprocess_image(batched_inputs)
        features = self.backbone(images.tensor)
        return self.pooled_s1(self.sem_seg_head.project_inputs(features).s1, images)

    @torch.no_grad()
    def predict_at_exits(
        self, batched_inputs: List[Dict[str, Any]], exits: List[int]
    ) -> Tuple[Dict[int, List[Dict[str, Any]]], torch.Tensor]:
        """Step B: {k: per-image outputs at exit k} from ONE backbone + cumulative encoder pass, and z(s1)."""
        images = self.preprocess_image(batched_inputs)
        features = self.backbone(images.tensor)
        inputs = self.sem_seg_head.project_inputs(features)
        z = self.pooled_s1(inputs.s1, images)
        outputs = self.sem_seg_head.forward_multi_exit(features, exits, inputs=inputs)
        return {k: self.inference(out, batched_inputs, images) for k, out in outputs.items()}, z
