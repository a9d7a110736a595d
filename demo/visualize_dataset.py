#!/usr/bin/env python
"""One picture of a model on a dataset: input | ground truth | prediction, one row per image.

    python demo/visualize_dataset.py --config-file CONFIG --weights W [--dataset NAME] [--num 4]
                                     [--max-width W] --output results/figure.{png,jpg} [--opts KEY VALUE ...]

The images are the first --num of --dataset (default DATASETS.TEST[0]) as the test loader
gives them; images smaller than --min-size pixels are enlarged by an integer factor; a figure
wider than --max-width is scaled down to it (Lanczos), for a README.
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from eco_m2f.config import setup_cfg  # noqa: E402
from eco_m2f.visualization.dataset_figure import render_dataset_figure  # noqa: E402
from eco_m2f.visualization.inference import build_inference_model  # noqa: E402
from eco_m2f.visualization.panels import downscaled, save_picture  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config-file", required=True, metavar="FILE")
    p.add_argument("--weights", default=None, help="checkpoint (default: MODEL.WEIGHTS of the config)")
    p.add_argument("--dataset", default=None, help="registered dataset (default: DATASETS.TEST[0])")
    p.add_argument("--num", type=int, default=4, help="number of images (rows)")
    p.add_argument("--min-size", type=int, default=256, help="enlarge smaller images to at least this size")
    p.add_argument("--confidence-threshold", type=float, default=0.5, help="instances scoring less are not drawn")
    p.add_argument("--max-width", type=int, default=0, help="scale a wider figure down to this width (0: never)")
    p.add_argument("--output", required=True, help="picture to write: PNG, or JPEG for a .jpg name")
    p.add_argument("--opts", default=[], nargs=argparse.REMAINDER, help="KEY VALUE config overrides")
    args = p.parse_args(argv)
    if args.max_width < 0:
        p.error(f"--max-width must be 0 (never) or a width in pixels, got {args.max_width}")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s: %(message)s")
    if args.weights and not Path(args.weights).is_file():
        p.error(f"--weights file not found: {args.weights}")
    cfg = setup_cfg(args.config_file, args.opts)
    if not cfg.DATASETS.TEST and not args.dataset:
        p.error("the config has no DATASETS.TEST; name a dataset with --dataset")
    dataset = args.dataset or cfg.DATASETS.TEST[0]
    model = build_inference_model(cfg, args.weights)
    figure = render_dataset_figure(cfg, model, dataset, args.num, min_size=args.min_size,
                                   score_threshold=args.confidence_threshold)
    if args.max_width and figure.shape[1] > args.max_width:
        figure = downscaled(figure, args.max_width)
    save_picture(args.output, figure)
    print(f"Wrote {args.output} ({figure.shape[1]}x{figure.shape[0]}): {args.num} images of {dataset}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
