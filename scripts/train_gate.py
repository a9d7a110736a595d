#!/usr/bin/env python
"""ECO-M2F step C: train the gate on a step-B derived dataset for one beta (and K_USER).

    python scripts/train_gate.py --config-file CONFIG --derived DERIVED_DIR --beta BETA [--k-user K] [KEY VALUE ...]

Writes gate.pth, metrics.json, model_gated.pth and config.yaml (evaluates the gated model) to
--output-dir (default DERIVED_DIR/gate_beta{BETA}_k{K}, plus _{LOSS} for a MODEL.ECO.GATE.LOSS other than hard-CE).
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from eco_m2f.eco.step_c import format_step_c_report, run_step_c  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config-file", required=True, help="the step-B config (model + dataset)")
    parser.add_argument("--derived", required=True, help="step-B output directory (meta.json + records/)")
    parser.add_argument("--beta", required=True, type=float, help="trade-off beta of u(k) = q_k - beta k")
    parser.add_argument("--k-user", type=int, default=None, help="largest allowed exit (default MODEL.ECO.GATE.K_USER)")
    parser.add_argument("--output-dir", default=None, help="default DERIVED/gate_beta{BETA}_k{K}[_{LOSS}]")
    parser.add_argument("--device", default="cpu", help="device for the gate training (features are cached)")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="KEY VALUE config overrides")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    out = run_step_c(args.config_file, args.derived, args.beta, k_user=args.k_user, opts=args.opts,
                     output_dir=args.output_dir, device=args.device)
    print(format_step_c_report(out), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
