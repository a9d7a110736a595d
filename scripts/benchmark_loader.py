#!/usr/bin/env python
"""Time the training loader from the training loop's side: how long each batch keeps the main
process waiting, when the workers had a whole training step to get ahead.

    python scripts/benchmark_loader.py --config-file CONFIG [--batches 12] [--step-seconds 1.0]
        [--samples-per-message 1 0] [KEY VALUE ...]

For each ``--samples-per-message`` value (0: a whole batch, the loader's default; 1: one
sample per message, the usual way of grouping batches by aspect ratio after the loader) the
same loader is built (``DATALOADER.*`` from the config), its first batch taken, and then for
``--batches`` batches the main process sleeps ``--step-seconds`` (a training step that leaves
the CPU to the workers) and times ``next()``. Prints the median and quartiles per setting and
checks that every setting yields the same images in the same batches.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from eco_m2f.config import setup_cfg  # noqa: E402
from eco_m2f.data import build_detection_train_loader  # noqa: E402


def time_loader(cfg, samples_per_message: int, batches: int, step_seconds: float) -> tuple[list[float], list[list]]:
    """Seconds in ``next()`` per batch after a simulated step, and the batches' image ids."""
    loader = build_detection_train_loader(cfg, samples_per_message=samples_per_message or None)
    it = iter(loader)
    ids = [[d["image_id"] for d in next(it)]]
    waits = []
    for _ in range(batches):
        time.sleep(step_seconds)
        start = time.perf_counter()
        batch = next(it)
        waits.append(time.perf_counter() - start)
        ids.append([d["image_id"] for d in batch])
    return waits, ids


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config-file", required=True)
    p.add_argument("--batches", type=int, default=12)
    p.add_argument("--step-seconds", type=float, default=1.0)
    p.add_argument("--samples-per-message", type=int, nargs="+", default=[1, 0], help="0: a whole batch (the default)")
    p.add_argument("opts", nargs=argparse.REMAINDER, help="KEY VALUE config overrides")
    args = p.parse_args(argv)
    if args.batches < 1 or args.step_seconds < 0 or any(n < 0 for n in args.samples_per_message):
        p.error("--batches must be >= 1, --step-seconds >= 0 and --samples-per-message >= 0")
    cfg = setup_cfg(args.config_file, list(args.opts))
    print(f"{args.config_file}: batch {cfg.SOLVER.IMS_PER_BATCH}, {cfg.DATALOADER.NUM_WORKERS} workers, aspect-ratio grouping "
          f"{cfg.DATALOADER.ASPECT_RATIO_GROUPING}; {args.batches} batches, each after {args.step_seconds} s of simulated step")
    reference = None
    for n in args.samples_per_message:
        waits, ids = time_loader(cfg, n, args.batches, args.step_seconds)
        q = statistics.quantiles([1e3 * w for w in waits], n=4) if len(waits) > 1 else [1e3 * waits[0]] * 3
        label = "a batch" if n == 0 else f"{n} sample{'s' if n > 1 else ''}"
        print(f"  {label + ' per message':<24} main process waits {q[1]:7.1f} ms per batch (quartiles {q[0]:.1f} - {q[2]:.1f})")
        if reference is None:
            reference = ids
        elif ids != reference:
            print("  the batches DIFFER from the first setting's")
            return 1
    print("  every setting gave the same images in the same batches")
    return 0


if __name__ == "__main__":
    sys.exit(main())
