"""The accuracy / compute trade-off of ECO-M2F (papers/004 Fig. 5).

For each beta: step C (gate only; the derived records are reused) then an evaluation of the gated
model; plus one evaluation per fixed exit l_k. The points go to a CSV and to a PNG of PQ against
encoder GFLOPs. Evaluation is injected as ``evaluate_fn(cfg_overrides) -> {"PQ", "gflops_encoder",
"gflops", ...}`` where the overrides apply to the step-B config: :func:`results_evaluate_fn` runs
one evaluation (``train_net.py --eval-only``'s, in this process or in a subprocess) and reads
``OUTPUT_DIR/inference/<dataset>/results.json``.
"""
from __future__ import annotations

import csv
import json
import logging
import os
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence

from .exits import check_exits
from .meta_arch import eco_architecture_overrides
from .records import load_records, read_meta
from .step_c import format_step_c_report, resolve_weights, run_step_c

__all__ = [
    "CSV_FIELDS",
    "EvaluateFn",
    "results_json_path",
    "parse_results_json",
    "results_evaluate_fn",
    "subprocess_evaluate_fn",
    "fixed_exit_overrides",
    "run_sweep",
    "write_csv",
    "plot_tradeoff",
]

logger = logging.getLogger(__name__)

EvaluateFn = Callable[[List[str]], Mapping[str, Any]]
CSV_FIELDS = ("kind", "exit_or_beta", "PQ", "PQ_th", "PQ_st", "mean_exit", "encoder_gflops", "total_gflops")


# ---------------------------------------------------------------------------------------- evaluation
def results_json_path(output_dir: str | os.PathLike, dataset: str) -> Path:
    """Where evaluation writes its metrics: OUTPUT_DIR/inference/<dataset>/results.json."""
    return Path(output_dir) / "inference" / dataset / "results.json"


