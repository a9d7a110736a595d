"""The ECO-M2F trends of one ``scripts/synthetic_experiments.sh trends OUT`` run as tables.

Reads what the stage wrote under OUT and turns it into the paper's views, each table only from
files that exist (a stage stopped part-way reports what it finished):

* Table 5: PQ (and PQ_th, PQ_st) at fixed exits for the baseline (the parent, encoder cut),
  USD and WSD step A (``{baseline,stepA_usd,stepA_wsd}_exits.json``);
* step B: the best-exit histogram of the training images and the mean best exit per complexity
  bucket (``exit_complexity.json``);
* Fig. 5 / Table 3: the beta sweep, gated points beside the fixed exits, with the gate's exit
  histogram (``derived/sweep/sweep.json``);
* Table 4: K_user (``derived/sweep_k{K}``, K = 6 being the main sweep) and Table T2: the gate
  losses (``derived/sweep_{loss}``, hard-CE being the main sweep), both at the trend beta;
* wall time beside encoder GFLOPs for the gated model and fixed exits 2 and 6
  (``wall_time_{gated,2,6}.json``).

:func:`collect` gathers the numbers, :func:`format_report` writes Markdown, :func:`plot_trends`
draws PQ per exit and the mean best exit per complexity bucket.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence

from ..config.eco import DEFAULT_GATE_LOSS

__all__ = ["EXIT_TABLES", "collect", "format_report", "plot_trends", "write_report"]

#: (file stem, row label) of the fixed-exit tables, in the order of the paper's Table 5
EXIT_TABLES = (("baseline_exits", "baseline (parent, encoder cut)"), ("stepA_usd_exits", "USD step A"),
               ("stepA_wsd_exits", "WSD step A"))
_EXTRA_SWEEP_PREFIX = "sweep_"  # derived/sweep_k{K}, derived/sweep_{loss}: the sweeps at the trend beta


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from e


def _gated(rows: Sequence[Mapping[str, Any]]) -> List[Mapping[str, Any]]:
    return [r for r in rows if r.get("kind") == "gated"]


def _at_beta(rows: Sequence[Mapping[str, Any]], beta: float) -> Optional[Mapping[str, Any]]:
    return next((r for r in _gated(rows) if abs(float(r["exit_or_beta"]) - beta) <= 1e-12 * max(1.0, abs(beta))), None)


def collect(out_dir: str | os.PathLike, trend_beta: Optional[float] = None) -> Dict[str, Any]:
    """Every number of the report from a trends output directory (absent parts left out).

    ``trend_beta`` is the beta of the K_user and gate-loss sweeps; by default it is read from
    those sweeps' own rows."""
    out = Path(out_dir)
    if not out.is_dir():
        raise FileNotFoundError(f"{out}: no such trends output directory")
    report: Dict[str, Any] = {"dir": str(out), "exits": {}, "sweep": [], "k_user": {}, "gate_losses": {}, "wall_time": {}}
    for stem, _ in EXIT_TABLES:
        path = out / f"{stem}.json"
        if path.is_file():
            report["exits"][stem] = {int(r["exit"]): r for r in _read_json(path)}
    path = out / "exit_complexity.json"
    if path.is_file():
        report["complexity"] = _read_json(path)
    derived = out / "derived"
    main = derived / "sweep" / "sweep.json"
    if main.is_file():
        report["sweep"] = _read_json(main)
    extra: Dict[str, List[Mapping[str, Any]]] = {}
    if derived.is_dir():
        for d in sorted(derived.iterdir()):
            if d.is_dir() and d.name.startswith(_EXTRA_SWEEP_PREFIX) and (d / "sweep.json").is_file():
                extra[d.name[len(_EXTRA_SWEEP_PREFIX):]] = _read_json(d / "sweep.json")
    if trend_beta is None:
        betas = {float(r["exit_or_beta"]) for rows in extra.values() for r in _gated(rows)}
        if len(betas) > 1:
            raise ValueError(f"{derived}: the K_user / gate-loss sweeps ran at several betas {sorted(betas)}; pass trend_beta")
        trend_beta = betas.pop() if betas else None
    report["trend_beta"] = trend_beta
    if trend_beta is not None:
        main_row = _at_beta(report["sweep"], trend_beta)
        if main_row is not None:
            report["k_user"][6] = main_row
            report["gate_losses"][DEFAULT_GATE_LOSS] = main_row
        for name, rows in extra.items():
            row = _at_beta(rows, trend_beta)
            if row is None:
                continue
            if name.startswith("k") and name[1:].isdigit():
                report["k_user"][int(name[1:])] = row
            else:
                report["gate_losses"][name] = row
    for e in ("gated", "2", "6"):
        path = out / f"wall_time_{e}.json"
        if path.is_file():
            report["wall_time"][e] = _read_json(path)
    return report


