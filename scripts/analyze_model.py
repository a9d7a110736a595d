#!/usr/bin/env python
"""Parameters and GFLOPs of a config's model (total and pixel-decoder encoder).

    python scripts/analyze_model.py --config-file CONFIG [--num-inputs N | --size H W] [--exit K] [KEY VALUE ...]

With --num-inputs, GFLOPs are averaged over the first N images of DATASETS.TEST[0] as the test
loader gives them; with --size, they are counted for one input of that size.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from eco_m2f.config import setup_cfg  # noqa: E402
from eco_m2f.evaluation.flops import FlopCache, count_network_flops  # noqa: E402
from eco_m2f.modeling import build_model  # noqa: E402


def parameter_table(model: torch.nn.Module) -> str:
    rows = [("total", sum(p.numel() for p in model.parameters()))]
    for name, child in model.named_children():
        n = sum(p.numel() for p in child.parameters())
        if n:
            rows.append((name, n))
    head = getattr(model, "sem_seg_head", None)
    if head is not None:
        for name, child in head.named_children():
            rows.append((f"sem_seg_head.{name}", sum(p.numel() for p in child.parameters())))
    return "\n".join(f"  {name:<32}{n / 1e6:>10.3f} M" for name, n in rows)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config-file", required=True)
    g = p.add_mutually_exclusive_group()
    g.add_argument("--num-inputs", type=int, default=0, help="average GFLOPs over N images of DATASETS.TEST[0]")
    g.add_argument("--size", type=int, nargs=2, metavar=("H", "W"), help="count GFLOPs for one input of this size")
    p.add_argument("--exit", type=int, default=None, help="stop the encoder after this layer")
    p.add_argument("opts", nargs=argparse.REMAINDER, help="KEY VALUE config overrides")
    args = p.parse_args(argv)

    cfg = setup_cfg(args.config_file, ["MODEL.DEVICE", "cpu"] + list(args.opts))
    model = build_model(cfg).eval()
    print(f"config: {args.config_file}")
    print("parameters:")
    print(parameter_table(model))

    if args.num_inputs:
        from eco_m2f.data import build_detection_test_loader

        dataset = cfg.DATASETS.TEST[0]
        cache = FlopCache(model)
        totals, encoders = [], []
        for i, batch in enumerate(build_detection_test_loader(cfg, dataset)):
            if i >= args.num_inputs:
                break
            images = model.preprocess_image(batch)
            f = cache.get(tuple(images.tensor.shape[-2:]), args.exit)
            totals.append(f["total"])
            encoders.append(f["encoder"])
        if not totals:
            raise SystemExit(f"Dataset {dataset} gave no images")
        where = f"averaged over {len(totals)} images of {dataset}"
        total, encoder = sum(totals) / len(totals), sum(encoders) / len(encoders)
    else:
        h, w = args.size or (cfg.INPUT.IMAGE_SIZE, cfg.INPUT.IMAGE_SIZE)
        images = torch.zeros(1, 3, h, w)
        f = count_network_flops(model, images, args.exit)
        where = f"one {h}x{w} input"
        total, encoder = f["total"], f["encoder"]
    depth = "full depth" if args.exit is None else f"exit {args.exit}"
    print(f"GFLOPs ({where}, encoder {depth}): total {total:.2f}, encoder {encoder:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
