#!/usr/bin/env python
"""ECO-M2F step B: per-image PQ at every encoder exit over the training split.

    scripts/derive_dataset.sh CONFIG WEIGHTS OUTPUT_DIR [--num-gpus N] [--num-machines M --machine-rank R]
                              [--max-images N] [KEY VALUE ...]

Resumable: re-running the same command skips the images already recorded in OUTPUT_DIR.
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from eco_m2f.config import setup_cfg  # noqa: E402
from eco_m2f.eco.derive import derive_dataset  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config_file")
    p.add_argument("weights", help="step-A checkpoint (MODEL.WEIGHTS)")
    p.add_argument("output_dir")
    p.add_argument("--num-gpus", type=int, default=1)
    p.add_argument("--num-machines", type=int, default=1)
    p.add_argument("--machine-rank", type=int, default=0)
    p.add_argument("--max-images", type=int, default=0, help="only the first N training images (0 = all)")
    p.add_argument("opts", nargs="*", help="KEY VALUE config overrides")
    args = p.parse_intermixed_args(argv)  # flags may come before or after the KEY VALUE pairs
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s: %(message)s")
    if not Path(args.weights).is_file():
        p.error(f"WEIGHTS file not found: {args.weights}")
    opts = ["MODEL.MASK_FORMER.TEST.PANOPTIC_ON", "True"] + list(args.opts)
    cfg = setup_cfg(args.config_file, opts)
    derive_dataset(cfg, args.weights, args.output_dir, args.num_gpus, args.num_machines, args.machine_rank,
                   args.max_images, config_file=args.config_file, opts=opts)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
