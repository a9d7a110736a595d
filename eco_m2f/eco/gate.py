"""The ECO-M2F gating network (papers/004 Eq. 6): g = W z(s1).

s1 is the lowest-resolution backbone level after the pixel decoder's input projection, before the
encoder; z averages it over its tokens; W is one linear layer with a logit per allowed exit. The
gate picks argmax_k g_k. The allowed exit values are a persistent buffer so a checkpoint says which
encoder depth each logit stands for, and loading a gate trained for other exits fails loudly.
"""
from __future__ import annotations

from typing import Any, Dict, List, Mapping, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from .exits import allowed_exits, check_exits

__all__ = ["ExitGate", "load_gate_checkpoint"]


class ExitGate(nn.Module):
    """Linear gate from the pooled gate input z [B, C] to one logit per allowed exit."""

    def __init__(self, in_channels: int, exits: Sequence[int]) -> None:
        super().__init__()
        exits = check_exits(exits, name="gate exits")
        self.in_channels = int(in_channels)
        self.linear = nn.Linear(self.in_channels, len(exits))
        self.register_buffer("exits", torch.tensor(exits, dtype=torch.long), persistent=True)

    @classmethod
    def from_config(cls, cfg: Any, in_channels: int) -> "ExitGate":
        """Gate over the exits of MODEL.ECO.EXITS that MODEL.ECO.GATE.K_USER allows."""
        return cls(in_channels, allowed_exits(cfg.MODEL.ECO.EXITS, cfg.MODEL.ECO.GATE.K_USER))

    @property
    def exit_list(self) -> List[int]:
        return [int(k) for k in self.exits.tolist()]

    @staticmethod
    def pool(s1: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
        """z(s1): average over the tokens (spatial positions). [B, C, H, W] -> [B, C].

        ``valid`` (optional, bool [B, H, W]) restricts the average to each image's own tokens, so
        that z does not depend on how much padding its batch added; without it every token counts.
        """
        if s1.dim() != 4:
            raise ValueError(f"gate input s1 must be [B, C, H, W], got shape {tuple(s1.shape)}")
        if valid is None:
            return F.adaptive_avg_pool2d(s1, 1).flatten(1)  # [B, C, 1, 1] -> [B, C]
        b, _, h, w = s1.shape
        if tuple(valid.shape) != (b, h, w):
            raise ValueError(f"valid mask must be [B, H, W] = {(b, h, w)}, got {tuple(valid.shape)}")
        m = valid.to(s1.dtype).unsqueeze(1)  # [B, 1, H, W]
        return (s1 * m).sum(dim=(2, 3)) / m.sum(dim=(2, 3)).clamp(min=1.0)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """Logits [B, |exits|] for pooled features z [B, C]."""
        if z.dim() != 2 or z.shape[1] != self.in_channels:
            raise ValueError(f"gate expects z of shape [B, {self.in_channels}], got {tuple(z.shape)}")
        return self.linear(z.to(self.linear.weight.dtype))

    @torch.no_grad()
    def choose(self, z: torch.Tensor) -> torch.Tensor:
        """Exit value (encoder depth) per image, LongTensor [B]: exits[argmax_k g_k]."""
        return self.exits[self.forward(z).argmax(dim=1)]

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs) -> None:
        key = prefix + "exits"
        if key in state_dict:
            loaded = [int(k) for k in torch.as_tensor(state_dict[key]).tolist()]
            if loaded != self.exit_list:
                error_msgs.append(
                    f"gate checkpoint was trained for exits {loaded} but this gate has exits "
                    f"{self.exit_list} (MODEL.ECO.EXITS restricted by MODEL.ECO.GATE.K_USER); "
                    "use the K_USER the gate was trained with"
                )
                return
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)


def load_gate_checkpoint(path: str) -> Tuple[Dict[str, torch.Tensor], Dict[str, Any]]:
    """Read a step-C ``gate.pth``: the gate's state dict (keys linear.weight, linear.bias, exits)
    and the rest (exits, beta, k_user, loss, metrics)."""
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(ckpt, Mapping) or "gate" not in ckpt:
        raise ValueError(f"{path} is not a gate checkpoint: expected a dict with a 'gate' state dict")
    info = {k: v for k, v in ckpt.items() if k != "gate"}
    return dict(ckpt["gate"]), info
