#!/usr/bin/env python
"""Where a training iteration's time goes, for any config that ``train_net.py`` trains.

    python scripts/profile_training.py --config-file configs/synthetic/maskformer2_R50.yaml \
        --iters 20 --json $OUT/train_profile.json DATALOADER.NUM_WORKERS 8
    python scripts/profile_training.py --config-file CFG --device cpu --iters 2 --warmup 1   # a quick check

The step is the trainer's: the model's losses summed, the SOLVER.AMP precision (fp16 with a
gradient scaler, or bf16), the config's gradient clipping and optimizer. Three measurements on
the same loader and model:
1. the plain step, as training runs it (no synchronisation inside), median seconds per iteration
   and the share of it spent waiting for the loader;
2. the same batches again with the device synchronised around each direct child of the model
   called as a module (e.g. backbone, sem_seg_head, criterion; a child's method called directly
   is booked under "forward (outside the children)"), the backward pass and the optimizer step:
   mean seconds per phase;
3. torch.profiler over the same batches, plain steps: device-kernel time against wall time, the
   top host operators by host time and the top device kernels and copies by device time.
Models that draw at random per step (ECO step A's depths) draw anew in each measurement.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Dict, Iterator, List

import torch
import torch.nn as nn
from torch.autograd import DeviceType

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from eco_m2f.architectures import build_model  # noqa: E402
from eco_m2f.config import setup_cfg  # noqa: E402
from eco_m2f.data import build_detection_train_loader  # noqa: E402
from eco_m2f.engine.devices import select_precision  # noqa: E402
from eco_m2f.solver import build_gradient_clipper, build_optimizer  # noqa: E402
from lightning.fabric.utilities.apply_func import move_data_to_device  # noqa: E402


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class _Step:
    """One training iteration: losses, (scaled) backward, clipping, optimizer step."""

    def __init__(self, cfg, model: nn.Module, device: torch.device) -> None:
        self.model, self.device = model, device
        self.precision = select_precision(cfg, device.type)
        self.dtype = {"16-mixed": torch.float16, "bf16-mixed": torch.bfloat16}.get(self.precision)
        self.scaler = torch.amp.GradScaler(device.type) if self.dtype == torch.float16 else None
        self.optimizer = build_optimizer(cfg, model)
        self.clip = build_gradient_clipper(cfg)
        self.marks: Dict[str, float] = {}

    def _mark(self, name: str, start: float) -> float:
        _sync(self.device)
        now = time.perf_counter()
        self.marks[name] = self.marks.get(name, 0.0) + now - start
        return now

    def __call__(self, batch: Any, timed: bool = False) -> float:
        autocast = (torch.autocast(self.device.type, dtype=self.dtype) if self.dtype is not None
                    else contextlib.nullcontext())
        t = time.perf_counter()
        with autocast:
            losses = self.model(batch)
            loss = sum(losses.values())
        if timed:
            t = self._mark("forward (outside the children)", t)
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()
        if timed:
            t = self._mark("backward", t)
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        if self.clip is not None:
            self.clip([p for g in self.optimizer.param_groups for p in g["params"]])
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if timed:
            self._mark("clip + optimizer step", t)
        return float(loss.detach())


def _child_timers(model: nn.Module, step: _Step) -> List[Any]:
    """Forward hooks that synchronise around each direct child and book its time in step.marks;
    the child's time is taken off the 'forward (outside the children)' bucket by the caller."""
    handles = []
    for name, child in model.named_children():
        def pre(_m, _inp, name=name):
            _sync(step.device)
            step.marks.setdefault("_start", {})[name] = time.perf_counter()

        def post(_m, _inp, _out, name=name):
            _sync(step.device)
            step.marks[name] = step.marks.get(name, 0.0) + time.perf_counter() - step.marks["_start"][name]

        handles.append(child.register_forward_pre_hook(pre))
        handles.append(child.register_forward_hook(post))
    return handles


def _batches(loader: Any, device: torch.device) -> Iterator[Any]:
    """The loader's batches on the device, moved as the Lightning trainer moves them."""
    for batch in loader:
        yield move_data_to_device(batch, device)


