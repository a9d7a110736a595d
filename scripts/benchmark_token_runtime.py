#!/usr/bin/env python
"""Does removing tokens remove time? A ViT block stack on a batch whose images keep different
fractions of their tokens, timed against the dense stack in the same run.

    python scripts/benchmark_token_runtime.py --json $OUT/token_runtime.json   # ViT-B, 8 x (1024 + 1) tokens, bf16, CUDA
    python scripts/benchmark_token_runtime.py --device cpu --tiny               # a quick check of the script

Per keep pattern it times three dense baselines (timm's blocks eagerly, the same captured in
one CUDA graph, and the runtime's graph of the dense stack with its token-wise work compiled),
then the stack on the kept tokens run eagerly with each attention implementation and replayed
through ``GraphedBlocks`` with each configuration of ``GRAPH_CONFIGS``
(``eco_m2f/evaluation/token_runtime.py``). Every row is checked against the dense blocks run on
each image's kept tokens alone (relative error). A row passes when
(t_dense - t) >= 0.9 * (t_dense - t_dense * F / F_dense), against eager timm and against the
fastest dense baseline. Times are medians per call of calls issued back to back. The output
ends with a table per pattern (the best configuration, and whether the criterion holds
against each baseline) and the configuration to make ``DEFAULT_INFERENCE``.
"""
from __future__ import annotations

import argparse
import json
import signal
import sys
from pathlib import Path
from typing import Dict, List, Optional

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from eco_m2f.evaluation.throughput import time_back_to_back  # noqa: E402
from eco_m2f.evaluation.token_runtime import (  # noqa: E402
    CRITERION,
    GRAPH_CONFIGS,
    add_stack_arguments,
    build_stack,
    dense_forward,
    flop_ratio,
    keep_counts,
    keep_patterns,
    needed_time,
    per_image_reference,
    relative_error,
    say,
    stack_settings,
    time_share,
)
from eco_m2f.modeling import token_reduction as tr  # noqa: E402

TOLERANCE = 5e-2  # relative error of an image (bf16) above which a run counts as wrong
RECOMMENDABLE_ROW_BUCKET = 16  # exact-row graphs recapture for every new total: not a default


COMPILE_LIMIT_S = 75  # a compilation that takes longer is abandoned (the compiled runs are left out)


class _Stopped(Exception):
    """SIGTERM (e.g. from ``timeout``) or SIGALRM: stop, keep what is finished."""


def _stop(signum, frame) -> None:
    raise _Stopped()


