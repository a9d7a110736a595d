#!/usr/bin/env python
"""Evaluate a checkpoint at fixed encoder exits (one process, model loaded once).

    python scripts/eval_exits.py --config-file CONFIG --weights W [--exits "2 3 4 5 6"] [--random-init]
                                 [--json OUT.json] [KEY VALUE ...]

--random-init evaluates the untrained model (no weights), the floor every trained number is
compared with. Exit 0 means full depth.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from eco_m2f.config import setup_cfg  # noqa: E402
from eco_m2f.eco.fixed_exits import evaluate_exits, format_exit_table  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config-file", required=True)
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--weights")
    g.add_argument("--random-init", action="store_true")
    p.add_argument("--exits", default="0", help='exits, e.g. "2 3 4 5 6" or "2,3,4" (0 = full depth)')
    p.add_argument("--title", default="")
    p.add_argument("--json", default="")
    p.add_argument("opts", nargs="*", help="KEY VALUE config overrides")
    args = p.parse_intermixed_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(levelname)s: %(message)s")
    if args.weights and not Path(args.weights).is_file():
        p.error(f"--weights file not found: {args.weights}")
    try:
        exits = [int(k) for k in args.exits.replace(",", " ").split()]
    except ValueError:
        p.error(f"--exits must be integers; got {args.exits!r}")
    cfg = setup_cfg(args.config_file, args.opts)
    rows = evaluate_exits(cfg, None if args.random_init else args.weights, [k or None for k in exits])
    title = args.title or f"{args.config_file} ({'random init' if args.random_init else args.weights})"
    print(format_exit_table(rows, title))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
