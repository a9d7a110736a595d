"""ECO-M2F (papers/004), in one home.

* ``meta_arch``: ``ECOMaskFormer``, Mask2Former with encoder exits, step-A training and gated
  inference (registered as ``MODEL.META_ARCHITECTURE: ECOMaskFormer``);
* ``exits``, ``stochastic_depth``: the exit rule and step A's weighted stochastic depth;
* ``derive`` + ``records``: step B, the derived dataset of per-image quality per exit;
* ``gate``, ``gate_losses``, ``targets``, ``gate_training``, ``step_c``: the gate and step C;
* ``fixed_exits``, ``sweep``: evaluation at fixed exits and the beta trade-off sweep.

Only the torch-free record and target helpers load with the package; import the others directly.
"""
from __future__ import annotations

from .exits import allowed_exits
from .records import RecordWriter, format_summary, load_records, read_meta, summarize, write_meta
from .targets import target_exits, targets, utility

__all__ = [
    "RecordWriter",
    "allowed_exits",
    "format_summary",
    "load_records",
    "read_meta",
    "summarize",
    "target_exits",
    "targets",
    "utility",
    "write_meta",
]
