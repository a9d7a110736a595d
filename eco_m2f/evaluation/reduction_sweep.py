"""Trade-off sweep of a token-reduction model: a dense baseline and named settings, in one process.

Each setting is a name and ``KEY VALUE`` overrides of one config (a pause configuration, a
threshold...); the dense baseline is the same config with ``MODEL.TOKEN_REDUCTION.NAME ""``,
from its own weights or the method's. For each, in turn:

* the evaluation on ``DATASETS.TEST[0]`` with the dataset's evaluators (mIoU) and the mean of
  the per-image cost records of the outputs (GFLOPs, live tokens, token fraction);
* images/s of ``model.network`` on the first validation images (batch 8 and batch 1, bf16 by
  default), CUDA-synchronised, after warm-up, with the GFLOPs of exactly those images.

Then the speed-up over the dense baseline and the share of the FLOP reduction that became time,
``(t_dense - t) / (t_dense - t_dense * F / F_dense)`` (NaN when F equals F_dense). On CUDA the
dense model is also timed as one CUDA graph (row ``dense-graphed``: its shapes never change, so
nothing of the host's launch cost need remain), and every row is compared at each batch size
with the fastest row that computes every token through every block as well (the ``best``
columns): the two dense rows, and the settings that remove nothing (token fraction 1, e.g.
PAUMER's tau 0), which run the same dense computation through the token runtime's graphs and
fused kernels. The target is judged against that strongest dense pass, so that no speed-up
comes from a faster implementation rather than from the tokens removed. A setting whose
network can be captured the same way (its shapes do not follow the content: PAUMER, fixed-S CTS)
gets a row ``NAME-graphed`` too, kept only where the graph, replayed on other images (the batch
mirrored), gives the eager network's classes (:data:`REPLAY_AGREEMENT`). Evaluations
are cached in ``evaluations.jsonl`` (a rerun after a kill skips them); timings are always
redone, so every setting is timed beside the baseline in the same process. Nothing here knows
a method: everything comes from the config and the cost records.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch


__all__ = [
    "DENSE", "DENSE_GRAPHED", "Setting", "SweepRow", "computes_every_token", "flop_time_share", "format_sweep_markdown", "format_sweep_table",
    "load_sweep", "parse_settings", "run_sweep",
    "split_shared_overrides", "write_sweep",
]

#: Name of the dense baseline's row.
DENSE = "dense"
#: Name of the row of the dense baseline replayed as one CUDA graph (CUDA only).
DENSE_GRAPHED = "dense-graphed"
#: the name ending of the rows replayed as one CUDA graph (``dense-graphed``, ``NAME-graphed``)
GRAPHED_SUFFIX = "-graphed"


@dataclass
class Setting:
    """A named set of ``KEY VALUE`` config overrides."""

    name: str
    overrides: List[str] = field(default_factory=list)


@dataclass
class SweepRow:
    name: str
    overrides: List[str]
    miou: float
    gflops: float  # mean per image over the evaluation
    live_tokens: float  # mean live patch tokens per block and image
    token_fraction: float
    ms_b8: float = math.nan  # median latency of one batch
    ips_b8: float = math.nan
    ms_b1: float = math.nan
    ips_b1: float = math.nan
    timed_gflops: float = math.nan  # mean GFLOPs of the timed images
    speedup_b8: float = math.nan
    speedup_b1: float = math.nan
    share_b8: float = math.nan  # share of the FLOP reduction that became time
    share_b1: float = math.nan
    # the same against the faster of the dense rows (eager or one CUDA graph) at that batch size
    speedup_best_b8: float = math.nan
    speedup_best_b1: float = math.nan
    share_best_b8: float = math.nan
    share_best_b1: float = math.nan


def parse_settings(specs: Sequence[Sequence[str]]) -> List[Setting]:
    """``[["tau0.4", "KEY", "VALUE", ...], ...]`` -> settings (names unique, pairs complete)."""
    settings = []
    for spec in specs:
        if not spec or len(spec) % 2 != 1:
            raise ValueError(f"a setting is NAME followed by KEY VALUE pairs, got {list(spec)}")
        settings.append(Setting(spec[0], list(spec[1:])))
    names = [s.name for s in settings]
    if DENSE in names or DENSE_GRAPHED in names or len(set(names)) != len(names):
        raise ValueError(f"setting names must be distinct and not '{DENSE}' or '{DENSE_GRAPHED}' (the baselines'): {names}")
    return settings


def split_shared_overrides(argv: Sequence[str]) -> Tuple[List[str], List[str]]:
    """``[..., "--", KEY, VALUE, ...]`` -> (the arguments before ``--``, the overrides after it).

    ``--setting NAME KEY VALUE ...`` takes every word up to the next option, so overrides meant
    for every row, written after the last setting, would silently become that setting's alone;
    behind ``--`` they are every row's."""
    argv = list(argv)
    if "--" not in argv:
        return argv, []
    i = argv.index("--")
    return argv[:i], argv[i + 1:]


