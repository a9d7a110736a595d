#!/usr/bin/env python
"""Generate the synthetic panoptic dataset (COCO-panoptic and Cityscapes layouts).

    python datasets/prepare_synthetic.py [--root $DETECTRON2_DATASETS/synthetic] [--num-train 200]
        [--num-val 50] [--image-size 256] [--seed 0] [--preset standard|hard] [--workers N]

The same arguments always give byte-identical files. Datasets registered as synthetic_* read
$DETECTRON2_DATASETS/synthetic, and generate it with the defaults when it is missing. ``--preset
hard`` draws busier scenes (up to 80 smaller objects, thin rods, stronger stuff textures); every
image's complexity goes to complexity_{split}.json either way. ``--workers N`` renders images in N
processes; the files do not depend on it.
"""
from __future__ import annotations

import argparse
import os
import sys

from eco_m2f.data.datasets.synthetic import PRESETS, DEFAULTS, default_synthetic_root, generate_synthetic_dataset


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", default=None, help="output folder (default: $DETECTRON2_DATASETS/synthetic)")
    parser.add_argument("--num-train", type=int, default=DEFAULTS["num_train"])
    parser.add_argument("--num-val", type=int, default=DEFAULTS["num_val"])
    parser.add_argument("--image-size", type=int, default=DEFAULTS["image_size"])
    parser.add_argument("--seed", type=int, default=DEFAULTS["seed"])
    parser.add_argument("--preset", choices=sorted(PRESETS), default=DEFAULTS["preset"],
                        help="scene style: standard, or hard (busier scenes for the ECO-M2F trends)")
    parser.add_argument("--workers", type=int, default=1, help="processes rendering images (default 1)")
    args = parser.parse_args(argv)
    root = os.path.abspath(args.root or default_synthetic_root())
    summary = generate_synthetic_dataset(root, args.num_train, args.num_val, args.image_size, args.seed, args.preset,
                                         args.workers)
    print(f"Synthetic panoptic dataset in {summary['root']} ({summary['seconds']:.1f} s, seed {args.seed}, "
          f"{args.image_size}x{args.image_size}, preset {args.preset})")
    for split, s in summary["splits"].items():
        print(f"  {split}: {s['num_images']} images, {s['num_instances']} thing instances, "
              f"{s['min_objects']}-{s['max_objects']} objects per image")
    print("  COCO-panoptic layout: images/{split}/, panoptic_{split}.json + panoptic_{split}/, "
          "panoptic_semseg_{split}/, instances_{split}.json, complexity_{split}.json")
    print("  Cityscapes layout:    cityscapes/leftImg8bit/{split}/, cityscapes/gtFine/{split}/ "
          "(labelIds, instanceIds, labelTrainIds), cityscapes/gtFine/cityscapes_panoptic_{split}.json + PNGs")
    return 0


if __name__ == "__main__":
    sys.exit(main())
