#!/usr/bin/env python
"""Generate the synthetic semantic dataset (16 texture classes, per-image complexity levels).

    python datasets/prepare_synthetic_semantic.py [--root $DETECTRON2_DATASETS/synthetic_sem_seg]
        [--num-train 1000] [--num-val 100] [--height 512] [--width 512] [--seed 0] [--workers N]

The same arguments always give byte-identical files, whatever --workers. A killed run resumes
where it stopped when started again with the same arguments. The datasets synthetic_sem_seg_*
read $DETECTRON2_DATASETS/synthetic_sem_seg (512x512) and synthetic_sem_seg_512x1024_* read
$DETECTRON2_DATASETS/synthetic_sem_seg_512x1024; each is generated with its defaults when missing.
"""
from __future__ import annotations

import argparse
import os
import sys

from eco_m2f.data.datasets.synthetic_semantic import (
    DEFAULT_SEED,
    NUM_LEVELS,
    PATCH_SIZES,
    VARIANTS,
    default_root,
    generate_synthetic_semantic_dataset,
    summarize,
)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    height, width, num_train, num_val = VARIANTS["synthetic_sem_seg"]
    parser.add_argument("--root", default=None, help="output folder (default: $DETECTRON2_DATASETS/synthetic_sem_seg)")
    parser.add_argument("--num-train", type=int, default=num_train)
    parser.add_argument("--num-val", type=int, default=num_val)
    parser.add_argument("--height", type=int, default=height)
    parser.add_argument("--width", type=int, default=width)
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED)
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="processes (default: all cores)")
    args = parser.parse_args(argv)
    root = os.path.abspath(args.root or default_root())
    summary = generate_synthetic_semantic_dataset(root, args.num_train, args.num_val, args.height, args.width,
                                                  args.seed, args.workers)
    print(f"Synthetic semantic dataset in {summary['root']} ({summary['seconds']:.1f} s, {args.workers} workers, "
          f"seed {args.seed}, {args.height}x{args.width})")
    for split, records in summary["images"].items():
        s = summarize(records)
        print(f"  {split}: {s['num_images']} images; per complexity level 0..{NUM_LEVELS - 1}: {s['per_level']}; "
              f"easy {PATCH_SIZES[0]}x{PATCH_SIZES[0]} tokens per image: min {s['easy_min']:.3f}, "
              f"mean {s['easy_mean']:.3f}, max {s['easy_max']:.3f}")
    print("  layout: images/{split}/*.png, annotations/{split}/*.png (class ids 0..15), synthetic_sem_seg_info.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
