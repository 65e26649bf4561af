"""`calm.evaluate.run_evaluation` called from Python, the `Run` record, and reproducibility to the digit."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from threadpoolctl import threadpool_limits

from calm import evaluate as ev
from calm.cli import main
from calm.evaluate import ClassifierSpec, EvalConfig, Run, run_evaluation
from calm.models import LoadSpec
from tests.test_cli_eval import fake_model, tones  # noqa: F401  (fixtures: the tone model, a tiny dataset)
from tests.test_evaluate import synthetic

torch.set_num_threads(1)


def without_seconds(doc):
    """A results.json document without its timings (the only values allowed to differ between runs)."""
    if isinstance(doc, dict):
        return {k: without_seconds(v) for k, v in doc.items() if k != "seconds"}
    if isinstance(doc, list):
        return [without_seconds(v) for v in doc]
    return doc


def test_run_evaluation_from_python_extracts_evaluates_and_matches_the_cli(tmp_path, tones):  # noqa: F811
    seen: list[tuple[str, int, int | None]] = []
    lines: list[str] = []
    config = EvalConfig(
        out=tmp_path / "run",
        data=f"folder:{tones}",
        model=LoadSpec("fake-tones"),
        shots=(1, 3),
        seeds=(0, 1, 2),
        figures=False,
    )
    result = run_evaluation(config, progress=lambda *a: seen.append(a), log=lines.append)
    doc = json.loads(result.results_json.read_text())
    assert result.results_md.read_text() == result.markdown and "| CALM |" in result.markdown
    assert doc["config"]["n_clips"] == 24 and doc["config"]["extraction"]["stored"] == 24
    assert {s["method"] for s in result.summary} == set(ev.FEWSHOT_METHODS)
    assert len(doc["runs"]) == 2 * 3 * 4 and result.figures == {} and result.skipped == {}
    assert ("episodes", 24, 24) in seen and any(line.startswith("dataset folder:") for line in lines)
    store = tmp_path / "run" / "features"
    again = run_evaluation(
        EvalConfig(out=tmp_path / "again", features=store, shots=(1, 3), seeds=(0, 1, 2), figures=False)
    )
    assert without_seconds(again.results["runs"]) == without_seconds(doc["runs"])
    assert again.results["summary"] == doc["summary"] and again.results["paired"] == doc["paired"]
    cli = tmp_path / "cli"
    args = ["evaluate", "--features", str(store), "--shots", "1,3", "--seeds", "3", "--out", str(cli)]
    res = CliRunner().invoke(main, [*args, "--no-figures", "--no-progress"])
    assert res.exit_code == 0, res.output + repr(res.exception)
    cli_doc = json.loads((cli / "results.json").read_text())
    assert without_seconds(cli_doc["runs"]) == without_seconds(again.results["runs"])
    assert cli_doc["summary"] == again.results["summary"]


def test_run_evaluation_options_reach_the_record_and_lalm_methods_are_skipped(tmp_path, tones):  # noqa: F811
    config = EvalConfig(
        out=tmp_path / "run",
        data=f"folder:{tones}",
        model=LoadSpec("fake-tones"),
        shots=(2,),
        seeds=(0, 1),
        methods=("sav", "calm", "zero-shot"),
        classifier=ClassifierSpec(k=3, sav_tie_break="margin"),
        figures=False,
    )
    result = run_evaluation(config)
    runs = result.results["runs"]
    assert {r["params"]["k"] for r in runs} == {3} and {r["method"] for r in runs} == {"sav", "calm"}
    assert "not an audio-language model" in result.skipped["zero-shot"]
    assert result.results["config"]["methods"] == ["sav", "calm"]


def test_eval_config_rejects_what_cannot_run(tmp_path):
    with pytest.raises(ValueError, match="exactly one of data"):
        EvalConfig(out=tmp_path)
    with pytest.raises(ValueError, match="exactly one of data"):
        EvalConfig(out=tmp_path, data="folder:x", features=tmp_path)
    with pytest.raises(ValueError, match="unknown method"):
        EvalConfig(out=tmp_path, features=tmp_path, methods=("sav", "knn"))
    with pytest.raises(ValueError, match="at least one"):
        EvalConfig(out=tmp_path, features=tmp_path, seeds=())


def test_run_record_to_dict_is_the_results_json_form():
    base = dict(
        method="calm", shots=1, seed=0, part="fold5", metrics={"accuracy": 50.0}, n_support=3, n_query=9
    )
    fewshot = Run(**base, params={"k": np.int64(3)}, tuning={"tuned": False}, seconds=0.5)
    assert list(fewshot.to_dict()) == [
        "method",
        "shots",
        "seed",
        "part",
        "metrics",
        "params",
        "tuning",
        "n_support",
        "n_query",
        "seconds",
    ]
    assert type(fewshot.to_dict()["params"]["k"]) is int  # NumPy scalars become JSON numbers
    zero = Run(**{**base, "method": "zero-shot"}, params={"mode": "letters"}, tuning={}, n_unparsed=2)
    assert list(zero.to_dict())[-2:] == ["n_query", "n_unparsed"] and "seconds" not in zero.to_dict()
    pl = Run(**base, params={}, tuning={}, pseudo_labels={"kept": 1}, warnings=["w"], seconds=0.1)
    assert list(pl.to_dict())[-4:] == ["n_query", "pseudo_labels", "warnings", "seconds"]
    for run in (fewshot, zero, pl):
        assert Run.from_dict(run.to_dict()).to_dict() == run.to_dict()


def test_protocol_runs_are_run_records():
    X, y, meta = synthetic()
    res = ev.run_protocol(X, y, meta, methods=ev.fewshot_methods(), shots=[1, 2], seeds=[0, 1])
    assert res.runs and all(Run.from_dict(r).to_dict() == r for r in res.runs)


def test_the_same_protocol_twice_gives_the_same_results_json_to_the_digit(tmp_path):
    """Issue 11 item 4: the linear probe's numbers changed with the BLAS thread count; the probe now
    runs its BLAS on one thread, so two runs (here under 1 and 2 BLAS threads) write equal files."""
    X, y, meta = synthetic(n_classes=5, per_class=10, K=8, d=16, noise=1.5)
    docs = []
    for threads in (1, 2):
        with threadpool_limits(limits=threads, user_api="blas"):
            res = ev.run_protocol(X, y, meta, methods=ev.fewshot_methods(), shots=[1, 3], seeds=[0, 1, 2])
        js, _ = ev.write_results(tmp_path / f"run{threads}", ev.build_results(res, {"n_seeds": 3}))
        docs.append(without_seconds(json.loads(js.read_text())))
    assert docs[0] == docs[1]


def test_linear_probe_probabilities_do_not_depend_on_the_blas_thread_count():
    """Without the one-thread pin, OpenBLAS gives other float32 probabilities at these shapes (checked)."""
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(10, 16, 384)).astype(np.float32)
    X = centres[np.repeat(np.arange(10), 2)] + 3 * rng.normal(size=(20, 16, 384)).astype(np.float32)
    Q = centres[rng.integers(0, 10, 40)] + 3 * rng.normal(size=(40, 16, 384)).astype(np.float32)
    y = np.repeat([f"c{i}" for i in range(10)], 2)
    probs = []
    for threads in (1, 2):
        with threadpool_limits(limits=threads, user_api="blas"):
            probs.append(ev.LinearProbe().fit(X, y).predict_proba(Q))
    assert probs[0].tobytes() == probs[1].tobytes()