def _f(value: Any, digits: int = 1) -> str:
    return "-" if value is None or value == "" else f"{float(value):.{digits}f}"


def _histogram(hist: Mapping[str, int]) -> str:
    return ", ".join(f"{k}: {v}" for k, v in sorted(hist.items(), key=lambda kv: int(kv[0])) if v)


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> List[str]:
    return ["| " + " | ".join(header) + " |", "| " + " | ".join("---" for _ in header) + " |",
            *("| " + " | ".join(r) + " |" for r in rows)]


def _sweep_row(label: str, r: Mapping[str, Any], full_gflops: Optional[float]) -> List[str]:
    enc = r.get("encoder_gflops")
    cut = "" if not full_gflops or enc is None else f" ({100 * (float(enc) / full_gflops - 1):+.0f}%)"
    hist = (r.get("result") or {}).get("exit_histogram") or {}
    return [label, _f(r.get("PQ")), _f(r.get("PQ_th")), _f(r.get("PQ_st")), _f(r.get("mean_exit"), 2),
            _f(enc, 2) + cut, _histogram(hist)]


def format_report(report: Mapping[str, Any]) -> str:
    """The tables of :func:`collect` as Markdown (PQ in %, GFLOPs per image)."""
    lines = [f"# ECO-M2F trends: {report['dir']}", ""]
    exits = report["exits"]
    if exits:
        ks = sorted({k for table in exits.values() for k in table})
        for metric in ("PQ", "PQ_th", "PQ_st"):
            lines += [f"## Table 5: {metric} at fixed exits", ""]
            rows = [[label] + [_f(exits[stem].get(k, {}).get(metric)) for k in ks] for stem, label in EXIT_TABLES if stem in exits]
            lines += _table(["model"] + [f"exit {k}" for k in ks], rows) + [""]
        any_table = next(iter(exits.values()))
        lines += ["encoder GFLOPs per image at each exit: "
                  + ", ".join(f"{k}: {_f(any_table[k].get('gflops_encoder'), 2)}" for k in ks if k in any_table), ""]
    for result in report.get("complexity") or []:
        buckets = result["buckets"]
        total: Dict[str, int] = {}
        for b in buckets:
            for k, v in b["best_exit_histogram"].items():
                total[k] = total.get(k, 0) + int(v)
        if result is report["complexity"][0]:
            lines += [f"## Step B: best exit of the {result['images']} training images ({result['quality']})", "",
                      _histogram(total) or "-", ""]
        rho = result.get("spearman")
        lines += [f"### Mean best exit by {result['field']} (Spearman rho {_f(rho, 2)})", ""]
        rows = [[f"{b['range'][0]:g}-{b['range'][1]:g}", str(b["images"]), _f(b["mean_best_exit"], 2),
                 _histogram(b["best_exit_histogram"])] for b in buckets]
        lines += _table([result["field"], "images", "mean best exit", "best exits"], rows) + [""]
    sweep = report["sweep"]
    fixed = [r for r in sweep if r.get("kind") == "fixed"]
    full = max((float(r["encoder_gflops"]) for r in fixed if r.get("encoder_gflops") is not None), default=None)
    header = ["", "PQ", "PQ_th", "PQ_st", "mean exit", "encoder GFLOPs (vs exit 6)", "exits"]
    if sweep:
        lines += ["## Fig. 5 / Table 3: the beta sweep beside the fixed exits", ""]
        rows = [_sweep_row(f"exit {r['exit_or_beta']}", r, full) for r in fixed]
        rows += [_sweep_row(f"gated, beta {r['exit_or_beta']}", r, full) for r in _gated(sweep)]
        lines += _table(header, rows) + [""]
    beta = report.get("trend_beta")
    if report["k_user"]:
        lines += [f"## Table 4: K_user at beta {beta}", ""]
        rows = [_sweep_row(f"K_user {k}", r, full) for k, r in sorted(report["k_user"].items(), reverse=True)]
        lines += _table(header, rows) + [""]
    if report["gate_losses"]:
        lines += [f"## Table T2: gate losses at beta {beta}", ""]
        rows = [_sweep_row(name, r, full) for name, r in report["gate_losses"].items()]
        lines += _table(header, rows) + [""]
    wall = report["wall_time"]
    if wall:
        gated = _at_beta(sweep, beta) if beta is not None else None
        enc = {"gated": gated.get("encoder_gflops") if gated else None}
        enc.update({e: next((r.get("encoder_gflops") for r in fixed if str(r["exit_or_beta"]) == e), None) for e in ("2", "6")})
        lines += ["## Wall time (scripts/benchmark.py --real-images)", ""]
        rows = []
        for e, timings in wall.items():
            label = f"gated, beta {beta}" if e == "gated" else f"exit {e}"
            for t in timings:
                rows.append([label, str(t["batch"]), t.get("dtype", ""), _f(t["latency_ms"], 2), _f(t["images_per_s"]),
                             _f(enc.get(e), 2)])
        lines += _table(["model", "batch", "dtype", "ms / batch", "images/s", "encoder GFLOPs (sweep)"], rows) + [""]
    return "\n".join(lines).rstrip() + "\n"


