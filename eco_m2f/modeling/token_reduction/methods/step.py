"""STEP: dCTS before the first block, DToP inside the ViT (papers/003;
``MODEL.TOKEN_REDUCTION.NAME: "STEP"``, keys ``...DCTS.*`` and ``...DTOP.*``).

The two halves are the project's own methods, unchanged: the frozen policy network's windows of
2x2 .. 16x16 patches become one token each (:class:`~.dcts.DCTS`, ``token_reducer.sharing.*``),
then the auxiliary heads after the prune layers finalise confident tokens, each a single patch
or a whole shared window, except the k most confident of every predicted class
(:class:`~.dtop.DTOP`, whose heads keep their names, ``token_reducer.heads.*``, so that a
fine-tuned DToP checkpoint loads into STEP and the other way round). The decoder sees the tokens
that reach the last block; its prediction for a shared token, and a pruned token's auxiliary
prediction, cover every cell the token stands for.

Named configurations of the paper (ViT-L, 24 layers): ``STEP@[18]`` (``DTOP.PRUNE_LAYERS
[18]``) and ``STEP@[8,16]``; each with a dCTS setting, ``tau-6899`` or ``tau-4999``. With dCTS
thresholds above 1 STEP is DToP; with theta >= 1 it is dCTS.
"""
from __future__ import annotations

from typing import Any, Set

import torch

from ..plugin import TOKEN_REDUCTION_REGISTRY, ReductionState
from ..token_set import TokenSet
from .dcts import DCTS
from .dtop import DTOP

__all__ = ["STEP"]


@TOKEN_REDUCTION_REGISTRY.register()
class STEP(DTOP):
    """dCTS token sharing followed by DToP pruning; see the module docstring."""

    def __init__(self, cfg: Any, backbone, head) -> None:
        super().__init__(cfg, backbone, head)
        self.sharing = DCTS(cfg, backbone, head)
        # live tokens to the decoder (shared tokens have no single grid cell)
        self.output_kind = self.sharing.output_kind

    def check_head(self, head) -> None:
        self.sharing.check_head(head)

    # ------------------------------------------------------------------ checkpoints
    def load_extra_weights(self) -> None:
        self.sharing.load_extra_weights()

    def keys_loaded_elsewhere(self) -> Set[str]:
        return {f"sharing.{k}" for k in self.sharing.keys_loaded_elsewhere()}

    # ------------------------------------------------------------------ the loop
    def embed(self, backbone, images: torch.Tensor, state: ReductionState) -> TokenSet:
        return self.start(self.sharing.embed(backbone, images, state), state)
