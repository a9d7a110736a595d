#!/usr/bin/env python
"""Time the two Segmenter stages whose cost no token reduction removes, old and new way.

* patch embedding: timm's p x p stride-p convolution against the same weights as one matrix
  product on the patches (``ViTBackbone.embed_patches``);
* upsampling the class logits to the image: ``F.interpolate`` bilinear against the two
  interpolation-matrix products (``eco_m2f.modeling.bilinear_resize``).

Each pair must agree (within a few roundings of the dtype) before it is timed. Example (one GPU, bf16)::

    python scripts/benchmark_fixed_costs.py --size 1024 --batch 8 1 --classes 16
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from eco_m2f.evaluation.throughput import DTYPES, time_callable  # noqa: E402
from eco_m2f.modeling.backbone.vit import ViTBackbone  # noqa: E402
from eco_m2f.modeling.bilinear_resize import bilinear_resize  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", type=int, default=1024, help="square input side (pixels)")
    parser.add_argument("--batch", type=int, nargs="+", default=[8, 1])
    parser.add_argument("--classes", type=int, default=16, help="logit channels to upsample")
    parser.add_argument("--embed-dim", type=int, default=384, help="ViT width (ViT-S: 384)")
    parser.add_argument("--patch", type=int, default=16)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    parser.add_argument("--iters", type=int, default=50)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        parser.error("needs a CUDA device")
    dev = torch.device("cuda")
    dtype = DTYPES[args.dtype]
    vit = ViTBackbone(img_size=args.size, patch_size=args.patch, embed_dim=args.embed_dim, depth=1,
                      num_heads=max(1, args.embed_dim // 64)).to(dev).eval()
    proj = vit.patch_embed.proj
    grid = args.size // args.patch
    print(f"device: {torch.cuda.get_device_name(dev)}; torch {torch.__version__}; {args.dtype}; "
          f"input {args.size}x{args.size}, patch {args.patch}, width {args.embed_dim}; logits {args.classes} x {grid}x{grid}")
    print(f"{'stage':<16}{'batch':>6}{'before ms':>11}{'after ms':>10}{'speed-up':>10}{'max |diff|':>12}")
    for b in args.batch:
        images = torch.randn(b, 3, args.size, args.size, device=dev)
        logits = torch.randn(b, args.classes, grid, grid, device=dev, dtype=dtype)
        size = (args.size, args.size)
        with torch.inference_mode(), torch.autocast("cuda", dtype=dtype, enabled=args.dtype != "fp32"):
            pairs = {
                "patch embedding": (lambda: proj(images).flatten(2).transpose(1, 2), lambda: vit.embed_patches(images)[0]),
                "upsampling": (lambda: F.interpolate(logits, size, mode="bilinear", align_corners=False),
                               lambda: bilinear_resize(logits, size)),
            }
            for name, (before, after) in pairs.items():
                ref = before().float()
                diff = (ref - after().float()).abs().max().item()
                bound = 0.02 * ref.abs().max().item() + 1e-3  # a few bf16 roundings of the largest value
                if diff > bound:
                    raise SystemExit(f"{name} at batch {b}: the two ways differ by {diff:.3g} (> {bound:.3g})")
                t0 = time_callable(before, 10, args.iters, dev)
                t1 = time_callable(after, 10, args.iters, dev)
                print(f"{name:<16}{b:>6}{t0:>11.3f}{t1:>10.3f}{t0 / t1:>9.1f}x{diff:>12.2e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