def flop_time_share(t_dense: float, t: float, flop_ratio: float) -> float:
    """Share of the FLOP reduction ``1 - flop_ratio`` that became time: 1 = time fell as much as FLOPs."""
    saved = t_dense * (1.0 - flop_ratio)
    return (t_dense - t) / saved if saved > 0 else math.nan


#: the means of the cost task (EfficiencyEvaluator) the sweep reports: GFLOPs, live tokens, token fraction
COST_FIELDS = ("gflops", "live_tokens_mean", "token_fraction_mean")


def build_trained(cfg, device: str):
    """The model of ``cfg`` on ``device`` in eval mode, from ``MODEL.WEIGHTS`` (a model without a
    token reducer ignores a checkpoint's ``token_reducer.*`` keys; anything else must match)."""
    from ..checkpoint import load_weights
    from ..architectures import build_model

    model = build_model(cfg)
    if not cfg.MODEL.WEIGHTS:
        raise ValueError("trained weights are needed here: set MODEL.WEIGHTS (or --weights)")
    report = load_weights(model, cfg.MODEL.WEIGHTS, allow_unexpected=True)
    stray = [k for k in report.unexpected_keys if not k.startswith("token_reducer.")]
    if stray or (report.unexpected_keys and getattr(model, "token_reducer", None) is not None):
        raise ValueError(f"{cfg.MODEL.WEIGHTS} holds keys this model does not have: {(stray or report.unexpected_keys)[:10]}")
    return model.to(device).eval()


def _evaluate(cfg, model, out_dir: str) -> Dict[str, float]:
    from ..data import build_detection_test_loader
    from .build import build_evaluators
    from .efficiency import EfficiencyEvaluator
    from .evaluator import DatasetEvaluators, inference_on_dataset

    name = cfg.DATASETS.TEST[0]
    evaluators = DatasetEvaluators(list(build_evaluators(cfg, name, out_dir, model.tasks)) + [EfficiencyEvaluator(model)])
    results = inference_on_dataset(model, build_detection_test_loader(cfg, name), evaluators)
    if "sem_seg" not in results:
        raise ValueError(f"{name} gave no semantic results (mIoU); the sweep needs a semantic dataset")
    cost = results.get("cost", {})
    missing = [f for f in COST_FIELDS if f not in cost]
    if missing:
        raise ValueError(f"the model's cost records lack {missing} (the cost task has {sorted(cost)}): the sweep needs them")
    return {"miou": float(results["sem_seg"]["mIoU"]), **{f.replace("_mean", ""): float(cost[f]) for f in COST_FIELDS}}


def timed_inputs(cfg, count: int) -> List[Dict[str, Any]]:
    """The first ``count`` images of ``DATASETS.TEST[0]`` as the test mapper gives them."""
    from ..data import build_detection_test_loader

    inputs: List[Dict[str, Any]] = []
    for batch in build_detection_test_loader(cfg, cfg.DATASETS.TEST[0]):
        inputs += batch
        if len(inputs) >= count:
            return inputs[:count]
    raise ValueError(f"{cfg.DATASETS.TEST[0]} has {len(inputs)} images; timing batch {count} needs as many")


