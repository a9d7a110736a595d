#!/usr/bin/env python
"""Best exits of a step-B derived dataset against each image's complexity.

    python scripts/exit_complexity.py --derived DERIVED_DIR --complexity COMPLEXITY_JSON
        [--field objects] [--buckets 4] [--quality pq] [--json OUT]

COMPLEXITY_JSON is e.g. the synthetic dataset's ``complexity_train.json`` (the split step B ran
on): per image, ``objects``, ``drawn``, ``occluded_fraction``, ``small_objects``,
``boundary_fraction``. Prints one row per complexity bucket: images, mean best exit, the
best-exit histogram and the mean quality at each exit, and the rank correlation of complexity
and best exit.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from eco_m2f.eco.complexity import best_exit_by_complexity, format_complexity_table, load_complexity  # noqa: E402
from eco_m2f.eco.records import QUALITY_KEYS, load_records  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--derived", required=True, help="step-B output directory (scripts/derive_dataset.sh)")
    p.add_argument("--complexity", required=True, help="per-image complexity JSON")
    p.add_argument("--field", action="append", help="complexity field (repeatable; default: objects)")
    p.add_argument("--buckets", type=int, default=4)
    p.add_argument("--quality", choices=QUALITY_KEYS, default="pq", help="the per-exit quality whose argmax is the best exit")
    p.add_argument("--json", help="write the tables as JSON here")
    args = p.parse_args(argv)
    records = load_records(args.derived)
    complexity = load_complexity(args.complexity)
    results = []
    for field in args.field or ["objects"]:
        result = best_exit_by_complexity(records, complexity, field, args.buckets, args.quality)
        print(format_complexity_table(result) + "\n")
        results.append(result)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
