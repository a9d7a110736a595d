#!/usr/bin/env python
"""PASCAL-Context 59 for Detectron2: VOCdevkit/VOC2010/annotations_detectron2/pc59_{train,val}/*.png.

Input under the VOC2010 folder: JPEGImages/ and either PASCAL-Context's trainval/*.mat (459 classes, split by
ImageSets/Main/{train,val}.txt) or mmseg's SegmentationClassContext/*.png (split by
ImageSets/SegmentationContext/{train,val}.txt). Output labels: 0..58 in mmseg's class order, 255 = ignore.

    python datasets/prepare_pascal_context_59.py [--root $DETECTRON2_DATASETS/VOCdevkit/VOC2010] [--workers N]
"""
from __future__ import annotations

import os
import sys

from eco_m2f.data.datasets.common import prepare_cli
from eco_m2f.data.datasets.pascal_context import ROOT, prepare_pascal_context_59


def main(argv: list[str] | None = None) -> int:
    rc, root, counts, seconds = prepare_cli(argv, __doc__, ROOT, prepare_pascal_context_59)
    counts = dict(counts or {})
    source = counts.pop("source", None)
    for split, n in counts.items():
        print(f"{split}: {n} label PNGs from {source} -> {os.path.join(root, 'annotations_detectron2', f'pc59_{split}')}")
    if rc == 0:
        print(f"done in {seconds:.1f} s")
    return rc


if __name__ == "__main__":
    sys.exit(main())
