"""A trained policy network inside another model: built from its own config and weights, frozen.

A token-sharing segmenter (CTS, dCTS) names the policy in its config,

    MODEL.TOKEN_SHARING.POLICY_CONFIG  the policy's training config (MODEL.META_ARCHITECTURE TokenSharingPolicy)
    MODEL.TOKEN_SHARING.POLICY_WEIGHTS its trained weights (e.g. OUTPUT_DIR/model_final.pth)

and its builder calls ``build_frozen_policy(cfg)``: the policy is built from that config (with
MODEL.BACKBONE.PRETRAINED off: the trained weights replace ImageNet's anyway), every tensor of
the weights is loaded (missing or unexpected keys fail), and it is frozen in eval mode, so that a
parent's ``train()`` does not switch its BatchNorms back to batch statistics. Held as a child
module (say ``self.policy``), its tensors are part of the parent's state dict; the parent lists
them in ``keys_loaded_elsewhere()`` so that its own checkpoints may lack them.
"""
from __future__ import annotations

from typing import Sequence

__all__ = ["build_frozen_policy", "load_frozen_policy"]


def load_frozen_policy(config_file: str, weights: str, opts: Sequence[str] = ()):
    """The :class:`TokenSharingPolicy` of ``config_file`` (+ ``KEY VALUE`` opts) with ``weights``, frozen."""
    from ...checkpoint import load_weights
    from ...config import setup_cfg
    from ..meta_arch.token_sharing_policy import TokenSharingPolicy

    cfg = setup_cfg(config_file, ["MODEL.BACKBONE.PRETRAINED", "False", *opts])
    if cfg.MODEL.META_ARCHITECTURE != "TokenSharingPolicy":
        raise ValueError(
            f"{config_file}: MODEL.META_ARCHITECTURE is {cfg.MODEL.META_ARCHITECTURE!r}; a policy config "
            "has 'TokenSharingPolicy'"
        )
    model = TokenSharingPolicy(cfg)  # on the CPU: the parent model is placed on its device as a whole
    load_weights(model, weights)
    return model.freeze()


def build_frozen_policy(cfg):
    """The policy that ``MODEL.TOKEN_SHARING.POLICY_CONFIG`` / ``POLICY_WEIGHTS`` of ``cfg`` name, frozen."""
    ts = cfg.MODEL.TOKEN_SHARING
    for key in ("POLICY_CONFIG", "POLICY_WEIGHTS"):
        if not ts.get(key):
            raise ValueError(
                f"MODEL.TOKEN_SHARING.{key} is empty: token sharing needs a trained policy network "
                "(python train_net.py --config-file configs/<dataset>/semantic-segmentation/cts_policy/...)"
            )
    return load_frozen_policy(ts.POLICY_CONFIG, ts.POLICY_WEIGHTS)
