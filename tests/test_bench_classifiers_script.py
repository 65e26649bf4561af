"""benchmarks/bench_classifiers.py runs end to end on a small problem: every estimator, the floor in
interleaved pairs, the verdict lines and the JSON document (its figures are machine-dependent; the
full-size figures are in docs/benchmarks.md)."""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_classifiers.py"


@pytest.mark.slow
@pytest.mark.timeout(600)  # the script's own limit is 300 s; let it report first
def test_small_run_end_to_end(tmp_path):
    out = tmp_path / "bench.json"
    argv = ["--small", "--queries", "300", "--repeats", "2", "--ref-heads", "1", "--ref-queries", "20"]
    argv += ["--workdir", str(tmp_path / "data"), "--json", str(out)]
    run = subprocess.run([sys.executable, str(SCRIPT), *argv], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    text = run.stdout
    doc = json.loads(out.read_text())

    assert [r["method"] for r in doc["rows"]] == ["SAV", "CALM-global", "CALM"]
    for row in doc["rows"]:
        assert row["queries"] == 300 and row["fit_s"] > 0 and row["predict_s"] > 0
        assert row["accuracy"] > 0.2  # 50 classes: ten times chance (measured: SAV 0.42, CALM 0.95)
        assert row["steal_s"] is None or row["steal_s"] >= 0
        assert 0 < row["peak_gib"] < 2
    assert len(doc["pairs"]) == 2
    for pair in doc["pairs"]:
        assert pair["wall"] == pytest.approx(pair["calm_s"] / pair["floor_s"])
    assert doc["calm_over_floor"] == pytest.approx(statistics.median(p["wall"] for p in doc["pairs"]))
    floor = doc["floor"]
    assert floor["total_s"] == pytest.approx(floor["support_s"] + floor["query_s"])
    assert floor["support64_s"] > 0 and floor["exp2_total_s"] > 0
    assert doc["calm_over_floor"] > 0 and doc["speedup"] > 1
    assert sorted(int(q) for q in doc["flat_memory_gib"]) == [30, 300]

    verdict = next(line for line in text.splitlines() if line.startswith("CALM fit + predict = "))
    expected = "PASS" if doc["calm_over_floor"] <= 1.25 else "FAIL"
    assert f"target <= 1.25x): {expected};" in verdict  # decided by the wall-clock median alone
    assert text.count("pair ") == 2 and "steal" in text


def test_repeats_must_be_positive():
    run = subprocess.run(
        [sys.executable, str(SCRIPT), "--small", "--repeats", "0"], capture_output=True, text=True, timeout=60
    )
    assert run.returncode == 2 and "--repeats must be at least 1, got 0" in run.stderr
