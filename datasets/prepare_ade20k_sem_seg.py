#!/usr/bin/env python
"""ADE20K semantic labels for Detectron2: ADEChallengeData2016/annotations_detectron2/{training,validation}.

SceneParsing PNGs store 0 = "other" and 1..150; the prepared PNGs store 0..149 and 255 = ignore.

    python datasets/prepare_ade20k_sem_seg.py [--root $DETECTRON2_DATASETS/ADEChallengeData2016]
"""
from __future__ import annotations

import argparse
import os
import sys

from eco_m2f.data.catalog import datasets_root
from eco_m2f.data.datasets.ade20k import ade20k_semantic_to_detectron2


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", default=None, help="default: $DETECTRON2_DATASETS/ADEChallengeData2016")
    args = parser.parse_args(argv)
    root = args.root or os.path.join(datasets_root(), "ADEChallengeData2016")
    for split in ("training", "validation"):
        in_dir = os.path.join(root, "annotations", split)
        if not os.path.isdir(in_dir):
            print(f"error: expected folder {os.path.abspath(in_dir)} (unzip ADEChallengeData2016.zip into "
                  f"{os.path.dirname(os.path.abspath(root))})", file=sys.stderr)
            return 1
        out_dir = os.path.join(root, "annotations_detectron2", split)
        n = ade20k_semantic_to_detectron2(in_dir, out_dir)
        print(f"{split}: wrote {n} PNGs to {out_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