def _capture_dense(blocks, tokens: torch.Tensor):
    """timm's own stack captured in one CUDA graph (a baseline without Python per kernel)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        dense_forward(blocks, tokens)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = dense_forward(blocks, tokens)
    return graph, out


def _uniform_key(opts: tr.InferenceOptions):
    """Configurations that behave alike on a batch of equal lengths share this."""
    return (True, opts.compile, opts.copy_output) if opts.dense_when_uniform else opts


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_stack_arguments(p, budget=0.25)
    p.add_argument("--eager", nargs="+", default=None, help="eager attention implementations (default: flash varlen triton padded on CUDA; padded jagged flex on CPU)")
    p.add_argument("--configs", nargs="+", default=None, help=f"graph configurations (default: all of {list(GRAPH_CONFIGS)})")
    p.add_argument("--no-compile", action="store_true", help="leave out the compiled configurations and baseline")
    p.add_argument("--patterns", nargs="+", default=None, help="subset of the named keep patterns")
    args = p.parse_args(argv)
    device, dtype = stack_settings(p, args)
    cuda = device.type == "cuda"
    patterns = keep_patterns(args.batch)
    chosen = args.patterns or list(patterns)
    unknown = [name for name in chosen if name not in patterns]
    configs = {name: opts for name, opts in GRAPH_CONFIGS.items() if (args.configs is None or name in args.configs) and not (args.no_compile and opts.compile)}
    unknown += [name for name in args.configs or [] if name not in GRAPH_CONFIGS]
    if unknown:
        p.error(f"unknown patterns or configurations {unknown}; patterns: {list(patterns)}; configurations: {list(GRAPH_CONFIGS)}")
    wanted = args.eager or (["flash", "varlen", "triton", "padded"] if cuda else ["padded", "jagged", "flex"])

    n, b = args.tokens, args.batch
    grid = (1, n)  # the runtime never looks at the grid's shape, only at its cell count
    blocks = build_stack(args.depth, args.dim, args.heads, device, dtype)
    gen = torch.Generator(device=device).manual_seed(0)
    tokens = torch.randn(b, 1 + n, args.dim, device=device, dtype=dtype, generator=gen)
    scores = torch.rand(b * n, device=device, generator=gen)
    import timm

    env = {
        "device": torch.cuda.get_device_name(device) if cuda else "cpu",
        "torch": torch.__version__,
        "timm": timm.__version__,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "depth": args.depth, "dim": args.dim, "heads": args.heads, "batch": b, "tokens": n, "dtype": args.dtype,
    }
    say(f"device: {env['device']}; torch {env['torch']} (cuDNN {env['cudnn']}); timm {env['timm']}; {args.depth} blocks dim {args.dim} "
        f"heads {args.heads}; batch {b} x ({n} + 1) tokens; {args.dtype} weights and activations; medians per call, ~{args.budget}s of calls each")
    # untimed set-up: the dense graph, and the compiled dense graph (compiling)
    with torch.inference_mode():
        full = tr.TokenSet.from_dense(tokens, grid)
        dense_graph = _capture_dense(blocks, tokens) if cuda else None
    dense_compiled = tr.GraphedBlocks(blocks, tr.InferenceOptions(compile=True)) if cuda and not args.no_compile else None
    if dense_compiled is not None:
        signal.signal(signal.SIGALRM, _stop)
        signal.alarm(COMPILE_LIMIT_S)
        try:
            with torch.inference_mode():
                dense_compiled(full)
            if not dense_compiled.compiled:  # the runtime fell back to the uncompiled function (and warned why)
                raise RuntimeError("the runtime runs the block function uncompiled")
            say(f"compiled the token-wise block function (shared by every block and row count): first warm-up {dense_compiled.stats['first_warmup_s']:.1f} s")
        except (Exception, _Stopped) as exc:
            why = f"over {COMPILE_LIMIT_S} s" if isinstance(exc, _Stopped) else f"{type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''}"
            say(f"leaving out the compiled runs: compiling the dense graph failed ({why})")
            dense_compiled = None
            configs = {name: opts for name, opts in configs.items() if not opts.compile}
        finally:
            signal.alarm(0)
    eager_impls = []
    for impl in wanted:
        why = tr.attention.attention_unavailable(impl, device, dtype)
        if why:
            say(f"skipping eager attention '{impl}': {why}")
        else:
            eager_impls.append(impl)
    results: Dict[str, object] = {"env": env, "criterion": CRITERION, "tolerance": TOLERANCE, "patterns": {}}

    def dump() -> None:
        if args.json:
            Path(args.json).parent.mkdir(parents=True, exist_ok=True)
            Path(args.json).write_text(json.dumps(results, indent=1))

    def timed(fn) -> Dict[str, float]:
        with torch.inference_mode():
            t = time_back_to_back(fn, args.budget, device)
        return {"t": t.median_ms, "q1": t.q1_ms, "q3": t.q3_ms}

    runners = {name: tr.GraphedBlocks(blocks, opts) for name, opts in configs.items()} if cuda else {}

    say(f"{'pattern':<15}{'run':<7}{'configuration':<40}{'t ms':>9}{'IQR':>7}{'rel err':>9}{'F/F_d':>7}{'share':>7}{'ok':>4}{'ok*':>4}  notes")
    signal.signal(signal.SIGTERM, _stop)
    try:
        _patterns(args, chosen, patterns, results, blocks, tokens, scores, full, dense_graph, dense_compiled, runners, eager_impls, timed, dump, cuda)
        _removal_timings(results, full, scores, patterns, n, timed)
    except _Stopped:
        say("\nstopped by SIGTERM: the summary covers the patterns finished so far")
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    _summary(results, chosen)
    dump()
    return 0


def _patterns(args, chosen, patterns, results, blocks, tokens, scores, full, dense_graph, dense_compiled, runners, eager_impls, timed, dump, cuda) -> None:
    """Every pattern: dense baselines, eager runs, graph runs, end to end; results per pattern."""
    n = args.tokens
    for pattern in chosen:
        keep = keep_counts(patterns[pattern], n)
        with torch.inference_mode():
            reduced = full.keep_topk(scores, keep)
            reference = per_image_reference(blocks, tokens, reduced)
        ratio = flop_ratio(blocks, reduced.layout.lengths, full.layout.lengths)
        entry: Dict[str, object] = {"keep": keep, "lengths": list(reduced.layout.lengths), "flop_ratio": ratio, "rows": []}
        results["patterns"][pattern] = entry

        baselines = {"eager timm": timed(lambda: dense_forward(blocks, tokens))}
        if dense_graph is not None:
            baselines["graphed timm"] = timed(dense_graph[0].replay)
        if dense_compiled is not None:
            try:
                baselines["graphed compiled"] = timed(lambda: dense_compiled(full))
                entry["compile_s"] = dense_compiled.stats["first_warmup_s"]
            except Exception as exc:  # then the compiled runs below fail alike and say why
                say(f"{pattern:<15}{'dense':<7}{'graphed compiled':<40} failed: {type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''}")
                dense_compiled = None
        t_dense = baselines["eager timm"]["t"]
        t_fastest = min(v["t"] for v in baselines.values())

        def row(kind: str, label: str, run, stats: Optional[Dict[str, float]] = None) -> None:
            before = dict(stats or {})
            try:
                with torch.inference_mode():
                    err = relative_error(run(reduced).x, reference, reduced.layout.lengths)
                timing = timed(lambda: run(reduced))
            except Exception as exc:  # one configuration failing must not hide the others' figures
                message = f"{type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''}"
                say(f"{pattern:<15}{kind:<7}{label:<40} failed: {message}")
                entry["rows"].append({"kind": kind, "label": label, "failed": message})
                return
            record = {"kind": kind, "label": label, **timing, "err": err}
            if stats:  # this run's captures: warm-up (with any compilation) and capture seconds
                record.update({key: stats[key] - before[key] for key in ("captures", "warmup_s", "capture_s")})
            entry["rows"].append(record)
            t = timing["t"]
            notes = "WRONG" if err > TOLERANCE else ""
            if record.get("captures"):
                notes += f" {record['captures']:.0f} capture(s): warm-up {record['warmup_s']:.2f} s, capture {record['capture_s']:.2f} s"
            say(f"{pattern:<15}{kind:<7}{label:<40}{t:>9.3f}{timing['q3'] - timing['q1']:>7.3f}{err:>9.1e}{ratio:>7.3f}"
                f"{time_share(t_dense, t, ratio):>7.2f}{'yes' if t <= needed_time(t_dense, ratio) else 'NO':>4}"
                f"{'yes' if t <= needed_time(t_fastest, ratio) else 'NO':>4}  {notes.strip()}")

        for label, timing in baselines.items():
            say(f"{pattern:<15}{'dense':<7}{label:<40}{timing['t']:>9.3f}{timing['q3'] - timing['q1']:>7.3f}")
        uniform = reduced.layout.uniform
        for impl in (["auto"] if uniform else eager_impls):
            row("eager", "dense view" if uniform else impl, lambda ts, impl=impl: tr.run_blocks(blocks, ts, impl))
        seen: Dict[object, dict] = {}
        for name, runner in runners.items():
            label = f"{name}: {runner.options.label()}"
            if uniform:
                key = _uniform_key(runner.options)
                if key in seen:  # the same graph as an earlier configuration: its figures stand for this one
                    entry["rows"].append({**seen[key], "label": label, "same_as": seen[key]["label"]})
                    continue
            row("graph", label, runner, runner.stats)
            if uniform and "failed" not in entry["rows"][-1]:
                seen[key] = entry["rows"][-1]
        baselines["eager timm (again)"] = timed(lambda: dense_forward(blocks, tokens))
        entry["baselines"] = baselines
        drift = baselines["eager timm (again)"]["t"] / baselines["eager timm"]["t"] - 1
        say(f"{pattern:<15}{'dense':<7}{'eager timm (again)':<40}{baselines['eager timm (again)']['t']:>9.3f}  drift {100 * drift:+.1f}%")
        _end_to_end(entry, pattern, full, scores, keep, blocks, runners, timed, cuda)
        for runner in runners.values():
            runner.reset()  # free this pattern's graphs
        dump()


def _correct_rows(entry) -> List[dict]:
    return [r for r in entry["rows"] if "failed" not in r and r["err"] <= TOLERANCE]


def _end_to_end(entry, pattern, full, scores, keep, blocks, runners, timed, cuda) -> None:
    """Removal before and dense reassembly after the blocks, for the fastest graph configuration
    and the one before these options (eager on CPU)."""
    rows = _correct_rows(entry)
    graph_rows = [r for r in rows if r["kind"] == "graph" and "same_as" not in r]
    picks = sorted(graph_rows, key=lambda r: r["t"])[:1] + [r for r in graph_rows if r["label"].startswith("before:")]
    if not cuda:
        picks = sorted(rows, key=lambda r: r["t"])[:1]
    for record in {r["label"]: r for r in picks}.values():
        name = record["label"].split(":")[0]
        impl = "auto" if record["label"] == "dense view" else record["label"]
        run = runners[name] if record["kind"] == "graph" else (lambda ts, impl=impl: tr.run_blocks(blocks, ts, impl))

        def end_to_end():
            ts = full.keep_topk(scores, keep, save_features=True)
            return run(ts).to_dense()

        record["e2e"] = timed(end_to_end)["t"]
        say(f"{pattern:<15}{'e2e':<7}{record['label']:<40}{record['e2e']:>9.3f}  (removal + blocks + to_dense)")


def _removal_timings(results, full, scores, patterns, n, timed) -> None:
    say("\nremoval and reassembly alone (mixed 25-100%):")
    keep = keep_counts(patterns["mixed 25-100%"], n)
    with torch.inference_mode():
        mask = full.keep_topk(scores, keep).live_cells().view(-1)
        kept = full.keep(mask, save_features=True)
    ops = {
        "keep_topk (k known on the host, no sync)": lambda: full.keep_topk(scores, keep),
        "keep by mask (one host sync for the counts)": lambda: full.keep(mask),
        "keep by mask + save features": lambda: full.keep(mask, save_features=True),
        "to_dense (live + saved features)": lambda: kept.to_dense(),
        "padded view of the live patches": lambda: kept.padded(),
    }
    results["removal"] = {}
    for label, fn in ops.items():
        results["removal"][label] = timed(fn)["t"]
        say(f"  {label:<46}{results['removal'][label]:>9.3f} ms")


def _summary(results, chosen) -> None:
    """The last table: per pattern the best configuration and the criterion against eager timm
    and against the fastest dense baseline; then the graph configuration to make the default."""
    say(f"\nsummary: t must be <= t_dense - {CRITERION} (t_dense - t_dense F/F_dense); 'need' is that bound for eager timm and for the fastest dense baseline")
    say(f"{'pattern':<15}{'F/F_d':>6}{'eager':>8}{'graph':>8}{'compil':>8}  {'best reduced run':<44}{'t ms':>8}{'need':>8}{'ok':>4}{'need*':>8}{'ok*':>4}")
    totals: Dict[str, List[float]] = {}
    summary = {}
    for pattern in chosen:
        entry = results["patterns"].get(pattern)
        if not entry or "baselines" not in entry:
            continue
        base = {k: v["t"] for k, v in entry["baselines"].items()}
        t_eager = (base.pop("eager timm") + base.pop("eager timm (again)")) / 2  # timed before and after the pattern
        dense = {"eager timm": t_eager, **base}
        best_name = min(dense, key=dense.get)
        t_best_dense = dense[best_name]
        ratio = entry["flop_ratio"]
        rows = _correct_rows(entry)
        for r in rows:
            if r["kind"] == "graph":
                ok = r["t"] <= needed_time(t_best_dense, ratio)
                totals.setdefault(r["label"], []).append((ok, r["t"], pattern))
        if not rows:
            say(f"{pattern:<15} no correct run")
            continue
        best = min(rows, key=lambda r: r["t"])
        need, need_best = needed_time(t_eager, ratio), needed_time(t_best_dense, ratio)
        summary[pattern] = {"best": best["label"], "t": best["t"], "need_vs_eager": need, "need_vs_best_dense": need_best,
                            "best_dense": best_name, "ok_vs_eager": best["t"] <= need, "ok_vs_best_dense": best["t"] <= need_best}
        graph, compiled = base.get("graphed timm", float("nan")), base.get("graphed compiled", float("nan"))
        say(f"{pattern:<15}{ratio:>6.3f}{t_eager:>8.3f}{graph:>8.3f}{compiled:>8.3f}  {best['kind'] + ' ' + best['label']:<44.44}{best['t']:>8.3f}"
            f"{need:>8.3f}{'yes' if best['t'] <= need else 'NO':>4}{need_best:>8.3f}{'yes' if best['t'] <= need_best else 'NO':>4}")
    results["summary"] = summary
    if not totals:
        return
    complete = {label: v for label, v in totals.items() if len(v) == max(len(v) for v in totals.values())}
    ranked = sorted(complete.items(), key=lambda item: (-sum(ok for ok, _, _ in item[1]), sum(t for _, t, _ in item[1])))
    say("\ngraph configurations over all patterns (patterns passing against the fastest dense baseline, summed t):")
    for label, v in ranked:
        say(f"  {label:<52}{sum(ok for ok, _, _ in v)}/{len(v)}{sum(t for _, t, _ in v):>9.3f} ms")
    recommendable = [(label, v) for label, v in ranked if _recommendable(label)]
    if recommendable:
        name = recommendable[0][0].split(":")[0]
        opts = GRAPH_CONFIGS[name]
        line = (f"DEFAULT_INFERENCE = InferenceOptions(attention=\"{opts.attention}\", row_bucket={opts.row_bucket}, len_bucket={opts.len_bucket}, "
                f"dense_when_uniform={opts.dense_when_uniform}, compile={opts.compile})")
        results["recommended"] = {"config": name, "line": line}
        say(f"recommended default (eco_m2f/modeling/token_reduction/options.py): {line}")


def _recommendable(label: str) -> bool:
    """A default must bucket rows (else every new total recaptures) and return owned rows."""
    opts = GRAPH_CONFIGS[label.split(":")[0]]
    return opts.row_bucket >= RECOMMENDABLE_ROW_BUCKET and opts.copy_output


if __name__ == "__main__":
    raise SystemExit(main())
