"""Encoder exits of ECO-M2F (papers/004): one rule for every list of exits in the project.

An exit k means "run encoder layers 1..k". A list of exits is valid when its values are
integers >= 1, strictly increasing (so a list index and a depth order agree: the columns of a
derived record, the logits of the gate) and, when the encoder depth K is known, at most K.
``MODEL.ECO.EXITS`` is a set in the paper (E), so :func:`exit_set` sorts and de-duplicates the
config value before the same check.
"""
from __future__ import annotations

from typing import Iterable, List, Optional, Sequence

__all__ = ["allowed_exits", "check_exits", "exit_set"]


def check_exits(exits: Iterable[int], name: str = "exits", num_layers: Optional[int] = None) -> List[int]:
    """The exits as a list of ints; a ValueError naming ``name`` unless they follow the rule above."""
    out = [int(k) for k in exits]
    if not out:
        raise ValueError(f"{name} is empty; expected encoder layers such as [2, 3, 4, 5, 6]")
    if any(k < 1 for k in out) or any(b <= a for a, b in zip(out, out[1:])):
        raise ValueError(f"{name} must be positive and strictly increasing; got {out}")
    if num_layers is not None:
        outside = [k for k in out if k > num_layers]
        if outside:
            raise ValueError(
                f"{name} {out} has exits {outside} outside 1..{num_layers} "
                f"(MODEL.SEM_SEG_HEAD.TRANSFORMER_ENC_LAYERS = {num_layers})"
            )
    return out


def exit_set(exits: Sequence[int], num_layers: int, name: str = "MODEL.ECO.EXITS") -> List[int]:
    """A config's exit set E: sorted, duplicates dropped, then :func:`check_exits` against K."""
    return check_exits(sorted({int(k) for k in exits}), name=name, num_layers=num_layers)


def allowed_exits(exits: Sequence[int], k_user: int) -> List[int]:
    """Exits a user with a budget of ``k_user`` encoder layers may take: [k in exits if k <= k_user]."""
    exits = check_exits(exits)
    allowed = [k for k in exits if k <= int(k_user)]
    if not allowed:
        raise ValueError(f"No exit is allowed: K_USER={k_user} is below the smallest exit of EXITS={exits}")
    return allowed
