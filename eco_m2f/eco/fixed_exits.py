"""Evaluate one model at several fixed encoder exits in one process (papers/004 Table 5).

Each exit is a full evaluation (PQ/mIoU/AP + GFLOPs) of every image leaving the encoder at k;
building and loading the model once makes a table of exits cheap. A plain Mask2Former config
(``MaskFormer``) is evaluated as an ``ECOMaskFormer`` with step A and the gate off: the same
network and weights, its encoder truncated (the "baseline M2F" rows of Table 5).
"""
from __future__ import annotations

import os
from typing import Any, Dict, List, Optional, Sequence

import torch


def evaluate_exits(cfg, weights: Optional[str], exits: Sequence[Optional[int]], device: Optional[str] = None) -> List[Dict[str, Any]]:
    """One row per exit (None = full depth): PQ, SQ, RQ, mIoU, AP and GFLOPs on DATASETS.TEST[0]."""
    from ..architectures import build_model
    from ..checkpoint import load_weights
    from ..evaluation.testing import do_test
    from .meta_arch import as_eco_config

    cfg = as_eco_config(cfg, ["MODEL.DEVICE", device or ("cuda" if torch.cuda.is_available() else "cpu")])
    base_out = cfg.OUTPUT_DIR
    model = build_model(cfg)
    if weights:
        load_weights(model, weights)
    model.eval()
    rows = []
    for k in exits:
        cfg.defrost()
        cfg.OUTPUT_DIR = os.path.join(base_out, f"exit{k}" if k else "full")
        cfg.freeze()
        model.test_exit = k
        with torch.no_grad():
            res = do_test(cfg, model)[cfg.DATASETS.TEST[0]]
        pan, sem, seg, cost = (res.get(t, {}) for t in ("panoptic_seg", "sem_seg", "segm", "cost"))
        rows.append({
            "exit": k or model.sem_seg_head.num_encoder_layers,
            "PQ": pan.get("PQ"), "SQ": pan.get("SQ"), "RQ": pan.get("RQ"),
            "PQ_th": pan.get("PQ_th"), "PQ_st": pan.get("PQ_st"),
            "mIoU": sem.get("mIoU"), "AP": seg.get("AP"),
            "gflops": cost.get("gflops"), "gflops_encoder": cost.get("gflops_encoder"),
        })
    return rows


def format_exit_table(rows: Sequence[Dict[str, Any]], title: str = "") -> str:
    def f(v: Any, fmt: str = "{:.2f}") -> str:
        return "-" if v is None else fmt.format(v)

    lines = [title] if title else []
    lines.append(f"{'exit':>5}{'PQ':>8}{'SQ':>8}{'RQ':>8}{'PQ_th':>8}{'PQ_st':>8}{'mIoU':>8}{'AP':>8}{'GFLOPs':>9}{'enc GFLOPs':>12}")
    for r in rows:
        lines.append(
            f"{r['exit']:>5}{f(r['PQ']):>8}{f(r['SQ']):>8}{f(r['RQ']):>8}{f(r['PQ_th']):>8}{f(r['PQ_st']):>8}"
            f"{f(r['mIoU']):>8}{f(r['AP']):>8}{f(r['gflops']):>9}{f(r['gflops_encoder'], '{:.3f}'):>12}"
        )
    return "\n".join(lines)