def _time(model, inputs: List[Dict[str, Any]], batches: Sequence[int], dtype: str, warmup: int, iters: int,
          graphed: bool = False) -> Dict[str, float]:
    """Latency and images/s of ``model.network`` at each batch size (``graphed``: replayed as one
    CUDA graph per batch size), and the timed images' GFLOPs."""
    from .throughput import GraphedForward, time_forward

    with torch.no_grad():
        timed_gflops = [float(out["cost"]["gflops"]) for out in model(inputs[: max(batches)])]
    out = {"timed_gflops": sum(timed_gflops) / len(timed_gflops)}
    forward = GraphedForward(lambda x: model.network(x)) if graphed else (lambda x: model.network(x))
    for batch in batches:
        images = model.preprocess_image(inputs[:batch]).tensor
        ms, ips = time_forward(forward, images, dtype, warmup, iters)
        out[f"ms_b{batch}"], out[f"ips_b{batch}"] = ms, ips
    return out


#: overrides of a second attempt at a setting's graphed row: the runtime's own graphs off, for
#: when a graph cannot be replayed inside the capture of another
EAGER_RUNTIME = ["MODEL.TOKEN_REDUCTION.CUDA_GRAPHS", "False"]
#: a graphed row must give the eager classes of this share of the pixels of images it was not captured on
REPLAY_AGREEMENT = 0.999


def replay_agreement(model, inputs: List[Dict[str, Any]], dtype: str) -> float:
    """Share of pixels whose class ``model.network`` replayed as one CUDA graph, captured on
    ``inputs``, gives as the eager network does on other images (the batch mirrored): below 1
    where the capture froze something of the content it saw (a count, a choice of tokens)."""
    from .throughput import DTYPES, GraphedForward

    images = model.preprocess_image(inputs).tensor
    graphed = GraphedForward(lambda x: model.network(x))
    with torch.inference_mode(), torch.autocast(images.device.type, dtype=DTYPES[dtype], enabled=dtype != "fp32"):
        graphed(images)
        other = images.flip(-1)
        replayed, eager = graphed(other), model.network(other)
        if not (isinstance(eager, torch.Tensor) and eager.dim() == 4):
            raise ValueError(f"{type(model).__name__}.network() gives no B x K x H x W logits to compare")
        return float((replayed.argmax(1) == eager.argmax(1)).float().mean())


def _graphed_row(source: SweepRow, name: str, builders: Sequence[Any], inputs: List[Dict[str, Any]], dtype: str,
                 warmup: int, iters: int, log) -> Optional[SweepRow]:
    """``source``'s row timed with its network replayed as one CUDA graph: the first model of
    ``builders`` (callables -> model) that can be captured and whose replay on other images
    gives the eager classes; None, with each reason logged, when none can."""
    log(f"[sweep] timing {name}")
    for i, build in enumerate(builders):
        model = build()
        try:
            agreement = replay_agreement(model, inputs, dtype)
            if agreement < REPLAY_AGREEMENT:
                raise ValueError(f"replayed on other images it gives the eager class on {agreement:.2%} of the pixels "
                                 f"(at least {REPLAY_AGREEMENT:.1%} needed): the capture froze what it saw")
            timings = _time(model, inputs, (8, 1), dtype, warmup, iters, graphed=True)
        except (RuntimeError, ValueError) as e:  # a host sync or a shape change cannot be captured
            log(f"[sweep] {name}, attempt {i + 1} of {len(builders)}: not replayable as one CUDA graph: {e}")
            continue
        finally:
            del model
        row = SweepRow(name, source.overrides + ["(replayed as one CUDA graph)"], source.miou, source.gflops,
                       source.live_tokens, source.token_fraction)
        for key, value in timings.items():
            setattr(row, key, value)
        return row
    log(f"[sweep] {name} left out")
    return None


