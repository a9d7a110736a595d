#!/usr/bin/env python
"""ADE20K panoptic GT: ADEChallengeData2016/ade20k_panoptic_{train,val}.json + PNGs, and
ade20k_instance_{train,val}.json (COCO instances with RLE masks, for mask AP).

Needs ADEChallengeData2016/{images,annotations}/ (SceneParsing) and annotations_instance/
(http://sceneparsing.csail.mit.edu/data/ChallengeData2017/annotations_instance.tar).
Run datasets/prepare_ade20k_sem_seg.py as well: the panoptic datasets use its semantic PNGs.

    python datasets/prepare_ade20k_panoptic.py [--root $DETECTRON2_DATASETS/ADEChallengeData2016]
"""
from __future__ import annotations

import argparse
import os
import sys

from eco_m2f.data.catalog import datasets_root
from eco_m2f.data.datasets.ade20k import ade20k_panoptic_from_annotations
from eco_m2f.data.datasets.common import dump_json
from eco_m2f.data.io import id2rgb, write_png


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", default=None, help="default: $DETECTRON2_DATASETS/ADEChallengeData2016")
    args = parser.parse_args(argv)
    root = args.root or os.path.join(datasets_root(), "ADEChallengeData2016")
    for name, split in (("train", "training"), ("val", "validation")):
        dirs = [os.path.join(root, "images", split), os.path.join(root, "annotations", split),
                os.path.join(root, "annotations_instance", split)]
        for d in dirs:
            if not os.path.isdir(d):
                print(f"error: expected folder {os.path.abspath(d)} (see datasets/README.md, ADE20K)", file=sys.stderr)
                return 1
        pan, id_maps, inst = ade20k_panoptic_from_annotations(*dirs)
        out_dir = os.path.join(root, f"ade20k_panoptic_{name}")
        for png_name, ids in id_maps.items():
            write_png(os.path.join(out_dir, png_name), id2rgb(ids))
        dump_json(pan, os.path.join(root, f"ade20k_panoptic_{name}.json"))
        dump_json(inst, os.path.join(root, f"ade20k_instance_{name}.json"))
        print(f"{name}: {len(id_maps)} panoptic PNGs in {out_dir}, ade20k_panoptic_{name}.json, ade20k_instance_{name}.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
