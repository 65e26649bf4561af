"""`calm evaluate` does each piece of work once per run: the confusion matrices and the prediction
skew of the prediction records (results.json, results.md, figures and report.html read the same
ones), and in the open-set evaluation one `predict_proba` per fitted classifier and query set and
one read of the unknown rows per seed and part; with the outputs those repeats gave."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

import calm.evaluate.openset as openset
import calm.evaluate.predictions as predictions
import calm.evaluate.report_html as report_html
import calm.evaluate.reports as reports
import calm.evaluate.runner as runner
import calm.evaluate.skew as skew
from calm.classifiers.base import HeadClassifier
from calm.evaluate import EvalConfig, run_evaluation
from calm.evaluate.config import ClassifierSpec
from calm.evaluate.episodes import make_parts
from calm.evaluate.estimators import LinearProbe
from calm.evaluate.metrics import accuracy, macro_f1
from calm.evaluate.report_html import ReportData, render_report
from calm.evaluate.reports import results_markdown
from tests.test_evaluate import synthetic
from tests.test_methods import store  # noqa: F401 (the fixture)

torch.set_num_threads(1)

METHODS = ["sav", "calm-global", "calm", "linear-probe"]


def _counting(monkeypatch, owner, name: str, calls: list) -> None:
    """Replace `owner.name` (a module's function or a class's method) by one that records its calls."""
    real = getattr(owner, name)

    def spy(*args, **kwargs):
        calls.append(name)
        return real(*args, **kwargs)

    monkeypatch.setattr(owner, name, spy)


def test_a_run_computes_each_confusion_matrix_and_skew_table_once(store, tmp_path, monkeypatch):  # noqa: F811
    """One `confusions` call and one `class_balance` per (method, shots) in a run that writes
    results.json, results.md, the confusion figures and report.html; each of those equals what the
    prediction records written beside them give when recomputed from scratch."""
    folder, _, _ = store
    confs: list = []
    for module in (runner, reports, report_html):  # every module that imports the name
        _counting(monkeypatch, module, "confusions", confs)
    balances: list = []
    _counting(monkeypatch, skew, "class_balance", balances)
    out = tmp_path / "run"
    config = EvalConfig(out=out, features=folder, shots=[1, 2], seeds=[0, 1], methods=METHODS)
    result = run_evaluation(config)
    assert len(confs) == 1 and len(balances) == len(METHODS) * 2

    records = predictions.read_predictions(out / predictions.PREDICTIONS_FILE)
    again = predictions.confusions(records)
    doc = json.loads((out / "results.json").read_text())
    assert doc["prediction_skew"] == skew.prediction_skew(again)
    assert (out / "results.md").read_text() == results_markdown(doc, again) == result.markdown
    assert {f"confusion:{c.method}:{c.shots}" for c in again} <= set(result.figures)
    from calm.store import load_features

    paths = [str(p) for p in load_features(folder)[2]["path"]]
    figures = {k: v for k, v in result.figures.items() if k.startswith("fig")}
    data = ReportData(result.results, records, paths, figures, config.command())  # no confusions given
    assert render_report(data, out) == (out / "report.html").read_text()  # recomputed: the same page


def _old_metrics(clf, Xk, truth, Xu) -> dict[str, float]:
    """`open_set_metrics` as it was: every score asks the classifier again (reference)."""

    def top(X):
        return np.asarray(clf.predict_proba(X), dtype=np.float64).max(axis=1)

    def margin(X):
        p = np.sort(np.asarray(clf.predict_proba(X), dtype=np.float64), axis=1)
        return p[:, -1] - p[:, -2]

    def decision(X):
        d = np.asarray(clf.decision_function(X), dtype=np.float64)
        return np.abs(d) if d.ndim == 1 else d.max(axis=1)

    def similarity(X):
        out = []
        for e in clf.explain(X, top=int(X.shape[1])):
            heads = e["heads"][str(e["prediction"])]
            w = np.array([h["weight"] for h in heads], dtype=np.float64)
            s = np.array([h["similarity"] for h in heads], dtype=np.float64)
            out.append(float((w * s).sum() / w.sum()) if w.sum() > 0 else -1.0)
        return np.array(out)

    scores = {"top_proba": top, "top_decision": decision, "margin": margin}
    scores["similarity"] = similarity
    scores["known_score"] = lambda X: np.asarray(clf.known_score(X), dtype=np.float64)
    out = {}
    positive = np.r_[np.ones(len(Xk)), np.zeros(len(Xu))]
    for name, score in scores.items():
        if not hasattr(clf, openset.NEEDS[name]):
            continue
        sk, su = score(Xk), score(Xu)
        out[f"auroc_{name}"] = 100.0 * float(roc_auc_score(positive, np.r_[sk, su]))
        out[f"far95_{name}"] = 100.0 * float(np.mean(su >= float(np.quantile(sk, 1.0 - openset.ACCEPT))))
    threshold = openset._support_threshold(clf)
    if threshold is not None:
        pk, pu = top(Xk), top(Xu)
        out["far95_support"] = 100.0 * float(np.mean(pu >= threshold))
        pred = np.r_[np.asarray(clf.predict(Xk), dtype=object), np.asarray(clf.predict(Xu), dtype=object)]
        pred[np.r_[pk, pu] < threshold] = openset.UNKNOWN
        true = np.array([*truth, *[openset.UNKNOWN] * len(Xu)], dtype=object)
        out["open_accuracy"] = accuracy(true, pred)
        out["open_macro_f1"] = macro_f1(true, pred, [*map(str, clf.classes_), openset.UNKNOWN])
    if hasattr(clf, "predict_set"):
        sets = clf.predict_set(Xk, alpha=openset.ALPHA)
        out["coverage"] = 100.0 * float(np.mean([t in s for t, s in zip(truth, sets, strict=True)]))
        out["set_size"] = float(np.mean([len(s) for s in sets]))
        out["empty_unknown"] = 100.0 * float(
            np.mean([not s for s in clf.predict_set(Xu, alpha=openset.ALPHA)])
        )
    return out


@pytest.mark.parametrize("method", METHODS)
def test_open_set_metrics_ask_for_probabilities_once_per_query_set(method, monkeypatch):
    """Known and unknown queries: two `predict_proba` calls in all, and the metrics the repeated
    calls gave."""
    X, y, _ = synthetic(n_classes=4, per_class=10)
    known = y != "c3"
    Xk, yk, Xu = X[known], y[known], X[~known]
    clf = ClassifierSpec().registry()[method].build().fit(Xk[::2], yk[::2])
    expected = _old_metrics(clf, Xk[1::2], list(yk[1::2]), Xu)
    calls: list = []
    _counting(monkeypatch, type(clf), "predict_proba", calls)
    assert openset.open_set_metrics(clf, Xk[1::2], list(yk[1::2]), Xu) == expected
    assert len(calls) == 2


def test_an_open_set_run_reads_unknowns_once_per_seed_and_part_and_probabilities_once(monkeypatch):
    """Two shot counts, two seeds: the unknown rows of each (seed, part) are read once,
    not once per shot count, and every fitted classifier asks for probabilities once per query set
    (known, unknown) -- the reject option's refit asks for none."""
    X, y, meta = synthetic(n_classes=4, per_class=10)
    reads: list = []
    _counting(monkeypatch, openset, "_unknown_rows", reads)
    asked: dict[int, list] = {}
    assert issubclass(LinearProbe, HeadClassifier)  # one spy sees every method's calls
    real = HeadClassifier.predict_proba

    def spy(self, X):
        asked.setdefault(id(self), [self]).append(X)  # keeps self alive: ids stay unique
        return real(self, X)

    monkeypatch.setattr(HeadClassifier, "predict_proba", spy)
    registry = ClassifierSpec().registry()
    doc = openset.run_open_set(
        X, y, meta, methods={m: registry[m] for m in METHODS}, shots=[1, 2], seeds=[0, 1], n_held_out=1
    )
    n_parts = len(make_parts(meta, 5)[0])
    assert len(reads) == 2 * n_parts  # seeds x parts
    assert len(doc["runs"]) == len(METHODS) * 2 * 2 * n_parts
    assert len(asked) == len(doc["runs"])  # one fitted classifier per run asks
    assert all(len(xs) == 1 + 2 for xs in asked.values())  # [self, known queries, unknown queries]


def test_the_report_reads_the_skew_of_results_json(tmp_path):
    """report.html's skew section shows results.json's `prediction_skew` (no recount), and counts
    it from the records for a document without one."""
    rec = {"method": "sav", "shots": 1, "seed": 0, "part": "fold5", "classes": ["a", "b"]}
    rec |= {"query": [0, 1, 2], "y_true": [0, 1, 1], "y_pred": [0, 0, 0], "p_pred": [None] * 3}
    rec |= {"p_true": [None] * 3}
    counted = skew.prediction_skew(predictions.confusions([rec]))
    page = render_report(ReportData({"config": {}, "summary": []}, [rec], command="c"), tmp_path)
    assert 'id="skew"' in page and "×3.00" in page  # a: 3 predicted / 1 true
    stored = json.loads(json.dumps(counted))
    stored[0]["max_ratio_class"] = "stored"
    page = render_report(
        ReportData({"config": {}, "summary": [], "prediction_skew": stored}, [rec], command="c"), tmp_path
    )
    assert ">stored<" in page
