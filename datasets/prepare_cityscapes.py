#!/usr/bin/env python
"""Prepare Cityscapes with cityscapesscripts: labelTrainIds PNGs and COCO-format panoptic GT.

Runs, on $DETECTRON2_DATASETS/cityscapes (or --root):
  1. cityscapesscripts.preparation.createTrainIdLabelImgs (= csCreateTrainIdLabelImgs):
     gtFine/*/*/*_gtFine_polygons.json -> *_gtFine_labelTrainIds.png (semantic training labels);
  2. cityscapesscripts.preparation.createPanopticImgs (= csCreatePanopticImgs) with label ids:
     gtFine/*/*/*_gtFine_instanceIds.png -> gtFine/cityscapes_panoptic_{split}.json + PNG folder.

    python datasets/prepare_cityscapes.py [--root DIR] [--splits train val] [--skip-train-ids] [--skip-panoptic]
"""
from __future__ import annotations

import argparse
import glob
import os
import sys
import time

from eco_m2f.data.catalog import datasets_root


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", default=None, help="Cityscapes folder (default: $DETECTRON2_DATASETS/cityscapes)")
    parser.add_argument("--splits", nargs="+", default=["train", "val"])
    parser.add_argument("--skip-train-ids", action="store_true", help="do not (re)create *_labelTrainIds.png")
    parser.add_argument("--skip-panoptic", action="store_true", help="do not (re)create the panoptic JSON/PNGs")
    args = parser.parse_args(argv)
    root = os.path.abspath(args.root or os.path.join(datasets_root(), "cityscapes"))
    gt_fine = os.path.join(root, "gtFine")
    if not os.path.isdir(gt_fine):
        print(f"error: expected folder {gt_fine} (unzip gtFine_trainvaltest.zip and leftImg8bit_trainvaltest.zip into {root})",
              file=sys.stderr)
        return 1

    if not args.skip_train_ids:
        polygons = glob.glob(os.path.join(gt_fine, "*", "*", "*_gt*_polygons.json"))
        if not polygons:
            print(f"error: no *_gtFine_polygons.json under {gt_fine}; cannot make labelTrainIds "
                  f"(use --skip-train-ids if they already exist)", file=sys.stderr)
            return 1
        from cityscapesscripts.preparation import createTrainIdLabelImgs

        t0 = time.perf_counter()
        os.environ["CITYSCAPES_DATASET"] = root  # the script locates the data through this variable
        createTrainIdLabelImgs.main()
        print(f"\nwrote {len(polygons)} *_labelTrainIds.png under {gt_fine} ({time.perf_counter() - t0:.1f} s)")

    if not args.skip_panoptic:
        from cityscapesscripts.preparation.createPanopticImgs import convert2panoptic

        t0 = time.perf_counter()
        convert2panoptic(cityscapesPath=gt_fine, outputFolder=gt_fine, useTrainId=False, setNames=args.splits)
        for split in args.splits:
            print(f"wrote {os.path.join(gt_fine, f'cityscapes_panoptic_{split}.json')} and "
                  f"{os.path.join(gt_fine, f'cityscapes_panoptic_{split}')}/")
        print(f"({time.perf_counter() - t0:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