def run_sweep(
    config_file: str,
    settings: Sequence[Setting],
    out_dir: str,
    opts: Sequence[str] = (),
    dense_weights: str = "",
    dtype: str = "bf16",
    warmup: int = 10,
    iters: int = 30,
    device: Optional[str] = None,
    log=print,
    graph_dense: Optional[bool] = None,
    graph_settings: Optional[bool] = None,
) -> List[SweepRow]:
    """The rows of the dense baseline (with ``graph_dense``, default: on CUDA, also the row
    ``dense-graphed``) and every setting (with ``graph_settings``, default: on CUDA, also the row
    ``NAME-graphed`` of each setting whose network replays as one CUDA graph: those whose shapes
    do not follow the content, such as PAUMER's or fixed-S CTS's); writes ``sweep.csv``,
    ``sweep.json`` and ``sweep.png`` to ``out_dir``."""
    from ..config import setup_cfg

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    graph_dense = device.startswith("cuda") if graph_dense is None else graph_dense
    graph_settings = device.startswith("cuda") if graph_settings is None else graph_settings
    taken = {s.name for s in settings} & {s.name + GRAPHED_SUFFIX for s in settings}
    if graph_settings and taken:
        raise ValueError(f"setting names {sorted(taken)} are the names of other settings' graphed rows")
    os.makedirs(out_dir, exist_ok=True)
    cache_path = os.path.join(out_dir, "evaluations.jsonl")
    cache = _read_cache(cache_path)
    dense = Setting(DENSE, ["MODEL.TOKEN_REDUCTION.NAME", ""] + (["MODEL.WEIGHTS", dense_weights] if dense_weights else []))
    rows: List[SweepRow] = []
    timed: List[Dict[str, Any]] = []
    for setting in [dense, *settings]:
        def build(extra: Sequence[str] = (), setting: Setting = setting):
            cfg = setup_cfg(config_file, list(opts) + setting.overrides + list(extra)
                            + ["OUTPUT_DIR", os.path.join(out_dir, setting.name)])
            return cfg, build_trained(cfg, device)

        cfg, model = build()
        key = json.dumps([setting.name, setting.overrides, list(opts), cfg.MODEL.WEIGHTS])
        if key not in cache:
            log(f"[sweep] evaluating {setting.name} {' '.join(setting.overrides)}")
            cache[key] = _evaluate(cfg, model, os.path.join(out_dir, setting.name))
            _append_cache(cache_path, key, cache[key])
        row = SweepRow(setting.name, setting.overrides, **{k: cache[key][k] for k in ("miou", "gflops", "live_tokens", "token_fraction")})
        log(f"[sweep] timing {setting.name}")
        timed = timed or timed_inputs(cfg, 8)  # the same images for every setting
        for name, value in _time(model, timed, (8, 1), dtype, warmup, iters).items():
            setattr(row, name, value)
        rows.append(row)
        if (setting is dense and graph_dense) or (setting is not dense and graph_settings):
            builders = [lambda model=model: model]
            if setting is not dense:
                builders.append(lambda build=build: build(EAGER_RUNTIME)[1])
            graphed = _graphed_row(row, DENSE_GRAPHED if setting is dense else setting.name + GRAPHED_SUFFIX, builders,
                                   timed, dtype, warmup, iters, log)
            rows += [graphed] if graphed is not None else []
            del builders
        del model
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
    _compare(rows)
    write_sweep(rows, out_dir, title=os.path.splitext(os.path.basename(config_file))[0])
    return rows


def computes_every_token(row: SweepRow) -> bool:
    """A dense pass: a dense row, or a setting whose every cell's token went through every block."""
    return row.name in (DENSE, DENSE_GRAPHED) or row.token_fraction >= 1.0 - 1e-9


def _compare(rows: List[SweepRow]) -> None:
    """Speed-ups and FLOP->time shares against the dense row (the first), and against the fastest
    row that computes every token (:func:`computes_every_token`) at each batch size."""
    base = rows[0]
    baselines = [r for r in rows if computes_every_token(r)]
    for row in rows:
        ratio = row.timed_gflops / base.timed_gflops
        for b in (8, 1):
            t, t0 = getattr(row, f"ms_b{b}"), getattr(base, f"ms_b{b}")
            best = min(getattr(r, f"ms_b{b}") for r in baselines)
            setattr(row, f"speedup_b{b}", getattr(row, f"ips_b{b}") / getattr(base, f"ips_b{b}"))
            setattr(row, f"share_b{b}", flop_time_share(t0, t, ratio) if row is not base else math.nan)
            setattr(row, f"speedup_best_b{b}", best / t)
            setattr(row, f"share_best_b{b}", flop_time_share(best, t, ratio) if not computes_every_token(row) else math.nan)


