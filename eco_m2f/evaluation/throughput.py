"""Forward-pass throughput: images/s and latency after warm-up, CUDA-synchronised.

Used by ``scripts/benchmark.py`` to time our network against Hugging Face ``transformers``'
Mask2Former built with the same sizes, in the same process, so the two share one machine state.
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional

import torch
import torch.nn as nn

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class Timing:
    name: str
    batch: int
    dtype: str
    latency_ms: float  # median time of one forward pass of the batch
    images_per_s: float


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_forward(
    fn: Callable[[torch.Tensor], object],
    images: torch.Tensor,
    dtype: str,
    warmup: int = 10,
    iters: int = 30,
) -> tuple[float, float]:
    """(median latency in ms, images/s) of ``fn(images)`` under autocast to ``dtype``."""
    if dtype not in DTYPES:
        raise ValueError(f"Unknown dtype '{dtype}'; choose from {sorted(DTYPES)}")
    device = images.device
    use_autocast = dtype != "fp32"
    times: List[float] = []
    with torch.inference_mode(), torch.autocast(device.type, dtype=DTYPES[dtype], enabled=use_autocast):
        for _ in range(warmup):
            fn(images)
        _sync(device)
        for _ in range(iters):
            start = time.perf_counter()
            fn(images)
            _sync(device)
            times.append(time.perf_counter() - start)
    latency = statistics.median(times)
    return latency * 1e3, images.shape[0] / latency


def network_forward(model: nn.Module, exit_layer: Optional[int] = None) -> Callable[[torch.Tensor], object]:
    """Backbone + head of one of our MaskFormer models on a normalised padded batch."""

    def run(images: torch.Tensor):
        features = model.backbone(images)
        return model.sem_seg_head(features, exit_layer=exit_layer)

    return run


def build_hf_mask2former(cfg) -> nn.Module:
    """transformers' Mask2FormerForUniversalSegmentation with the sizes of ``cfg`` (random weights).

    Swin backbones map MODEL.SWIN.*; ResNet ones use transformers' ResNetConfig of the same depth.
    """
    from transformers import Mask2FormerConfig, Mask2FormerForUniversalSegmentation, ResNetConfig, SwinConfig

    mf, head = cfg.MODEL.MASK_FORMER, cfg.MODEL.SEM_SEG_HEAD
    if cfg.MODEL.BACKBONE.NAME == "D2SwinTransformer":
        sw = cfg.MODEL.SWIN
        backbone = SwinConfig(
            embed_dim=sw.EMBED_DIM,
            depths=list(sw.DEPTHS),
            num_heads=list(sw.NUM_HEADS),
            window_size=sw.WINDOW_SIZE,
            mlp_ratio=sw.MLP_RATIO,
            drop_path_rate=sw.DROP_PATH_RATE,
            out_features=["stage1", "stage2", "stage3", "stage4"],
        )
    else:
        depths = {50: [3, 4, 6, 3], 101: [3, 4, 23, 3]}[cfg.MODEL.RESNETS.DEPTH]
        backbone = ResNetConfig(depths=depths, layer_type="bottleneck", out_features=["stage1", "stage2", "stage3", "stage4"])
    config = Mask2FormerConfig(
        backbone_config=backbone,
        num_labels=head.NUM_CLASSES,
        feature_size=head.CONVS_DIM,
        mask_feature_size=head.MASK_DIM,
        hidden_dim=mf.HIDDEN_DIM,
        encoder_feedforward_dim=head.DEFORMABLE_TRANSFORMER_ENCODER_DIM_FEEDFORWARD,
        encoder_layers=head.TRANSFORMER_ENC_LAYERS,
        decoder_layers=mf.DEC_LAYERS,
        num_attention_heads=mf.NHEADS,
        dim_feedforward=mf.DIM_FEEDFORWARD,
        num_queries=mf.NUM_OBJECT_QUERIES,
        common_stride=head.COMMON_STRIDE,
    )
    return Mask2FormerForUniversalSegmentation(config)


def hf_forward(model: nn.Module) -> Callable[[torch.Tensor], object]:
    def run(images: torch.Tensor):
        return model(pixel_values=images)

    return run


def format_timings(rows: List[Timing], baseline: str, ours: str) -> str:
    """A table of the timings with the speed ratio ours / baseline per (batch, dtype)."""
    lines = [f"{'model':<28}{'batch':>6}{'dtype':>7}{'latency ms':>12}{'images/s':>11}{'speed-up':>10}"]
    index: Dict[tuple, Timing] = {(r.name, r.batch, r.dtype): r for r in rows}
    for r in rows:
        ratio = ""
        if r.name == ours and (baseline, r.batch, r.dtype) in index:
            ratio = f"{r.images_per_s / index[(baseline, r.batch, r.dtype)].images_per_s:.2f}x"
        lines.append(f"{r.name:<28}{r.batch:>6}{r.dtype:>7}{r.latency_ms:>12.2f}{r.images_per_s:>11.1f}{ratio:>10}")
    return "\n".join(lines)
