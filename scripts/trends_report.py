#!/usr/bin/env python
"""Tables of an ECO-M2F trends run (``scripts/synthetic_experiments.sh trends OUT``).

    python scripts/trends_report.py OUT [--trend-beta 0.002]

Writes OUT/trends_report.md (Table 5 at fixed exits for the baseline, USD and WSD; the step-B
best-exit histogram and the mean best exit per complexity bucket; the beta sweep beside the
fixed exits; K_user; the gate losses; wall time beside encoder GFLOPs), trends_report.json and
trends_report.png (PQ per exit, best exit by complexity), and prints the Markdown. Parts whose
files are missing are left out.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from eco_m2f.eco.trends_report import write_report  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out_dir", help="the trends stage's output directory")
    p.add_argument("--trend-beta", type=float, default=None,
                   help="beta of the K_user and gate-loss sweeps (default: read from their rows)")
    args = p.parse_args(argv)
    written = write_report(args.out_dir, args.trend_beta)
    print(written["md"].read_text())
    print("wrote " + ", ".join(str(v) for v in written.values()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
