#!/usr/bin/env python
"""Time forward passes of a config's network (``model.network``) and optionally transformers' Mask2Former.

    python scripts/benchmark.py --config-file CONFIG [--size H W] [--batch-sizes 1 8]
        [--dtypes fp32 bf16] [--compare-hf] [--exit K] [--variant NAME KEY VALUE ...]
        [--stages] [--profile N] [KEY VALUE ...]

``--variant`` (repeatable) also times our model with extra config overrides, e.g.
``--variant "bf16 pixel decoder" MODEL.SEM_SEG_HEAD.PIXEL_DECODER_FP32 False``;
``--stages`` adds the GPU time of the model's ``benchmark_stages()`` (MaskFormer: backbone, pixel
decoder, transformer decoder) per pass; ``--exit K`` times an ECO-M2F network at exit K;
``--profile N`` prints the N kernels with the most GPU time (torch.profiler) per setting;
``--real-images`` times the first images of ``DATASETS.TEST[0]`` as the test mapper gives them
(padded into one batch) instead of random ones, with the trained weights of ``MODEL.WEIGHTS``
loaded (checked key by key): what a gated ECO-M2F model spends depends on the images, e.g.
``--real-images MODEL.WEIGHTS stepA.pth MODEL.ECO.GATE.ENABLED True MODEL.ECO.GATE.WEIGHTS gate.pth``.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from eco_m2f.architectures import build_model  # noqa: E402
from eco_m2f.config import setup_cfg  # noqa: E402
from eco_m2f.evaluation.reduction_sweep import build_trained, timed_inputs  # noqa: E402
from eco_m2f.evaluation.throughput import (  # noqa: E402
    Timing,
    build_hf_mask2former,
    format_timings,
    hf_forward,
    hf_stages,
    profile_kernels,
    stage_times,
    time_forward,
)

HF_NAME = "transformers Mask2Former"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config-file", required=True)
    p.add_argument("--size", type=int, nargs=2, default=[1024, 1024], metavar=("H", "W"))
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    p.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"])
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--iters", type=int, default=30)
    p.add_argument("--exit", type=int, default=None, help="time our model with the encoder stopped after this layer")
    p.add_argument("--compare-hf", action="store_true", help="also time transformers' Mask2Former of the same sizes")
    p.add_argument(
        "--variant", nargs="+", action="append", default=[], metavar="NAME KEY VALUE",
        help="also time our model under this name with these extra KEY VALUE overrides (repeatable)",
    )
    p.add_argument("--stages", action="store_true", help="also time backbone / pixel decoder / transformer decoder")
    p.add_argument("--profile", type=int, default=0, metavar="N", help="print the N kernels with the most GPU time")
    p.add_argument("--real-images", action="store_true",
                   help="time the first validation images with the MODEL.WEIGHTS weights (see above)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--json", default="", help="write the timings to this JSON file")
    p.add_argument("opts", nargs=argparse.REMAINDER, help="KEY VALUE config overrides")
    args = p.parse_args(argv)

    cfg = setup_cfg(args.config_file, args.opts)
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False  # fp32 means fp32 for both models
        torch.backends.cudnn.allow_tf32 = False
    cost = None if args.exit is None else {"exit": args.exit}

    def network(model):
        """``model.network`` on a batch, along ``cost``; its stages for --stages."""
        if cost is not None and model.cost_signature(cost) == model.cost_signature({}):
            p.error(f"{type(model).__name__}'s network does not depend on an exit (ECOMaskFormer's does)")
        return (lambda images: model.network(images, cost)), model.benchmark_stages()

    real = None
    if args.real_images:
        if args.compare_hf:
            p.error("--real-images times our trained model; it cannot be combined with --compare-hf")
        real = timed_inputs(cfg, max(args.batch_sizes))

    def load(model_cfg):
        """The model of ``model_cfg``: with --real-images its MODEL.WEIGHTS, checked key by key."""
        return build_trained(model_cfg, args.device) if real is not None else build_model(model_cfg).to(device).eval()

    ours = load(cfg)
    name_ours = f"eco_m2f ({cfg.MODEL.BACKBONE.NAME})" if args.exit is None else f"eco_m2f exit {args.exit}"
    models = [(name_ours, *network(ours))]
    for name, *opts in args.variant:
        if not opts or len(opts) % 2:
            p.error(f"--variant '{name}' needs KEY VALUE pairs after its name, got {opts}")
        models.append((f"eco_m2f {name}", *network(load(setup_cfg(args.config_file, list(args.opts) + opts)))))
    if args.compare_hf:
        hf = build_hf_mask2former(cfg).to(device).eval()
        models.append((HF_NAME, hf_forward(hf), hf_stages(hf)))
    print(f"device: {torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}; "
          f"input {'the first validation images' if real else f'{args.size[0]}x{args.size[1]}'}; warm-up {args.warmup}, timed {args.iters} passes (median)")
    rows = []
    for batch in args.batch_sizes:
        if real is not None:
            images = ours.preprocess_image(real[:batch]).tensor  # normalised and padded, as inference sees them
        else:
            images = torch.randn(batch, 3, *args.size, device=device)
        for dtype in args.dtypes:
            for name, fn, stages in models:
                latency, ips = time_forward(fn, images, dtype, args.warmup, args.iters)
                rows.append(Timing(name, batch, dtype, latency, ips))
                print(f"  {name}: batch {batch} {dtype}: {latency:.2f} ms, {ips:.1f} images/s", flush=True)
                if args.stages:
                    parts = stage_times(fn, images, dtype, stages)
                    print("    GPU ms per stage: " + ", ".join(f"{k} {v:.2f}" for k, v in parts.items()), flush=True)
                if args.profile:
                    print(profile_kernels(fn, images, dtype, args.profile), flush=True)
        del images
        if device.type == "cuda":
            torch.cuda.empty_cache()
    print(format_timings(rows, baseline=HF_NAME, ours=[m[0] for m in models if m[0] != HF_NAME]))
    if args.json:
        Path(args.json).write_text(json.dumps([r.__dict__ for r in rows], indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
