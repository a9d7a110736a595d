"""Lightning's accelerator and precision from ``MODEL.DEVICE`` and ``SOLVER.AMP``."""
from __future__ import annotations

from ..utils.device import resolve_device

__all__ = ["select_accelerator", "select_precision"]


def select_accelerator(cfg) -> str:
    """'gpu' when MODEL.DEVICE asks for CUDA and CUDA is available, else 'cpu' (with a warning)."""
    return "gpu" if resolve_device(cfg.MODEL.DEVICE).type == "cuda" else "cpu"


def select_precision(cfg, accelerator: str) -> str:
    """Lightning precision from SOLVER.AMP: fp16 mixed on GPU (bf16 if SOLVER.AMP.PRECISION says
    so), bf16 mixed on CPU (CPU autocast has no fp16 GradScaler), full fp32 when AMP is off."""
    if not cfg.SOLVER.AMP.ENABLED:
        return "32-true"
    wanted = str(cfg.SOLVER.AMP.get("PRECISION", "float16")).lower()
    if wanted not in ("float16", "fp16", "16", "bfloat16", "bf16"):
        raise ValueError(f"SOLVER.AMP.PRECISION '{wanted}' is not supported; use 'float16' or 'bfloat16'")
    if accelerator == "cpu" or wanted in ("bfloat16", "bf16"):
        return "bf16-mixed"
    return "16-mixed"