def main(argv: List[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config-file", required=True)
    p.add_argument("--iters", type=int, default=20, help="iterations per measurement")
    p.add_argument("--warmup", type=int, default=10, help="iterations before the first measurement")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--top", type=int, default=20, help="operators listed per table")
    p.add_argument("--json", default="", help="write the figures here")
    p.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides KEY VALUE ...")
    args = p.parse_args(argv)
    if args.iters < 1 or args.warmup < 0:
        p.error(f"--iters must be >= 1 and --warmup >= 0 (got {args.iters}, {args.warmup})")
    device = torch.device(args.device)
    cfg = setup_cfg(args.config_file, args.opts)
    torch.backends.cudnn.benchmark = bool(cfg.CUDNN_BENCHMARK)
    torch.manual_seed(cfg.SEED if cfg.SEED >= 0 else 0)
    model = build_model(cfg).to(device).train()
    step = _Step(cfg, model, device)
    batches = _batches(build_detection_train_loader(cfg), device)
    print(f"{args.config_file}: batch {cfg.SOLVER.IMS_PER_BATCH}, precision {step.precision}, {device}, "
          f"{cfg.DATALOADER.NUM_WORKERS} loader workers")

    for _ in range(args.warmup):
        step(next(batches))
    _sync(device)

    # 1. the plain step
    times, waits, replay = [], [], []
    end = time.perf_counter()
    for _ in range(args.iters):
        batch = next(batches)
        replay.append(batch)
        got = time.perf_counter()
        step(batch)
        _sync(device)
        now = time.perf_counter()
        waits.append(got - end)
        times.append(now - end)
        end = now
    plain = {"s_per_iter": statistics.median(times), "loader_wait_s": statistics.median(waits)}
    print(f"plain step: {plain['s_per_iter'] * 1e3:.1f} ms/iter median, of which waiting for the loader "
          f"{plain['loader_wait_s'] * 1e3:.1f} ms")

    # 2. synchronised phases
    handles = _child_timers(model, step)
    step.marks.clear()
    t_total = 0.0
    for batch in replay:
        t = time.perf_counter()
        step(batch, timed=True)
        t_total += time.perf_counter() - t
    for h in handles:
        h.remove()
    step.marks.pop("_start", None)
    children = [n for n, _ in model.named_children() if n in step.marks]
    step.marks["forward (outside the children)"] -= sum(step.marks[n] for n in children)
    phases = {k: v / args.iters for k, v in step.marks.items()}
    print(f"synchronised phases ({t_total / args.iters * 1e3:.1f} ms/iter with the syncs):")
    for name, sec in sorted(phases.items(), key=lambda kv: -kv[1]):
        print(f"  {name:<34} {sec * 1e3:8.1f} ms")

    # 3. profiler
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        t = time.perf_counter()
        for batch in replay:
            step(batch)
        _sync(device)
        wall = (time.perf_counter() - t) / args.iters
    events = prof.key_averages()
    dev_attr = "self_device_time_total" if hasattr(events[0], "self_device_time_total") else "self_cuda_time_total"
    # kernels and copies are events of their own on the device; the host operators that launched
    # them repeat their time as "self device time", so only the device's own events are counted
    on_device = [e for e in events if e.device_type != DeviceType.CPU]
    device_us = sum(getattr(e, dev_attr) for e in on_device) / args.iters
    print(f"profiled: {wall * 1e3:.1f} ms/iter wall, device kernels {device_us / 1e3:.1f} ms/iter "
          f"({device_us / 1e6 / wall:.0%} of wall)")
    tables: Dict[str, List[Dict[str, Any]]] = {}
    for label, key, pool in (("host", "self_cpu_time_total", events), ("device", dev_attr, on_device)):
        rows = sorted(pool, key=lambda e: -getattr(e, key))[: args.top]
        tables[label] = [{"op": e.key, "calls_per_iter": e.count / args.iters,
                          "ms_per_iter": getattr(e, key) / 1e3 / args.iters} for e in rows]
        print(f"top {'host operators' if label == 'host' else 'device kernels'} by {label} time (ms/iter, calls/iter):")
        for r in tables[label]:
            print(f"  {r['ms_per_iter']:8.2f}  {r['calls_per_iter']:7.1f}  {r['op'][:90]}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({
            "config_file": args.config_file, "opts": args.opts, "device": str(device),
            "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "batch": cfg.SOLVER.IMS_PER_BATCH, "precision": step.precision, "plain": plain,
            "phases_s": phases, "profiled_wall_s": wall, "device_kernel_s": device_us / 1e6, "top": tables,
        }, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