def plot_trends(report: Mapping[str, Any], path: str | os.PathLike) -> Optional[Path]:
    """PQ per fixed exit for each model (Table 5) and the mean best exit per bucket of the first
    complexity field (step B), side by side; None when neither is there."""
    exits, complexity = report["exits"], report.get("complexity") or []
    if not exits and not complexity:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for stem, label in EXIT_TABLES:
        if stem in exits:
            ks = sorted(exits[stem])
            axes[0].plot(ks, [exits[stem][k].get("PQ") for k in ks], marker="o", label=label)
    axes[0].set(xlabel="exit (encoder layers)", ylabel="PQ (%)", title="fixed exits")
    if exits:
        axes[0].set_xticks(sorted({k for table in exits.values() for k in table}))
        axes[0].legend()
    if complexity:
        first = complexity[0]
        buckets = first["buckets"]
        labels = [f"{b['range'][0]:g}-{b['range'][1]:g}" for b in buckets]
        axes[1].bar(range(len(buckets)), [b["mean_best_exit"] for b in buckets])
        axes[1].set_xticks(range(len(buckets)), labels, rotation=30)
        axes[1].set_ylim(min(first["exits"]) - 0.5, max(first["exits"]) + 0.5)
        axes[1].set(xlabel=first["field"], ylabel="mean best exit", title="step B: best exit by complexity")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_report(out_dir: str | os.PathLike, trend_beta: Optional[float] = None) -> Dict[str, Path]:
    """``trends_report.md``, ``trends_report.json`` and ``trends_report.png`` in ``out_dir``."""
    report = collect(out_dir, trend_beta)
    out = Path(out_dir)
    written = {"md": out / "trends_report.md", "json": out / "trends_report.json"}
    written["md"].write_text(format_report(report))
    written["json"].write_text(json.dumps(report, indent=1, default=str))
    png = plot_trends(report, out / "trends_report.png")
    if png is not None:
        written["png"] = png
    return written