def _read_cache(path: str) -> Dict[str, Dict[str, float]]:
    cache: Dict[str, Dict[str, float]] = {}
    if os.path.isfile(path):
        with open(path) as f:
            for line in f:
                if line.strip():
                    entry = json.loads(line)
                    cache[entry["key"]] = entry["result"]
    return cache


def _append_cache(path: str, key: str, result: Dict[str, float]) -> None:
    """One JSON line per finished evaluation, flushed to disk before the next starts."""
    with open(path, "a") as f:
        f.write(json.dumps({"key": key, "result": result}) + "\n")
        f.flush()
        os.fsync(f.fileno())


# ---------------------------------------------------------------------- reports
_COLUMNS = (
    ("setting", "name", "{}"), ("mIoU", "miou", "{:.2f}"), ("GFLOPs", "gflops", "{:.4g}"),
    ("tokens", "live_tokens", "{:.0f}"), ("img/s b8", "ips_b8", "{:.1f}"), ("img/s b1", "ips_b1", "{:.1f}"),
    ("speed-up b8", "speedup_b8", "{:.2f}x"), ("speed-up b1", "speedup_b1", "{:.2f}x"),
    ("FLOP->time b8", "share_b8", "{:.2f}"), ("FLOP->time b1", "share_b1", "{:.2f}"),
    ("vs best b8", "speedup_best_b8", "{:.2f}x"), ("vs best b1", "speedup_best_b1", "{:.2f}x"),
    ("FLOP->time best b8", "share_best_b8", "{:.2f}"),
)
#: A setting that cuts GFLOPs by at least CUT must be SPEEDUP x faster at batch 8 and turn SHARE
#: of its FLOP reduction into time there.
TARGET = {"cut": 0.30, "speedup": 1.25, "share": 0.80}


def _target(row: SweepRow, dense: SweepRow) -> str:
    """Against the fastest dense pass (the ``best`` columns) where they exist, else the dense row."""
    if computes_every_token(row) or not row.gflops < (1 - TARGET["cut"]) * dense.gflops:
        return "-"
    best = not math.isnan(row.speedup_best_b8)
    speedup, share = (row.speedup_best_b8, row.share_best_b8) if best else (row.speedup_b8, row.share_b8)
    return "met" if speedup >= TARGET["speedup"] and share >= TARGET["share"] else "missed"


def _cells(rows: Sequence[SweepRow]) -> Tuple[List[str], List[List[str]]]:
    """Column titles and the formatted cells of every row (``-`` where a value does not apply)."""
    def fmt(row: SweepRow, attr: str, spec: str) -> str:
        value = getattr(row, attr)
        return "-" if isinstance(value, float) and math.isnan(value) else spec.format(value)

    titles = [t for t, _, _ in _COLUMNS] + ["target"]
    return titles, [[fmt(r, attr, spec) for _, attr, spec in _COLUMNS] + [_target(r, rows[0])] for r in rows]


def format_sweep_markdown(rows: Sequence[SweepRow]) -> str:
    """The sweep as a Markdown table, the GFLOPs with their cut against the dense row (e.g.
    ``187.1 (-34%)``): for reports, so that no figure is copied by hand."""
    titles, cells = _cells(rows)
    g = titles.index("GFLOPs")
    for row, cell in zip(rows, cells):
        if row.name not in (DENSE, DENSE_GRAPHED) and rows[0].gflops > 0:
            cell[g] += f" ({row.gflops / rows[0].gflops - 1:+.0%})"
    return "\n".join(["| " + " | ".join(titles) + " |", "|" + " --- |" * len(titles),
                      *("| " + " | ".join(c) + " |" for c in cells)])


