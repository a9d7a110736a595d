#!/usr/bin/env python
"""Trade-off sweep of a token-reduction Segmenter: the dense baseline and named settings in one process.

    python scripts/sweep_token_reduction.py --config-file CONFIG --weights W [--dense-weights D]
        --setting NAME KEY VALUE [KEY VALUE ...] [--setting ...] [--output-dir DIR]
        [--dtype bf16] [--warmup 10] [--iters 30] [-- KEY VALUE ...]
    python scripts/sweep_token_reduction.py --show DIR     # the table of a finished sweep

For the dense baseline (CONFIG with MODEL.TOKEN_REDUCTION.NAME "", weights --dense-weights or
--weights) and every --setting (CONFIG with its overrides, weights --weights): mIoU and the mean
GFLOPs / live tokens of the per-image cost records on DATASETS.TEST[0], then images/s of
model.network on the first 8 validation images (batch 8 and batch 1), the speed-up over dense and
the share of the FLOP reduction that became time. Prints the table and writes sweep.csv,
sweep.json and sweep.png (mIoU vs images/s and vs GFLOPs) to --output-dir (default
OUTPUT_DIR/sweep). A rerun reuses the finished evaluations (evaluations.jsonl) and times again.
Overrides for every row go behind ``--`` (or before the first --setting): a --setting takes every
word up to the next option.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from eco_m2f.evaluation.reduction_sweep import (  # noqa: E402
    format_sweep_markdown, format_sweep_table, load_sweep, parse_settings, run_sweep, split_shared_overrides,
)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--show", default="", metavar="DIR", help="print the table of the sweep in DIR and exit")
    p.add_argument("--markdown", action="store_true", help="with --show: the table in Markdown")
    p.add_argument("--config-file")
    p.add_argument("--weights", help="the token-reduction model's checkpoint")
    p.add_argument("--dense-weights", default="", help="the dense baseline's checkpoint (default: --weights)")
    p.add_argument("--setting", nargs="+", action="append", default=[], metavar="NAME KEY VALUE",
                   help="a named setting: config overrides (repeatable)")
    p.add_argument("--output-dir", default="")
    p.add_argument("--dtype", default="bf16", choices=["fp32", "bf16", "fp16"], help="autocast of the timed passes")
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--iters", type=int, default=30)
    p.add_argument("--device", default=None)
    p.add_argument("--no-graphed-dense", action="store_true",
                   help="leave out the row of the dense model replayed as one CUDA graph (CUDA only; on by default)")
    p.add_argument("--no-graphed-settings", action="store_true",
                   help="leave out the rows NAME-graphed of the settings that replay as one CUDA graph (CUDA only; on by default)")
    p.add_argument("opts", nargs="*", help="KEY VALUE config overrides for every row (behind --)")
    argv, shared = split_shared_overrides(sys.argv[1:] if argv is None else argv)
    args = p.parse_intermixed_args(argv)
    args.opts = list(args.opts) + shared
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(levelname)s: %(message)s")
    if args.show:
        rows = load_sweep(args.show)
        print(format_sweep_markdown(rows) if args.markdown else format_sweep_table(rows, args.dtype))
        return 0
    if not args.config_file or not args.weights:
        p.error("--config-file and --weights are needed (or --show DIR)")
    for path in filter(None, (args.weights, args.dense_weights)):
        if not Path(path).is_file():
            p.error(f"checkpoint not found: {path}")
    try:
        settings = parse_settings(args.setting)
    except ValueError as exc:
        p.error(str(exc))
    opts = list(args.opts) + ["MODEL.WEIGHTS", args.weights]
    if args.output_dir:
        out = args.output_dir
    else:
        from eco_m2f.config import setup_cfg

        out = os.path.join(setup_cfg(args.config_file, list(args.opts)).OUTPUT_DIR, "sweep")
    rows = run_sweep(args.config_file, settings, out, opts, args.dense_weights, args.dtype, args.warmup, args.iters, args.device,
                     graph_dense=False if args.no_graphed_dense else None,
                     graph_settings=False if args.no_graphed_settings else None)
    print(format_sweep_table(rows, args.dtype))
    print(f"wrote {out}/sweep.csv, sweep.json, sweep.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