def parse_results_json(path: str | os.PathLike) -> Dict[str, Any]:
    """{"PQ", "PQ_th", "PQ_st", "gflops_encoder", "gflops", "exit_mean", "exit_histogram"} from an
    evaluation's results.json ({"panoptic_seg": {"PQ", "PQ_th", "PQ_st", ...}, "cost":
    {"gflops_encoder", "gflops", "exit_mean", "exit_histogram"}}; the things / stuff split and the
    exits may be absent: None)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"evaluation results {path} not found")
    data = json.loads(path.read_text(encoding="utf-8"))
    try:
        pan = data["panoptic_seg"]
        pq = float(pan["PQ"])
        cost = data["cost"]
        enc, total = float(cost["gflops_encoder"]), float(cost["gflops"])
    except (KeyError, TypeError) as exc:
        raise KeyError(
            f"{path} lacks {exc}: expected panoptic_seg.PQ and cost.gflops_encoder / cost.gflops"
        ) from None
    return {"PQ": pq, "PQ_th": _optional(pan.get("PQ_th")), "PQ_st": _optional(pan.get("PQ_st")),
            "gflops_encoder": enc, "gflops": total, "exit_mean": _optional(cost.get("exit_mean")),
            "exit_histogram": cost.get("exit_histogram")}


def _optional(value: Any) -> Optional[float]:
    return None if value is None else float(value)


def results_evaluate_fn(config_file: str, run: Callable[[List[str]], Any]) -> EvaluateFn:
    """evaluate_fn calling ``run(overrides)``, an evaluation of ``config_file`` with the overrides
    that writes ``OUTPUT_DIR/inference/<dataset>/results.json``, and reading that file."""
    from ..config import setup_cfg

    def evaluate(overrides: List[str]) -> Dict[str, Any]:
        cfg = setup_cfg(config_file, overrides)
        if not cfg.DATASETS.TEST:
            raise ValueError(f"{config_file}: DATASETS.TEST is empty; nothing to evaluate on")
        path = results_json_path(cfg.OUTPUT_DIR, cfg.DATASETS.TEST[0])
        if path.exists():  # never read a stale result if the run fails to write a new one
            path.unlink()
        run(list(overrides))
        return parse_results_json(path)

    return evaluate


def subprocess_evaluate_fn(
    config_file: str,
    repo_root: str | os.PathLike,
    extra_args: Sequence[str] = (),
    python: str = sys.executable,
) -> EvaluateFn:
    """evaluate_fn running ``python train_net.py --eval-only --config-file CONFIG [extra] OVERRIDES``."""
    repo_root = Path(repo_root)

    def run(overrides: List[str]) -> None:
        cmd = [python, str(repo_root / "train_net.py"), "--eval-only", "--config-file", str(config_file),
               *extra_args, *overrides]
        logger.info("running %s", " ".join(cmd))
        subprocess.run(cmd, check=True, cwd=repo_root)

    return results_evaluate_fn(config_file, run)


def fixed_exit_overrides(cfg: Any, k: int, weights: str, output_dir: str | os.PathLike) -> List[str]:
    """Overrides of ``cfg`` evaluating the step-A model with every image at exit k (gate off)."""
    return eco_architecture_overrides(cfg) + [
        "MODEL.ECO.GATE.ENABLED", "False", "TEST.ECO.EXIT", str(int(k)), "MODEL.WEIGHTS", str(weights),
        "OUTPUT_DIR", str(output_dir)]


# --------------------------------------------------------------------------------------------- sweep
def _quality(res: Mapping[str, Any]) -> Dict[str, Optional[float]]:
    """PQ and, where the evaluation reports them, its things / stuff parts."""
    return {"PQ": float(res["PQ"]), "PQ_th": _optional(res.get("PQ_th")), "PQ_st": _optional(res.get("PQ_st"))}


def write_csv(rows: Sequence[Mapping[str, Any]], path: str | os.PathLike) -> Path:
    path = Path(path)
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(CSV_FIELDS), extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow(row)
    return path


def plot_tradeoff(rows: Sequence[Mapping[str, Any]], path: str | os.PathLike, title: str = "") -> Path:
    """PQ vs encoder GFLOPs: fixed exits as a labelled line (l_k), gated points labelled by beta."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fixed = sorted((r for r in rows if r["kind"] == "fixed"), key=lambda r: r["encoder_gflops"])
    gated = [r for r in rows if r["kind"] == "gated"]
    fig, ax = plt.subplots(figsize=(6, 4.5))
    if fixed:
        ax.plot([r["encoder_gflops"] for r in fixed], [r["PQ"] for r in fixed], "o-", color="tab:gray",
                label="fixed exit")
        for r in fixed:
            ax.annotate(f"$l_{{{r['exit_or_beta']}}}$", (r["encoder_gflops"], r["PQ"]),
                        textcoords="offset points", xytext=(4, -12), fontsize=9)
    if gated:
        ax.scatter([r["encoder_gflops"] for r in gated], [r["PQ"] for r in gated], marker="*", s=140,
                   color="tab:red", label="ECO-M2F (gate)", zorder=3)
        for r in gated:
            ax.annotate(f"β={r['exit_or_beta']:g}", (r["encoder_gflops"], r["PQ"]),
                        textcoords="offset points", xytext=(5, 5), fontsize=9, color="tab:red")
    ax.set_xlabel("Encoder GFLOPs per image")
    ax.set_ylabel("PQ")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    if title:
        ax.set_title(title)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def run_sweep(
    config_file: str,
    derived_dir: str | os.PathLike,
    betas: Sequence[float],
    evaluate_fn: EvaluateFn,
    opts: Sequence[str] = (),
    k_user: Optional[int] = None,
    output_dir: Optional[str | os.PathLike] = None,
    fixed_exits: bool = True,
    device: str = "cpu",
    log: Callable[[str], None] = print,
) -> Dict[str, Any]:
    """Fixed-exit evaluations, then step C + evaluation per beta; writes sweep.csv, sweep.png and
    sweep.json to ``output_dir`` (default DERIVED_DIR/sweep). Returns {"rows", "paths"}."""
    from ..config import setup_cfg

    if not betas:
        raise ValueError("no beta values to sweep")
    derived = Path(derived_dir)
    out = Path(output_dir) if output_dir is not None else derived / "sweep"
    out.mkdir(parents=True, exist_ok=True)
    cfg = setup_cfg(config_file, list(opts))
    exits = check_exits(cfg.MODEL.ECO.EXITS, name="MODEL.ECO.EXITS")
    meta = read_meta(derived)
    weights = str(meta.get("weights") or cfg.MODEL.WEIGHTS or "")
    resolved = resolve_weights(weights, derived)
    weights = str(resolved) if resolved is not None else weights

    rows: List[Dict[str, Any]] = []
    details: List[Dict[str, Any]] = []
    if fixed_exits:
        for k in exits:
            res = dict(evaluate_fn(list(opts) + fixed_exit_overrides(cfg, k, weights, (out / f"fixed_l{k}").resolve())))
            rows.append({"kind": "fixed", "exit_or_beta": k, **_quality(res), "mean_exit": float(k),
                         "encoder_gflops": float(res["gflops_encoder"]), "total_gflops": float(res["gflops"])})
            details.append({**rows[-1], "result": res})
            log(f"fixed exit l_{k}: PQ {res['PQ']:.2f}, encoder GFLOPs {res['gflops_encoder']:.2f}")
    records = load_records(derived)  # read once, shared by every beta
    for beta in betas:
        step_c = run_step_c(config_file, derived, float(beta), k_user=k_user, opts=opts, device=device,
                            records=records)
        log(format_step_c_report(step_c))
        res = dict(evaluate_fn(list(opts) + step_c.eval_overrides))
        rows.append({"kind": "gated", "exit_or_beta": float(beta), **_quality(res), "mean_exit": res.get("exit_mean"),
                     "encoder_gflops": float(res["gflops_encoder"]), "total_gflops": float(res["gflops"])})
        details.append({**rows[-1], "result": res, "gate_dir": str(step_c.output_dir),
                        "step_c_seconds": step_c.timings["total_seconds"],
                        "heldout_accuracy": step_c.result.metrics["heldout"].get("accuracy")})
        mean_exit = "" if res.get("exit_mean") is None else f", mean exit {res['exit_mean']:.2f}"
        log(f"gated beta={float(beta):g}: PQ {res['PQ']:.2f}, encoder GFLOPs {res['gflops_encoder']:.2f}{mean_exit}")

    paths = {
        "csv": write_csv(rows, out / "sweep.csv"),
        "png": plot_tradeoff(rows, out / "sweep.png", title=Path(config_file).stem),
        "json": out / "sweep.json",
    }
    paths["json"].write_text(json.dumps(details, indent=2, default=str) + "\n", encoding="utf-8")
    return {"rows": rows, "paths": paths}
