"""Command line of ``train_net.py`` (Detectron2's flags) and the entry point ``main(args)``.

Process launching itself is Lightning's: one process per device, started by the Trainer (or by
``torchrun`` / SLURM when those launched us). ``--num-machines``, ``--machine-rank`` and
``--dist-url`` are turned into the environment variables Lightning reads (``NODE_RANK``,
``MASTER_ADDR``, ``MASTER_PORT``); values already set by a launcher win.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import socket
import sys
from typing import Any, Callable, Dict, Iterable, Optional, Sequence
from urllib.parse import urlparse

from ..utils.file_io import atomic_write_text

__all__ = [
    "default_argument_parser",
    "setup_distributed_env",
    "default_setup",
    "setup_logging",
    "launch",
    "main",
    "evaluate_in_process",
]

logger = logging.getLogger("eco_m2f.engine")


def _default_port() -> int:
    """A per-user port (as Detectron2 does) so that two users' jobs on one host do not collide."""
    uid = os.getuid() if hasattr(os, "getuid") else 0
    return 2**15 + 2**14 + (uid * 7919) % 2**14


def default_argument_parser(epilog: Optional[str] = None) -> argparse.ArgumentParser:
    """Detectron2's ``train_net.py`` flags: --config-file, --resume, --eval-only, --num-gpus,
    --num-machines, --machine-rank, --dist-url and trailing ``KEY VALUE`` config overrides."""
    parser = argparse.ArgumentParser(
        epilog=epilog or (
            "Examples:\n"
            "  python train_net.py --config-file configs/synthetic/maskformer2_tiny_cpu.yaml\n"
            "  python train_net.py --config-file cfg.yaml --num-gpus 8 SOLVER.IMS_PER_BATCH 16\n"
            "  python train_net.py --config-file cfg.yaml --eval-only MODEL.WEIGHTS model_final.pth\n"
            "  python train_net.py --config-file cfg.yaml --resume   # continue OUTPUT_DIR/last.ckpt\n"
            "Two machines: run on each with --num-machines 2 --machine-rank R --dist-url tcp://HOST:PORT"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config-file", default="", metavar="FILE", help="path to the config YAML")
    parser.add_argument(
        "--resume", action="store_true",
        help="continue from OUTPUT_DIR/last.ckpt (optimizer, scheduler, iteration); without it, "
             "start at iteration 0 from MODEL.WEIGHTS",
    )
    parser.add_argument("--eval-only", action="store_true", help="evaluate MODEL.WEIGHTS and exit")
    parser.add_argument("--num-gpus", type=int, default=1, help="processes (devices) per machine")
    parser.add_argument("--num-machines", type=int, default=1, help="total number of machines")
    parser.add_argument("--machine-rank", type=int, default=0, help="the rank of this machine (0-based)")
    parser.add_argument(
        "--dist-url", default=f"tcp://127.0.0.1:{_default_port()}",
        help="initialization URL of the process group (tcp://HOST:PORT on machine 0, or 'auto' for a free "
             "local port on one machine)",
    )
    parser.add_argument(
        "opts", default=None, nargs=argparse.REMAINDER,
        help="config overrides as KEY VALUE pairs, e.g. SOLVER.BASE_LR 0.0002 OUTPUT_DIR out/",
    )
    return parser


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def setup_distributed_env(num_machines: int, machine_rank: int, dist_url: str) -> None:
    """Translate Detectron2's flags into the environment variables Lightning's launcher reads.

    Nothing is overwritten: under torchrun or SLURM the launcher's variables are authoritative.
    """
    if num_machines < 1:
        raise ValueError(f"--num-machines must be >= 1, got {num_machines}")
    if not 0 <= machine_rank < num_machines:
        raise ValueError(f"--machine-rank {machine_rank} is outside [0, --num-machines={num_machines})")
    if dist_url == "auto":
        if num_machines > 1:
            raise ValueError("--dist-url auto only works on one machine; give tcp://HOST:PORT of machine 0")
        host, port = "127.0.0.1", _free_port()
    else:
        parsed = urlparse(dist_url)
        if parsed.scheme not in ("tcp", "env") or (parsed.scheme == "tcp" and (not parsed.hostname or not parsed.port)):
            raise ValueError(f"--dist-url must look like tcp://HOST:PORT, 'env://' or 'auto'; got '{dist_url}'")
        if parsed.scheme == "env":
            return
        host, port = parsed.hostname, parsed.port
    os.environ.setdefault("MASTER_ADDR", str(host))
    os.environ.setdefault("MASTER_PORT", str(port))
    os.environ.setdefault("NODE_RANK", str(machine_rank))


def setup_logging(output_dir: Optional[str], rank: int = 0) -> logging.Logger:
    """Log ``eco_m2f`` messages to stdout (rank 0) and to OUTPUT_DIR/log.txt (log.txt.rank{R} elsewhere)."""
    root = logging.getLogger("eco_m2f")
    root.setLevel(logging.INFO)
    root.propagate = False
    fmt = logging.Formatter("[%(asctime)s %(name)s]: %(message)s", datefmt="%m/%d %H:%M:%S")
    for h in list(root.handlers):
        if getattr(h, "_eco_m2f", False):
            root.removeHandler(h)
            h.close()
    if rank == 0:
        sh = logging.StreamHandler(sys.stdout)
        sh.setFormatter(fmt)
        sh._eco_m2f = True  # type: ignore[attr-defined]
        root.addHandler(sh)
    if output_dir:
        os.makedirs(output_dir, exist_ok=True)
        name = "log.txt" if rank == 0 else f"log.txt.rank{rank}"
        fh = logging.FileHandler(os.path.join(output_dir, name))
        fh.setFormatter(fmt)
        fh._eco_m2f = True  # type: ignore[attr-defined]
        root.addHandler(fh)
    return root


def _env_rank(num_gpus_per_machine: int = 1) -> int:
    """Global rank from a launcher's environment, before any process group exists."""
    for key in ("RANK", "SLURM_PROCID"):
        if key in os.environ:
            return int(os.environ[key])
    if "LOCAL_RANK" in os.environ:  # Lightning's own subprocess launcher re-runs this script
        node = int(os.environ.get("NODE_RANK", os.environ.get("GROUP_RANK", 0)))
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", num_gpus_per_machine))
        return int(os.environ["LOCAL_RANK"]) + node * local_world
    return 0


def default_setup(cfg, args: argparse.Namespace) -> None:
    """Create OUTPUT_DIR, set up logging, write OUTPUT_DIR/config.yaml (rank 0), log the command line."""
    rank = _env_rank(getattr(args, "num_gpus", 1))
    output_dir = cfg.OUTPUT_DIR
    if output_dir:
        os.makedirs(output_dir, exist_ok=True)
    setup_logging(output_dir, rank)
    logger.info("Command line arguments: %s", json.dumps(vars(args), default=str))
    if rank == 0 and output_dir:
        path = atomic_write_text(os.path.join(output_dir, "config.yaml"), cfg.dump())
        logger.info("Full config saved to %s", path)


def launch(
    main_func: Callable[..., Any],
    num_gpus_per_machine: int,
    num_machines: int = 1,
    machine_rank: int = 0,
    dist_url: str = "auto",
    args: tuple = (),
) -> Any:
    """Run ``main_func(*args)`` with Detectron2's launch signature.

    The distributed flags only prepare the environment: Lightning (Trainer for training, Fabric
    for evaluation) starts one process per device inside ``main_func``. A process group that
    ``main_func`` created is destroyed once it returns (not after an error, where other ranks may
    still be inside a collective).
    """
    from ..utils import comm

    if num_gpus_per_machine < 1:
        raise ValueError(f"--num-gpus must be >= 1, got {num_gpus_per_machine}")
    if num_gpus_per_machine * num_machines > 1:
        setup_distributed_env(num_machines, machine_rank, dist_url)
    had_group = _dist_initialized()
    result = main_func(*args)
    if not had_group:
        comm.shutdown()
    return result


def _dist_initialized() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def _run(args: argparse.Namespace, train_loader_factory: Optional[Callable[[Any], Iterable]] = None) -> Any:
    from eco_m2f.config import setup_cfg

    cfg = setup_cfg(args.config_file or None, args.opts or [])
    default_setup(cfg, args)
    if args.eval_only:
        from .evaluate import evaluate_checkpoint

        return evaluate_checkpoint(cfg, args)
    from .trainer import train

    return train(cfg, args, train_loader_factory=train_loader_factory)


def main(
    args: argparse.Namespace, train_loader_factory: Optional[Callable[[Any], Iterable]] = None
) -> Optional[Dict[str, Any]]:
    """What ``train_net.py`` does: set up the config, then evaluate (``--eval-only``) or train.

    ``train_loader_factory(cfg) -> iterable of batches`` replaces
    ``eco_m2f.data.build_detection_train_loader`` (custom data pipelines, tests).
    Returns the evaluation results ``{dataset_name: {task: {metric: value}}}`` (rank 0).
    """
    return launch(
        _run, args.num_gpus, num_machines=args.num_machines, machine_rank=args.machine_rank,
        dist_url=args.dist_url, args=(args, train_loader_factory),
    )


def evaluate_in_process(config_file: str, overrides: Sequence[str] = ()) -> Optional[Dict[str, Any]]:
    """``train_net.py --eval-only --config-file CONFIG OVERRIDES`` on one device, in this process:
    a sweep of many evaluations pays the interpreter, the imports and the CUDA start once."""
    import torch

    results = main(default_argument_parser().parse_args(["--eval-only", "--config-file", str(config_file), *overrides]))
    if torch.cuda.is_available():
        torch.cuda.empty_cache()  # the next evaluation builds its own model
    return results
