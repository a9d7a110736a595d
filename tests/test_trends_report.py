"""The trends report (eco_m2f/eco/trends_report.py) on a constructed trends directory: every
table takes its numbers from the right file, the trend beta is found from the extra sweeps, and
missing or broken files are reported by name."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from eco_m2f.eco.trends_report import collect, format_report, write_report

GFLOPS = {2: 2.0, 3: 3.0, 4: 4.0, 5: 5.0, 6: 6.0}


def _exits(pq_by_exit):
    return [{"exit": k, "PQ": pq, "PQ_th": pq / 2, "PQ_st": pq * 1.5, "gflops_encoder": GFLOPS[k], "gflops": 10 + GFLOPS[k]}
            for k, pq in pq_by_exit.items()]


def _row(kind, key, pq, mean_exit, enc, hist):
    return {"kind": kind, "exit_or_beta": key, "PQ": pq, "PQ_th": pq / 2, "PQ_st": pq * 1.5, "mean_exit": mean_exit,
            "encoder_gflops": enc, "total_gflops": 10 + enc, "result": {"exit_histogram": hist}}


def _write(path: Path, value) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(value))


@pytest.fixture
def trends(tmp_path):
    out = tmp_path / "trends"
    _write(out / "baseline_exits.json", _exits({2: 26.9, 3: 18.2, 4: 39.1, 5: 49.6, 6: 61.8}))
    _write(out / "stepA_usd_exits.json", _exits({2: 50.0, 3: 52.0, 4: 55.0, 5: 57.0, 6: 58.0}))
    _write(out / "stepA_wsd_exits.json", _exits({2: 48.0, 3: 53.0, 4: 56.0, 5: 59.0, 6: 60.5}))
    _write(out / "exit_complexity.json", [{
        "field": "objects", "quality": "pq", "exits": [2, 3, 4, 5, 6], "images": 6, "spearman": 0.71,
        "buckets": [{"range": [1, 5], "images": 3, "mean_best_exit": 2.33, "best_exit_histogram": {"2": 2, "3": 1, "6": 0}},
                    {"range": [6, 77], "images": 3, "mean_best_exit": 5.67, "best_exit_histogram": {"5": 1, "6": 2}}]}])
    fixed = [_row("fixed", k, pq, float(k), GFLOPS[k], {str(k): 48}) for k, pq in {2: 48.0, 3: 53.0, 4: 56.0, 5: 59.0, 6: 60.5}.items()]
    _write(out / "derived" / "sweep" / "sweep.json", fixed + [
        _row("gated", 0.001, 60.1, 5.1, 5.1, {"4": 10, "5": 18, "6": 20}),
        _row("gated", 0.002, 59.0, 4.2, 4.2, {"2": 8, "4": 20, "6": 20})])
    _write(out / "derived" / "sweep_k4" / "sweep.json", [_row("gated", 0.002, 56.5, 3.4, 3.4, {"2": 20, "4": 28})])
    _write(out / "derived" / "sweep_soft-CE" / "sweep.json", [_row("gated", 0.002, 58.2, 4.0, 4.0, {"3": 48})])
    _write(out / "wall_time_gated.json", [{"batch": 8, "dtype": "bf16", "latency_ms": 20.0, "images_per_s": 400.0}])
    _write(out / "wall_time_6.json", [{"batch": 8, "dtype": "bf16", "latency_ms": 25.0, "images_per_s": 320.0}])
    return out


def test_every_table_takes_its_numbers_from_its_file(trends):
    report = collect(trends)
    assert report["trend_beta"] == 0.002  # from the K_user and gate-loss sweeps
    assert report["exits"]["baseline_exits"][3]["PQ"] == 18.2
    assert sorted(report["k_user"]) == [4, 6] and report["k_user"][6]["PQ"] == 59.0 and report["k_user"][4]["PQ"] == 56.5
    assert list(report["gate_losses"]) == ["hard-CE", "soft-CE"] and report["gate_losses"]["soft-CE"]["PQ"] == 58.2
    text = format_report(report)
    assert "| baseline (parent, encoder cut) | 26.9 | 18.2 | 39.1 | 49.6 | 61.8 |" in text
    assert "| WSD step A | 24.0 | 26.5 | 28.0 | 29.5 | 30.2 |" in text  # the PQ_th table (half of PQ here)
    assert "2: 2, 3: 1, 5: 1, 6: 2" in text  # step B's histogram over both buckets, empty exits left out
    assert "| 1-5 | 3 | 2.33 | 2: 2, 3: 1 |" in text and "Spearman rho 0.71" in text
    assert "| gated, beta 0.002 | 59.0 | 29.5 | 88.5 | 4.20 | 4.20 (-30%) | 2: 8, 4: 20, 6: 20 |" in text
    assert "| K_user 4 | 56.5 | 28.2 | 84.8 | 3.40 | 3.40 (-43%) | 2: 20, 4: 28 |" in text
    assert "| gated, beta 0.002 | 8 | bf16 | 20.00 | 400.0 | 4.20 |" in text and "| exit 6 | 8 | bf16 | 25.00 | 320.0 | 6.00 |" in text
    assert text.index("K_user 6") < text.index("K_user 4")


def test_a_stage_stopped_part_way_reports_what_it_finished(trends):
    for name in ("stepA_usd_exits.json", "stepA_wsd_exits.json", "exit_complexity.json", "wall_time_gated.json", "wall_time_6.json"):
        (trends / name).unlink()
    for d in ("sweep", "sweep_k4", "sweep_soft-CE"):
        (trends / "derived" / d / "sweep.json").unlink()
    written = write_report(trends)
    text = written["md"].read_text()
    assert "| baseline (parent, encoder cut) |" in text and "USD" not in text
    assert "beta sweep" not in text and "Wall time" not in text and "Step B" not in text
    assert written["png"].is_file() and json.loads(written["json"].read_text())["trend_beta"] is None


def test_bad_inputs_are_named(trends, tmp_path):
    with pytest.raises(FileNotFoundError, match="no such trends output directory"):
        collect(tmp_path / "nowhere")
    _write(trends / "derived" / "sweep_k5" / "sweep.json", [_row("gated", 0.01, 50.0, 3.0, 3.0, {"3": 48})])
    with pytest.raises(ValueError, match="several betas"):
        collect(trends)
    assert collect(trends, trend_beta=0.01)["k_user"][5]["PQ"] == 50.0
    (trends / "baseline_exits.json").write_text("{not json")
    with pytest.raises(ValueError, match="baseline_exits.json: not valid JSON"):
        collect(trends, trend_beta=0.002)
