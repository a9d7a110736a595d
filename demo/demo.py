#!/usr/bin/env python
"""Run a model on your own images and see what it did (Detectron2's demo flags).

    python demo/demo.py --config-file CONFIG --input IMG [IMG ... | DIR | 'glob/*.jpg'] --output OUT_DIR
                        [--confidence-threshold 0.5] [--batch-size 4] [--no-gflops] [--show-tokens]
                        [--opts KEY VALUE ...]

Writes OUT_DIR/<name>.png (the panoptic, instance or semantic result over the image, with a
legend; under it the image's cost: for ECO-M2F the encoder exit and GFLOPs, for a
token-reduction Segmenter its live tokens and GFLOPs) and OUT_DIR/<name>.json (the segments:
class, id, score where there is one, area, box; the cost record). --show-tokens adds, for a
token-reduction Segmenter (PAUMER, DoViT, ...), a token map per map beside the result: which
tokens were paused / stopped / shared / pruned after which layer, with a legend. Inputs that
cannot be read are reported and skipped; the exit status is then 1.
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from eco_m2f.config import setup_cfg  # noqa: E402
from eco_m2f.visualization.demo import run_demo  # noqa: E402
from eco_m2f.visualization.inference import build_inference_model  # noqa: E402


def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config-file", required=True, metavar="FILE", help="path to a config file")
    p.add_argument("--input", nargs="+", required=True,
                   help="image files, directories of images, or quoted globs such as 'photos/*.jpg'")
    p.add_argument("--output", required=True, help="folder for the PNG and JSON of every input")
    p.add_argument("--confidence-threshold", type=float, default=0.5,
                   help="instances scoring less are not drawn or listed (panoptic segments have no score)")
    p.add_argument("--batch-size", type=int, default=4,
                   help="images per forward pass; a batch is padded to its largest image, as in training, "
                        "so 1 reproduces the evaluation's per-image result exactly")
    p.add_argument("--no-gflops", action="store_true",
                   help="do not count the encoder GFLOPs of each image's exit (one FLOP count per input size)")
    p.add_argument("--show-tokens", action="store_true",
                   help="draw beside the result what became of each patch token (token-reduction models; "
                        "a warning and the plain result for others)")
    p.add_argument("--opts", default=[], nargs=argparse.REMAINDER, help="KEY VALUE config overrides")
    return p


def main(argv=None) -> int:
    args = get_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s: %(message)s")
    cfg = setup_cfg(args.config_file, args.opts)
    model = build_inference_model(cfg)
    report = run_demo(cfg, model, args.input, args.output, confidence_threshold=args.confidence_threshold,
                      batch_size=args.batch_size, count_gflops=not args.no_gflops, show_tokens=args.show_tokens)
    print(f"Wrote {len(report.written)} results (PNG + JSON) to {args.output}")
    if report.failures:
        print(f"{len(report.failures)} inputs failed and were skipped:", file=sys.stderr)
        for f in report.failures:
            print(f"  {f.path}: {f.reason}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