def format_sweep_table(rows: Sequence[SweepRow], dtype: str = "bf16") -> str:
    """One line per row: mIoU, GFLOPs, mean live tokens, images/s at batch 8 and 1, speed-ups and
    FLOP->time shares against the dense row (the first) and against the fastest dense pass at each
    batch size (``vs best``), and whether the row meets :data:`TARGET` (judged on the latter)."""
    titles, cells = _cells(rows)
    widths = [max(len(t), *(len(c[i]) for c in cells)) for i, t in enumerate(titles)]

    def line(values: Sequence[str]) -> str:
        return "  ".join(v.rjust(w) if i else v.ljust(w) for i, (v, w) in enumerate(zip(values, widths)))

    return "\n".join([
        f"images/s: model.network on the first validation images, batch 8 and batch 1, {dtype}; GFLOPs: mean per "
        "image; tokens: mean live patch tokens per block; FLOP->time: (t_dense - t) / (t_dense - t_dense F/F_dense); "
        f"vs best: against the fastest row that computes every token ({DENSE}, {DENSE_GRAPHED} (one CUDA graph), "
        "settings that remove nothing) at that batch size; "
        f"target: a cut of >= {TARGET['cut']:.0%} GFLOPs is >= {TARGET['speedup']}x faster than the best dense "
        f"at batch 8 with FLOP->time >= {TARGET['share']}",
        line(titles), *(line(c) for c in cells),
    ])


def load_sweep(out_dir: str) -> List[SweepRow]:
    """The rows of a finished sweep (``out_dir/sweep.json``)."""
    path = os.path.join(out_dir, "sweep.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no sweep results in {out_dir} (sweep.json)")
    with open(path) as f:
        rows = [SweepRow(**r) for r in json.load(f)]
    if rows and not math.isnan(rows[0].ms_b8):
        _compare(rows)  # the comparisons as defined now, from the stored timings
    return rows


def write_sweep(rows: Sequence[SweepRow], out_dir: str, title: str = "") -> Dict[str, str]:
    """``sweep.csv``, ``sweep.json`` and ``sweep.png`` (mIoU vs images/s at batch 8 and vs GFLOPs)."""
    import csv

    paths = {kind: os.path.join(out_dir, f"sweep.{kind}") for kind in ("csv", "json", "png")}
    records = [asdict(r) for r in rows]
    with open(paths["csv"] + ".tmp", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(records[0]))
        writer.writeheader()
        writer.writerows([{**r, "overrides": " ".join(r["overrides"])} for r in records])
    os.replace(paths["csv"] + ".tmp", paths["csv"])
    with open(paths["json"] + ".tmp", "w") as f:
        json.dump(records, f, indent=2, allow_nan=True)
    os.replace(paths["json"] + ".tmp", paths["json"])
    _plot(rows, paths["png"], title)
    return paths


def _plot(rows: Sequence[SweepRow], path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    dense = rows[0]
    # a NAME-graphed row has its eager twin's mIoU and GFLOPs: its own series, drawn only on the
    # time axis, labelled below its point so that the two labels do not overlap
    graphed = [r for r in rows[1:] if r.name.endswith(GRAPHED_SUFFIX)]
    others = [r for r in rows[1:] if not r.name.endswith(GRAPHED_SUFFIX)]
    for ax, attr, label in ((axes[0], "ips_b8", "images/s (batch 8)"), (axes[1], "gflops", "GFLOPs per image")):
        ax.plot([getattr(r, attr) for r in others], [r.miou for r in others], "o-", label="settings")
        ax.plot([getattr(dense, attr)], [dense.miou], "*", markersize=14, color="black", label=DENSE)
        labelled = [(r, (4, 4)) for r in [dense, *others]]
        if attr != "gflops":
            for r in graphed:
                style = (dict(marker="*", markersize=14, color="grey", label=DENSE_GRAPHED) if r.name == DENSE_GRAPHED
                         else dict(marker="s", color="C1"))
                ax.plot([getattr(r, attr)], [r.miou], linestyle="none", **style)
            labelled += [(r, (4, -10)) for r in graphed]
            if graphed:
                ax.plot([], [], "s", color="C1", label="one CUDA graph")
        for r, offset in labelled:
            ax.annotate(r.name, (getattr(r, attr), r.miou), textcoords="offset points", xytext=offset, fontsize=8)
        ax.set_xlabel(label)
        ax.set_ylabel("mIoU")
        ax.grid(alpha=0.3)
    axes[0].legend(loc="best")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path + ".tmp.png", dpi=120)
    plt.close(fig)
    os.replace(path + ".tmp.png", path)
