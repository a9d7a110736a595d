#!/usr/bin/env python
"""Make COCO panoptic semantic PNGs: coco/panoptic_semseg_{train,val}2017/ from coco/panoptic_{split}2017.

Pixel value = contiguous class id (index of the category among the 133 COCO panoptic
categories), 255 = void. Needed by the ``coco_2017_{split}_panoptic_with_sem_seg`` datasets.

    python datasets/prepare_coco_semantic_from_panoptic.py [--root $DETECTRON2_DATASETS/coco] [--workers N]
"""
from __future__ import annotations

import argparse
import os
import sys
import time

from eco_m2f.data.catalog import datasets_root
from eco_m2f.data.datasets.coco_panoptic import panoptic_to_semantic


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", default=None, help="COCO folder (default: $DETECTRON2_DATASETS/coco)")
    parser.add_argument("--splits", nargs="+", default=["train2017", "val2017"])
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args(argv)
    root = args.root or os.path.join(datasets_root(), "coco")
    for split in args.splits:
        pan_json = os.path.join(root, "annotations", f"panoptic_{split}.json")
        pan_root = os.path.join(root, f"panoptic_{split}")
        out_dir = os.path.join(root, f"panoptic_semseg_{split}")
        for path, kind in ((pan_json, "file"), (pan_root, "folder")):
            if not (os.path.isfile(path) if kind == "file" else os.path.isdir(path)):
                print(f"error: expected {kind} {os.path.abspath(path)} (unzip panoptic_annotations_trainval2017.zip "
                      f"and its panoptic_{split}.zip there)", file=sys.stderr)
                return 1
        t0 = time.perf_counter()
        n = panoptic_to_semantic(pan_json, pan_root, out_dir, num_workers=args.workers)
        print(f"{split}: wrote {n} semantic PNGs to {out_dir} ({time.perf_counter() - t0:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
