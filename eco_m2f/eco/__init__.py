"""ECO-M2F (papers/004): derived per-image quality records (step B store), gate targets, gate
training (step C) and the beta sweep. Import submodules directly (``eco_m2f.eco.gate`` needs torch)."""
from __future__ import annotations

from .records import RecordWriter, format_summary, load_records, read_meta, summarize, write_meta
from .targets import allowed_exits, target_exits, targets, utility

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
