#!/usr/bin/env python
"""COCO-Stuff-10k for Detectron2 (MaskFormer's layout): coco/coco_stuff_10k/{images,annotations}_detectron2/{train,test}.

Input: cocostuff-10k-v1.1.zip unzipped into coco/coco_stuff_10k (imageLists/{train,test}.txt, images/*.jpg,
annotations/*.mat). Images are hard-linked (copied where links fail); labels become PNGs of the 171 contiguous
ids (0..170), 255 = unlabeled.

    python datasets/prepare_coco_stuff_10k_sem_seg.py [--root $DETECTRON2_DATASETS/coco/coco_stuff_10k] [--workers N]
"""
from __future__ import annotations

import os
import sys

from eco_m2f.data.datasets.coco_stuff import ROOT, prepare_coco_stuff_10k
from eco_m2f.data.datasets.common import prepare_cli


def main(argv: list[str] | None = None) -> int:
    rc, root, counts, seconds = prepare_cli(argv, __doc__, ROOT, prepare_coco_stuff_10k)
    for split, n in (counts or {}).items():
        print(f"{split}: {n} images -> {os.path.join(root, 'images_detectron2', split)}, "
              f"{os.path.join(root, 'annotations_detectron2', split)}")
    if rc == 0:
        print(f"done in {seconds:.1f} s")
    return rc


if __name__ == "__main__":
    sys.exit(main())
