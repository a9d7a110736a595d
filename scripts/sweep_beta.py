#!/usr/bin/env python
"""ECO-M2F trade-off sweep (paper Fig. 5): fixed-exit evaluations, then step C + evaluation per beta.

    python scripts/sweep_beta.py --config-file CONFIG --derived DERIVED_DIR --betas "B1 B2 ..." [KEY VALUE ...]

Writes sweep.csv, sweep.png and sweep.json to --output-dir (default DERIVED_DIR/sweep). Each
evaluation runs `train_net.py --eval-only`'s code and reads OUTPUT_DIR/inference/<dataset>/results.json:
in this process (one device), or as a `train_net.py` subprocess with --eval-args (e.g. several
GPUs) or --subprocess.
"""
from __future__ import annotations

import argparse
import logging
import shlex
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from eco_m2f.eco.sweep import results_evaluate_fn, run_sweep, subprocess_evaluate_fn  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config-file", required=True, help="the step-B config (model + dataset)")
    parser.add_argument("--derived", required=True, help="step-B output directory (meta.json + records/)")
    parser.add_argument("--betas", required=True, help='space- or comma-separated betas, e.g. "0.0005 0.003"')
    parser.add_argument("--k-user", type=int, default=None, help="largest allowed exit (default MODEL.ECO.GATE.K_USER)")
    parser.add_argument("--output-dir", default=None, help="default DERIVED/sweep")
    parser.add_argument("--no-fixed", action="store_true", help="skip the fixed-exit evaluations")
    parser.add_argument("--eval-args", default="", help='extra train_net.py arguments, e.g. "--num-gpus 2" '
                        "(each evaluation then runs as a subprocess)")
    parser.add_argument("--subprocess", action="store_true", help="evaluate in train_net.py subprocesses "
                        "(default: in this process, unless --eval-args are given)")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="KEY VALUE config overrides")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        betas = [float(b) for b in args.betas.replace(",", " ").split()]
    except ValueError:
        parser.error(f"--betas must be numbers; got {args.betas!r}")
    if args.subprocess or args.eval_args:
        evaluate = subprocess_evaluate_fn(args.config_file, REPO_ROOT, extra_args=shlex.split(args.eval_args))
    else:
        from eco_m2f.engine import evaluate_in_process

        evaluate = results_evaluate_fn(args.config_file, lambda overrides: evaluate_in_process(args.config_file, overrides))
    res = run_sweep(args.config_file, args.derived, betas, evaluate, opts=args.opts, k_user=args.k_user,
                    output_dir=args.output_dir, fixed_exits=not args.no_fixed)
    print(f"{'kind':<6} {'exit/beta':>10} {'PQ':>7} {'PQ_th':>7} {'PQ_st':>7} {'mean exit':>9} {'enc GFLOPs':>11} {'total GFLOPs':>13}")

    def num(value, spec: str) -> str:
        return f"{'-':>{spec.split('.')[0]}}" if value is None else format(value, spec)

    for r in res["rows"]:
        print(f"{r['kind']:<6} {r['exit_or_beta']:>10g} {r['PQ']:7.2f} {num(r['PQ_th'], '7.2f')} {num(r['PQ_st'], '7.2f')} "
              f"{num(r['mean_exit'], '9.2f')} {r['encoder_gflops']:11.2f} {r['total_gflops']:13.2f}")
    for key, path in res["paths"].items():
        print(f"wrote {key}: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
