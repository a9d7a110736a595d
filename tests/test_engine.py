"""The Lightning engine with a tiny dummy meta-architecture (tests/dummy_arch.py) on CPU."""
from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import dummy_arch  # noqa: E402  (registers DummySegmenter / DummySegmenterSkip)
from eco_m2f.config import get_cfg, setup_cfg  # noqa: E402
from eco_m2f.engine import default_argument_parser, main, setup_distributed_env  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]
SCRIPT = Path(dummy_arch.__file__)


def _metrics(output_dir: Path) -> list[dict]:
    path = output_dir / "metrics.json"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _poly_lr(it: int, base: float = 0.05, max_iter: int = 30, warm: int = 2, factor: float = 1.0) -> float:
    w = factor * (1 - it / warm) + it / warm if it < warm else 1.0
    return base * w * (1 - it / max_iter) ** 0.9


def _env() -> dict:
    env = dict(os.environ)
    for key in ("MASTER_ADDR", "MASTER_PORT", "NODE_RANK", "LOCAL_RANK", "WORLD_SIZE", "RANK"):
        env.pop(key, None)  # a fresh local process group, whatever the test runner's environment
    env["PYTHONPATH"] = str(REPO_ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


def _run_script(args: list, log: Path, env: dict, timeout: float) -> int:
    """Run tests/dummy_arch.py in its own process group; on timeout kill the whole group
    (Lightning's DDP launcher starts the other ranks as children)."""
    with open(log, "w") as f:
        proc = subprocess.Popen([sys.executable, str(SCRIPT), *args], cwd=REPO_ROOT, env=env, stdout=f,
                                stderr=subprocess.STDOUT, start_new_session=True)
        try:
            return proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            raise AssertionError(f"timed out after {timeout} s:\n{log.read_text()[-3000:]}")


# ----------------------------------------------------------------------------- CLI


def test_argument_parser_has_detectron2_flags():
    args = default_argument_parser().parse_args(
        ["--config-file", "a.yaml", "--resume", "--num-gpus", "4", "--num-machines", "2", "--machine-rank", "1",
         "--dist-url", "tcp://10.0.0.1:1234", "SOLVER.BASE_LR", "0.1", "OUTPUT_DIR", "x"]
    )
    assert args.config_file == "a.yaml" and args.resume and not args.eval_only
    assert (args.num_gpus, args.num_machines, args.machine_rank) == (4, 2, 1)
    assert args.dist_url == "tcp://10.0.0.1:1234"
    assert args.opts == ["SOLVER.BASE_LR", "0.1", "OUTPUT_DIR", "x"]
    args = default_argument_parser().parse_args(["--eval-only", "MODEL.WEIGHTS", "m.pth"])
    assert args.eval_only and args.opts == ["MODEL.WEIGHTS", "m.pth"] and args.num_gpus == 1


def test_distributed_env_from_flags(monkeypatch):
    for key in ("MASTER_ADDR", "MASTER_PORT", "NODE_RANK"):
        monkeypatch.setenv(key, "")  # recorded, so the variables are restored/removed afterwards
        monkeypatch.delenv(key)
    setup_distributed_env(2, 1, "tcp://10.1.2.3:4567")
    assert (os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"], os.environ["NODE_RANK"]) == ("10.1.2.3", "4567", "1")
    monkeypatch.setenv("MASTER_PORT", "999")  # a launcher's value wins
    setup_distributed_env(2, 1, "tcp://10.1.2.3:4567")
    assert os.environ["MASTER_PORT"] == "999"
    with pytest.raises(ValueError, match="--machine-rank 2"):
        setup_distributed_env(2, 2, "tcp://h:1")
    with pytest.raises(ValueError, match="--dist-url"):
        setup_distributed_env(1, 0, "10.1.2.3:4567")
    with pytest.raises(ValueError, match="auto"):
        setup_distributed_env(2, 0, "auto")


def test_precision_and_accelerator_selection():
    from eco_m2f.engine.devices import select_accelerator, select_precision

    cfg = get_cfg()
    assert select_precision(cfg, "gpu") == "32-true"
    cfg.SOLVER.AMP.ENABLED = True
    assert select_precision(cfg, "gpu") == "16-mixed"
    assert select_precision(cfg, "cpu") == "bf16-mixed"
    cfg.MODEL.DEVICE = "cpu"
    assert select_accelerator(cfg) == "cpu"
    cfg.MODEL.DEVICE = "tpu"
    with pytest.raises(ValueError, match="MODEL.DEVICE 'tpu'"):
        select_accelerator(cfg)


def test_trainer_settings_follow_model_and_flags(tmp_path):
    """DDP asks for unused-parameter detection only when the model says so; SyncBN only with
    BatchNorm and more than one process; max_steps from SOLVER.MAX_ITER."""
    import argparse

    import torch.nn as nn

    from eco_m2f.engine.trainer import build_trainer

    cfg = setup_cfg(None, dummy_arch.test_config_opts(str(tmp_path)))
    two = argparse.Namespace(num_gpus=2, num_machines=1)
    skip = dummy_arch.DummySegmenterSkip(cfg)
    skip.bn = nn.BatchNorm2d(3)
    t = build_trainer(cfg, two, skip)
    assert t.strategy._ddp_kwargs["find_unused_parameters"] is True
    assert t.strategy._layer_sync is not None  # SyncBatchNorm conversion
    assert (t.max_steps, t.num_devices, t.num_nodes, t.precision) == (30, 2, 1, "32-true")
    t = build_trainer(cfg, two, dummy_arch.DummySegmenter(cfg))
    assert t.strategy._ddp_kwargs["find_unused_parameters"] is False
    assert t.strategy._layer_sync is None  # no BatchNorm: nothing to convert
    t = build_trainer(cfg, argparse.Namespace(num_gpus=1, num_machines=1), skip)
    assert type(t.strategy).__name__ == "SingleDeviceStrategy"


def test_loss_contract_and_clipping_hook():
    from eco_m2f.engine import SegmentationModule

    cfg = setup_cfg(None, dummy_arch.test_config_opts("unused") + [
        "SOLVER.CLIP_GRADIENTS.ENABLED", "True", "SOLVER.CLIP_GRADIENTS.CLIP_TYPE", "full_model",
        "SOLVER.CLIP_GRADIENTS.CLIP_VALUE", "0.01"])
    module = SegmentationModule(cfg)
    assert isinstance(module.model, dummy_arch.DummySegmenter)
    optimizer = module.configure_optimizers()["optimizer"]
    batch = next(dummy_arch.dummy_train_loader(cfg))
    module.model.train()
    loss = sum(module.model(batch).values())
    loss.backward()
    module.configure_gradient_clipping(optimizer)
    grads = [p.grad for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
    assert float(torch.sqrt(sum(g.pow(2).sum() for g in grads))) == pytest.approx(0.01, rel=1e-3)

    class BadModel(torch.nn.Module):
        def forward(self, batch):
            return torch.tensor(1.0)

    with pytest.raises(TypeError, match="dict of scalar losses"):
        SegmentationModule(cfg, model=BadModel()).training_step(batch, 0)
    with pytest.raises(FloatingPointError, match="loss_x"):
        SegmentationModule.check_finite({"loss_x": math.nan, "loss_y": 1.0}, 12)


# ----------------------------------------------------------------------------- training


def test_train_end_to_end(tmp_path):
    out = tmp_path / "run"
    args = default_argument_parser().parse_args(dummy_arch.test_config_opts(str(out)))
    main(args, train_loader_factory=dummy_arch.dummy_train_loader)

    lines = _metrics(out)
    assert [r["iteration"] for r in lines] == list(range(30))
    for r in lines:
        assert {"iteration", "loss_ce", "total_loss", "lr", "time", "data_time", "eta_seconds"} <= set(r)
        assert r["lr"] == pytest.approx(_poly_lr(r["iteration"]), rel=1e-6, abs=1e-12)
    first = sum(r["total_loss"] for r in lines[:5]) / 5
    last = sum(r["total_loss"] for r in lines[-5:]) / 5
    assert last < 0.6 * first, (first, last)
    assert lines[-1]["eta_seconds"] == 0.0

    for name in ("model_0000009.pth", "model_0000019.pth", "model_final.pth", "last.ckpt", "config.yaml"):
        assert (out / name).is_file(), name
    assert list(out.glob("events.out.tfevents.*")), "no TensorBoard events"
    assert not list(out.glob("*.tmp"))

    # model_*.pth holds the model's own keys: a fresh model loads it strictly
    from eco_m2f.checkpoint import load_weights

    cfg = setup_cfg(str(out / "config.yaml"))
    fresh = dummy_arch.DummySegmenter(cfg)
    report = load_weights(fresh, str(out / "model_final.pth"))
    assert not report.missing and not report.unexpected
    final = torch.load(out / "model_final.pth", weights_only=True)
    assert final["iteration"] == 29
    mid = torch.load(out / "model_0000009.pth", weights_only=True)
    assert mid["iteration"] == 9
    assert not torch.equal(mid["model"]["predictor.weight"], final["model"]["predictor.weight"])
    ckpt = torch.load(out / "last.ckpt", weights_only=True)
    assert ckpt["global_step"] == 30


def test_amp_bf16_on_cpu_trains(tmp_path):
    out = tmp_path / "amp"
    opts = dummy_arch.test_config_opts(str(out)) + ["SOLVER.AMP.ENABLED", "True", "SOLVER.MAX_ITER", "3",
                                                    "SOLVER.CHECKPOINT_PERIOD", "0"]
    main(default_argument_parser().parse_args(opts), train_loader_factory=dummy_arch.dummy_train_loader)
    lines = _metrics(out)
    assert [r["iteration"] for r in lines] == [0, 1, 2]
    assert all(math.isfinite(r["total_loss"]) for r in lines)
    assert (out / "model_final.pth").is_file() and not (out / "model_0000000.pth").exists()


def _start_then_signal(tmp_path: Path, opts: list, env: dict, ready, send) -> tuple:
    """Run tests/dummy_arch.py with ``opts`` in its own process group until ``ready()``, then
    ``send(proc)``; returns (return code, log text). The group is killed if anything fails."""
    log_path = tmp_path / "run1.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, str(SCRIPT), *opts], cwd=REPO_ROOT, env=env,
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.time() + 240
        try:
            while not ready():
                assert proc.poll() is None, log_path.read_text()[-3000:]
                assert time.time() < deadline, "not ready after 240 s"
                time.sleep(0.05)
            send(proc)
            proc.wait(timeout=60)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    return proc.returncode, log_path.read_text()


def test_resume_after_kill(tmp_path):
    """SIGKILL a run after its iteration-10 checkpoint, then --resume: it continues from there."""
    out = tmp_path / "resume"
    opts = dummy_arch.test_config_opts(str(out))
    env = _env()
    env[dummy_arch.STEP_SLEEP_ENV] = "0.3"  # 30 iterations take >= 9 s: the kill lands mid-run
    rc, _ = _start_then_signal(tmp_path, opts, env, ready=(out / "model_0000009.pth").exists,
                               send=lambda proc: proc.send_signal(signal.SIGKILL))
    assert rc == -signal.SIGKILL
    assert not (out / "model_final.pth").exists(), "the run finished before it was killed"
    saved = torch.load(out / "last.ckpt", weights_only=True)["global_step"]
    assert 10 <= saved < 30
    n_before = len(_metrics(out))

    env.pop(dummy_arch.STEP_SLEEP_ENV)
    log2 = tmp_path / "run2.log"
    rc = _run_script(["--resume", *opts], log2, env, timeout=300)
    text = log2.read_text()
    assert rc == 0, text[-3000:]
    assert f"Starting training from iteration {saved}" in text
    new = _metrics(out)[n_before:]
    assert [r["iteration"] for r in new] == list(range(saved, 30))
    # optimizer/scheduler state restored: the lr continues on the schedule
    for r in new:
        assert r["lr"] == pytest.approx(_poly_lr(r["iteration"]), rel=1e-6, abs=1e-12)
    assert (out / "model_final.pth").is_file()
    assert torch.load(out / "last.ckpt", weights_only=True)["global_step"] == 30


@pytest.mark.parametrize("workers,waits_for", [(0, "step"), (2, "step"), (2, "data")])
def test_sigterm_keeps_the_iterations_since_the_last_checkpoint(tmp_path, workers, waits_for):
    """SIGTERM (a time bound) before the first periodic checkpoint: the run writes the weights and
    the training state of its last finished iteration, and --resume continues from there. With
    loader workers the signal goes to the whole process group, as ``timeout`` sends it: the
    workers die with it, and that must neither stop the step in progress nor, when the run was
    waiting for its next batch (``waits_for`` "data": slow workers), turn into a failure."""
    out = tmp_path / "term"
    # checkpoints every 10 of 30 iterations
    opts = dummy_arch.test_config_opts(str(out)) + ["DATALOADER.NUM_WORKERS", str(workers)]
    env = _env()
    env[dummy_arch.STEP_SLEEP_ENV if waits_for == "step" else dummy_arch.LOAD_SLEEP_ENV] = "0.3"
    rc, text = _start_then_signal(
        tmp_path, opts, env, ready=lambda: (out / "metrics.json").exists() and len(_metrics(out)) >= 3,
        send=lambda proc: os.killpg(proc.pid, signal.SIGTERM) if workers else proc.send_signal(signal.SIGTERM))
    assert rc == 128 + signal.SIGTERM, text[-3000:]  # stopped, not finished
    assert not (out / "model_0000009.pth").exists() and not (out / "model_final.pth").exists(), text[-3000:]
    saved = torch.load(out / "last.ckpt", weights_only=True)["global_step"]
    assert 3 <= saved < 10, text[-3000:]
    weights = torch.load(out / f"model_{saved - 1:07d}.pth", weights_only=True)
    assert weights["iteration"] == saved - 1
    assert f"SIGTERM: saved model_{saved - 1:07d}.pth and last.ckpt at iteration {saved - 1}" in text
    assert "Traceback" not in text.split("SIGTERM: saved")[0], text[-3000:]  # the step in progress finished

    env.pop(dummy_arch.STEP_SLEEP_ENV, None)
    env.pop(dummy_arch.LOAD_SLEEP_ENV, None)
    log2 = tmp_path / "run2.log"
    rc = _run_script(["--resume", *opts], log2, env, timeout=300)
    assert rc == 0, log2.read_text()[-3000:]
    assert f"Starting training from iteration {saved}" in log2.read_text()
    iterations = [r["iteration"] for r in _metrics(out) if "lr" in r]
    assert iterations[-(30 - saved):] == list(range(saved, 30))
    assert torch.load(out / "last.ckpt", weights_only=True)["global_step"] == 30


def test_sigterm_before_the_first_iteration_stops_at_once(tmp_path):
    """SIGTERM while the train loader is still being built (a dataset loading or generating):
    the run stops within seconds with status 143 and writes nothing, rather than waiting for the
    end of a first step that has not begun."""
    out = tmp_path / "early"
    env = _env()
    env[dummy_arch.SETUP_SLEEP_ENV] = "120"
    log_path = tmp_path / "run1.log"
    sent = []

    def send(proc) -> None:
        sent.append(time.time())
        proc.send_signal(signal.SIGTERM)

    rc, text = _start_then_signal(tmp_path, dummy_arch.test_config_opts(str(out)), env,
                                  ready=lambda: dummy_arch.SETUP_SLEEP_MESSAGE in log_path.read_text(), send=send)
    assert rc == 128 + signal.SIGTERM, text[-3000:]
    assert time.time() - sent[0] < 30, "the run went on after SIGTERM"
    assert "SIGTERM before the first iteration" in text, text[-3000:]
    assert not list(out.glob("model_*.pth")) and not (out / "last.ckpt").exists()


def test_the_early_sigterm_handler_is_the_runs_alone(tmp_path):
    """After the fit (its teardown) SIGTERM is handled as before it, not by the early handler."""
    from eco_m2f.engine.callbacks import PeriodicCheckpointer

    before = signal.getsignal(signal.SIGTERM)
    checkpointer = PeriodicCheckpointer(str(tmp_path), period=10, max_iter=30)
    checkpointer.setup(None, None, "fit")
    try:
        assert signal.getsignal(signal.SIGTERM) is not before
        with pytest.raises(SystemExit) as stopped:
            signal.getsignal(signal.SIGTERM)(signal.SIGTERM, None)
        assert stopped.value.code == 128 + signal.SIGTERM
    finally:
        checkpointer.teardown(None, None, "fit")
    assert signal.getsignal(signal.SIGTERM) is before


@pytest.mark.slow
def test_ddp_two_cpu_processes_with_unused_parameters(tmp_path):
    """Two gloo processes; the model skips a layer on some steps and says so through
    ``find_unused_parameters`` (without it DDP raises)."""
    out = tmp_path / "ddp"
    opts = dummy_arch.test_config_opts(str(out)) + [
        "MODEL.META_ARCHITECTURE", "DummySegmenterSkip", "SOLVER.MAX_ITER", "12"]
    log = tmp_path / "ddp.log"
    rc = _run_script(["--num-gpus", "2", "--dist-url", "auto", *opts], log, _env(), timeout=300)
    text = log.read_text()
    assert rc == 0, text[-3000:]
    assert "MEMBER: 2/2" in text
    lines = _metrics(out)
    assert [r["iteration"] for r in lines] == list(range(12))  # written once (rank 0)
    assert (out / "model_final.pth").is_file()
    assert (out / "log.txt.rank1").is_file()


# ----------------------------------------------------------------------------- real data + evaluation


def _synthetic_semseg_opts(output_dir: str) -> list:
    """The dummy model on the synthetic dataset through the project's loaders and evaluators."""
    return dummy_arch.test_config_opts(output_dir) + [
        "MODEL.SEM_SEG_HEAD.NUM_CLASSES", "8",
        "INPUT.DATASET_MAPPER_NAME", "mask_former_semantic",
        "INPUT.MIN_SIZE_TRAIN", "(64,)", "INPUT.MAX_SIZE_TRAIN", "64",
        "INPUT.MIN_SIZE_TEST", "64", "INPUT.MAX_SIZE_TEST", "64",
        "DATALOADER.NUM_WORKERS", "0",
        "DATASETS.TRAIN", "('synthetic_panoptic_train',)",
        "DATASETS.TEST", "('synthetic_panoptic_val',)",
        "MODEL.MASK_FORMER.TEST.SEMANTIC_ON", "True",
        "MODEL.MASK_FORMER.TEST.PANOPTIC_ON", "False",
        "MODEL.MASK_FORMER.TEST.INSTANCE_ON", "False",
        "SOLVER.IMS_PER_BATCH", "2",
        "SOLVER.MAX_ITER", "10",
        "SOLVER.CHECKPOINT_PERIOD", "0",
        "TEST.EVAL_PERIOD", "5",
    ]


def test_train_with_project_loader_evaluates_periodically_then_eval_only(tiny_datasets, tmp_path):
    out = tmp_path / "semseg"
    opts = _synthetic_semseg_opts(str(out))
    results = main(default_argument_parser().parse_args(opts))  # the default loader: DATASETS.TRAIN

    assert set(results) == {"synthetic_panoptic_val"}
    miou = results["synthetic_panoptic_val"]["sem_seg"]["mIoU"]
    assert 0.0 <= miou <= 100.0
    lines = _metrics(out)
    train_iters = [r["iteration"] for r in lines if "total_loss" in r]
    eval_lines = [r for r in lines if "sem_seg/mIoU" in r]
    assert train_iters == list(range(10))
    assert [r["iteration"] for r in eval_lines] == [4, 9]  # every EVAL_PERIOD and at the end, once
    assert eval_lines[-1]["sem_seg/mIoU"] == pytest.approx(miou)
    saved = json.loads((out / "inference" / "synthetic_panoptic_val" / "results.json").read_text())
    assert saved["sem_seg"]["mIoU"] == pytest.approx(miou)

    # --eval-only on the final weights reproduces the end-of-training numbers
    again = main(default_argument_parser().parse_args(
        ["--eval-only", *opts, "MODEL.WEIGHTS", str(out / "model_final.pth"), "OUTPUT_DIR", str(tmp_path / "ev")]))
    assert again["synthetic_panoptic_val"]["sem_seg"]["mIoU"] == pytest.approx(miou)
    assert (tmp_path / "ev" / "inference" / "synthetic_panoptic_val" / "results.json").is_file()


def test_eval_only_needs_weights(tmp_path):
    args = default_argument_parser().parse_args(["--eval-only", *dummy_arch.test_config_opts(str(tmp_path))])
    with pytest.raises(ValueError, match="MODEL.WEIGHTS"):
        main(args)


def test_results_table_format():
    from eco_m2f.evaluation.testing import format_results_table

    text = format_results_table("ds", {"sem_seg": {"mIoU": 12.3456, "fwIoU": 50.0, "IoU-road": 3.0, "ACC-road": 4.0},
                                       "panoptic_seg": {"PQ": 1.0}})
    assert "ds" in text and "mIoU" in text and "12.346" in text and "PQ" in text
    assert "copypaste: 12.3456,50.0000" in text  # summary metrics only, as Detectron2
    road = next(line for line in text.splitlines() if line.startswith("| road"))
    assert "3.000" in road and "4.000" in road


@pytest.mark.slow
def test_eval_only_two_processes_matches_one(tiny_datasets, tmp_path):
    """--eval-only --num-gpus 2 (two CPU processes, images sharded, results gathered) gives the
    numbers of a single-process evaluation."""
    weights = tmp_path / "w.pth"
    opts = _synthetic_semseg_opts(str(tmp_path / "one"))
    torch.manual_seed(0)
    model = dummy_arch.DummySegmenter(setup_cfg(None, opts))
    torch.save({"model": model.state_dict()}, weights)
    one = main(default_argument_parser().parse_args(["--eval-only", *opts, "MODEL.WEIGHTS", str(weights)]))
    two_dir = tmp_path / "two"
    rc = _run_script(["--eval-only", "--num-gpus", "2", "--dist-url", "auto", *opts, "MODEL.WEIGHTS", str(weights),
                      "OUTPUT_DIR", str(two_dir)], tmp_path / "two.log", _env(), timeout=300)
    assert rc == 0, (tmp_path / "two.log").read_text()[-3000:]
    assert "MEMBER: 2/2" in (tmp_path / "two.log").read_text()
    two = json.loads((two_dir / "inference" / "synthetic_panoptic_val" / "results.json").read_text())
    for key in ("mIoU", "fwIoU", "pACC", "mACC"):
        assert two["sem_seg"][key] == pytest.approx(one["synthetic_panoptic_val"]["sem_seg"][key])


def test_launch_destroys_the_process_group_its_job_created(tmp_path):
    """A group made inside the job is gone after launch() returns (left to the interpreter's exit,
    gloo can abort the finished process); a group that existed before is the caller's and stays."""
    import torch.distributed as dist

    from eco_m2f.engine import launch

    def job(init_file):
        dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=0, world_size=1)
        return dist.get_world_size()

    assert launch(job, 1, args=(tmp_path / "a",)) == 1
    assert not dist.is_initialized()

    with pytest.raises(RuntimeError, match="boom"):  # after an error other ranks may be in a collective
        launch(lambda: (job(tmp_path / "b"), (_ for _ in ()).throw(RuntimeError("boom"))), 1)
    assert dist.is_initialized()
    try:
        assert launch(lambda: dist.get_world_size(), 1) == 1
        assert dist.is_initialized()  # not made by this job: left alone
    finally:
        dist.destroy_process_group()
