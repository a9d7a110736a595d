"""The CTS policy network's parts outside its meta-architecture (``TokenSharingPolicy``):
superpatch targets from semantic labels, and building a trained policy frozen inside another model."""
from __future__ import annotations

from .frozen import build_frozen_policy, load_frozen_policy
from .targets import SUPERPATCH_SIZE, superpatch_grid, superpatch_targets, window_grid, window_targets

__all__ = ["SUPERPATCH_SIZE", "build_frozen_policy", "load_frozen_policy", "superpatch_grid", "superpatch_targets", "window_grid",
           "window_targets"]
