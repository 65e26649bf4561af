"""The evaluation protocol, metrics and results documents, on synthetic features."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import average_precision_score

from calm import evaluate as ev
from calm.evaluate import Method, ProtocolError


def synthetic(n_classes=4, per_class=10, K=6, d=4, folds=5, seed=0, noise=0.6):
    """Clustered features (n, K, d) with row ids in X[:, 0, 0]; labels c0..; folds 1..folds."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(n_classes, K, d))
    y = np.repeat([f"c{i}" for i in range(n_classes)], per_class)
    X = centres[np.repeat(np.arange(n_classes), per_class)] + noise * rng.normal(size=(len(y), K, d))
    X[:, 0, 0] = np.arange(len(y))  # row id, for spies
    meta = pd.DataFrame(
        {
            "path": [f"/a/{i}.wav" for i in range(len(y))],
            "label": y,
            "fold": np.tile(np.arange(1, folds + 1), len(y) // folds),
            "split": None,
        }
    )
    return X.astype(np.float32), y, meta


class Centroid:
    """Nearest class mean (ignoring the row-id feature); records the row ids it was fitted on."""

    log: list = []

    def __init__(self, shrink: float = 0.0):
        self.shrink = shrink

    def fit(self, X, y):
        Centroid.log.append(X[:, 0, 0].astype(int).tolist())
        self.classes_ = np.unique(y)
        Z = X[:, 1:].reshape(len(X), -1)
        self.means_ = np.stack([Z[y == c].mean(0) for c in self.classes_]) * (1 - self.shrink)
        return self

    def predict_proba(self, X):
        Z = X[:, 1:].reshape(len(X), -1)
        d = -((Z[:, None, :] - self.means_[None]) ** 2).sum(-1)
        e = np.exp(d - d.max(1, keepdims=True))
        return e / e.sum(1, keepdims=True)

    def predict(self, X):
        return self.classes_[self.predict_proba(X).argmax(1)]


def centroid_method(name="centroid"):
    return Method(name, lambda **p: Centroid(**p), {"shrink": 0.0}, {"shrink": [0.0, 0.5]})


# ---------------------------------------------------------------- parts and episodes


def test_parts_folds_official_and_none():
    X, y, meta = synthetic()
    parts, desc = ev.make_parts(meta, 5)
    assert [p.name for p in parts] == ["fold5"] and "test fold 5" in desc
    assert set(meta.fold.to_numpy()[parts[0].test]) == {5} and 5 not in set(
        meta.fold.to_numpy()[parts[0].train]
    )
    parts, _ = ev.make_parts(meta, "all")
    assert [p.name for p in parts] == [f"fold{f}" for f in range(1, 6)]
    with pytest.raises(ProtocolError, match="test fold 9 not among"):
        ev.make_parts(meta, 9)
    m2 = meta.assign(split=np.where(meta.fold == 1, "test", "train"))
    parts, desc = ev.make_parts(m2, 5)  # the official split wins over folds
    assert parts[0].name == "official" and set(parts[0].test) == set(np.flatnonzero(meta.fold == 1))
    m3 = meta.drop(columns=["fold"])
    parts, desc = ev.make_parts(m3)
    assert parts[0].test is None and "outside the support" in desc


def test_episode_seeded_nested_and_from_train_only():
    X, y, meta = synthetic()
    labels = ev.row_labels(y)
    (part,), _ = ev.make_parts(meta, 5)
    a = ev.sample_episode(labels, part, 3, seed=1)
    b = ev.sample_episode(labels, part, 3, seed=1)
    c = ev.sample_episode(labels, part, 3, seed=2)
    one = ev.sample_episode(labels, part, 1, seed=1)
    assert np.array_equal(a.support, b.support) and not np.array_equal(a.support, c.support)
    assert set(one.support) <= set(a.support)
    assert set(a.support) <= set(part.train) and np.array_equal(a.query, part.test)
    assert all(y[a.support] == a.support_y)
    assert sorted(np.unique(a.support_y, return_counts=True)[1]) == [3] * 4
    # no official split: queries are everything else
    (whole,), _ = ev.make_parts(meta.drop(columns=["fold"]))
    e = ev.sample_episode(labels, whole, 2, seed=0)
    assert len(e.query) == len(y) - 8 and not set(e.query) & set(e.support)


def test_missing_support_class_is_an_error():
    X, y, meta = synthetic()
    y = y.astype(object)
    y[(meta.fold == 5).to_numpy() & (y == "c0")] = "only_in_test"
    with pytest.raises(ProtocolError, match=r"\['only_in_test'\] have no support clips"):
        ev.run_protocol(X, y, meta, methods={"c": centroid_method()}, shots=[1], seeds=[0])
    X, y, meta = synthetic()
    with pytest.raises(ProtocolError, match="class 'c0' has 8 training clip"):
        ev.run_protocol(X, y, meta, methods={"c": centroid_method()}, shots=[9], seeds=[0])


def test_same_support_for_every_method_and_no_test_leak_in_tuning():
    X, y, meta = synthetic()
    test_rows = set(np.flatnonzero(meta.fold == 5))
    Centroid.log = []
    res = ev.run_protocol(
        X,
        y,
        meta,
        methods={"a": centroid_method("a"), "b": centroid_method("b")},
        shots=[4],
        seeds=[0, 1],
        do_tune=True,
    )
    fitted = Centroid.log
    assert fitted and all(not (set(rows) & test_rows) for rows in fitted)  # tuning never sees queries
    labels = ev.row_labels(y)
    (part,), _ = ev.make_parts(meta, 5)
    for seed in (0, 1):
        support = set(ev.sample_episode(labels, part, 4, seed).support)
        finals = [set(rows) for rows in fitted if set(rows) == support]
        assert len(finals) == 2  # the final fit of a and of b used the identical support set
        cv = [set(rows) for rows in fitted if set(rows) < support]
        assert cv  # inner CV fits: strict subsets of the support set only
    assert all(r["tuning"]["tuned"] and r["tuning"]["cv_folds"] == 4 for r in res.runs)
    assert all(r["params"]["shrink"] in (0.0, 0.5) for r in res.runs)


def test_tuning_with_one_shot_keeps_defaults():
    X, y, meta = synthetic()
    res = ev.run_protocol(X, y, meta, methods={"a": centroid_method()}, shots=[1], seeds=[0], do_tune=True)
    assert res.runs[0]["params"] == {"shrink": 0.0} and not res.runs[0]["tuning"]["tuned"]


def test_run_protocol_rotating_folds_and_determinism():
    X, y, meta = synthetic()
    kw = dict(methods={"a": centroid_method()}, shots=[1, 3], seeds=[0, 1, 2], test_fold="all")
    r1 = ev.run_protocol(X, y, meta, **kw)
    r2 = ev.run_protocol(X, y, meta, **kw)
    assert len(r1.runs) == 2 * 3 * 5
    assert [r["metrics"] for r in r1.runs] == [r["metrics"] for r in r2.runs]
    summary = ev.summarise(r1.runs)
    s3 = next(s for s in summary if s["shots"] == 3)
    per_seed = [
        np.mean([r["metrics"]["accuracy"] for r in r1.runs if r["shots"] == 3 and r["seed"] == s])
        for s in range(3)
    ]
    assert s3["n_seeds"] == 3 and s3["mean"] == pytest.approx(np.mean(per_seed))
    assert s3["std"] == pytest.approx(np.std(per_seed, ddof=1)) and s3["mean"] > 80


def test_linear_probe_learns():
    X, y, meta = synthetic(noise=0.3)
    res = ev.run_protocol(
        X,
        y,
        meta,
        methods={"lp": Method("lp", lambda **p: ev.LinearProbe(**p), {"C": 1.0})},
        shots=[5],
        seeds=[0],
    )
    assert res.runs[0]["metrics"]["accuracy"] >= 90


# ---------------------------------------------------------------- metrics (hand-checked)


def test_eer_hand_checked():
    scores = [0.9, 0.8, 0.3, 0.7, 0.2, 0.1]
    positive = [True, True, True, False, False, False]
    # threshold 0.7: FRR = 1/3 (0.3 rejected), FAR = 1/3 (0.7 accepted)
    assert ev.equal_error_rate(scores, positive) == pytest.approx(100 / 3)
    assert ev.equal_error_rate([0.9, 0.8, 0.2, 0.1], [True, True, False, False]) == 0.0
    assert ev.equal_error_rate([0.1, 0.2, 0.8, 0.9], [True, True, False, False]) == 100.0
    with pytest.raises(ProtocolError):
        ev.equal_error_rate([0.1, 0.2], [True, True])


def test_macro_f1_and_accuracy_hand_checked():
    t = ["b", "b", "s", "s", "s", "s"]
    p = ["b", "s", "s", "s", "s", "b"]
    assert ev.macro_f1(t, p, ["b", "s"]) == pytest.approx(100 * (0.5 + 0.75) / 2)
    assert ev.accuracy(t, p) == pytest.approx(100 * 4 / 6)


def test_average_precision_matches_hand_and_sklearn():
    s = np.array([0.9, 0.8, 0.7, 0.1])
    pos = np.array([True, False, True, False])
    assert ev.average_precision(s, pos) == pytest.approx((1 + 2 / 3) / 2)
    rng = np.random.default_rng(0)
    s, pos = rng.random(50), rng.random(50) < 0.3
    assert ev.average_precision(s, pos) == pytest.approx(average_precision_score(pos, s))


def test_multilabel_metrics_hand_checked():
    scores = np.array([[0.5, 0.4, 0.8], [0.1, 0.2, 0.7]])
    truth = [("a", "b"), ("c",)]
    m = ev.multilabel_metrics(scores, truth, ["a", "b", "c"])
    assert m["question_accuracy"] == pytest.approx(100 / 3)
    assert m["exact_match"] == pytest.approx(50)
    assert m["map"] == pytest.approx(100 * (1 + 1 + 0.5) / 3)
    scores[0, 2] = 0.3  # now both questions of clip 1 are right (the other true label is no distractor)
    m = ev.multilabel_metrics(scores, truth, ["a", "b", "c"])
    assert m["question_accuracy"] == 100 and m["exact_match"] == 100


def test_multilabel_and_spoof_protocols():
    X, y, meta = synthetic(n_classes=3, per_class=10)
    y = y.astype(object)
    y[0], y[15] = "c0;c1", "c1;c2"
    meta = meta.assign(split=np.where(meta.fold == 5, "test", "train"))
    res = ev.run_protocol(X, y, meta, methods={"a": centroid_method()}, shots=[2], seeds=[0])
    assert res.task == "multilabel" and set(res.runs[0]["metrics"]) == {
        "question_accuracy",
        "exact_match",
        "map",
    }
    X, y, meta = synthetic(n_classes=2, per_class=20)
    y = np.where(y == "c0", "bonafide", "spoof")
    res = ev.run_protocol(X, y, meta, methods={"a": centroid_method()}, shots=[3], seeds=[0])
    assert res.task == "spoof" and set(res.runs[0]["metrics"]) == {"accuracy", "macro_f1", "eer", "ece"}


# ---------------------------------------------------------------- summaries and documents


def _runs(values_a, values_b):
    return [
        {"method": m, "shots": 5, "seed": s, "part": "fold5", "metrics": {"accuracy": v}, "params": {}}
        for m, vals in (("a", values_a), ("b", values_b))
        for s, v in enumerate(vals)
    ]


def test_paired_differences_t_interval():
    (p,) = ev.paired_differences(_runs([81.0, 82.0, 83.0], [80.0, 80.0, 80.0]))
    assert (p["a"], p["b"], p["n_seeds"]) == ("a", "b", 3)
    half = 4.302652729911275 * 1.0 / np.sqrt(3)  # t_{0.975, 2} * sd / sqrt(n); diffs 1, 2, 3
    assert p["mean_diff"] == pytest.approx(2.0)
    assert (p["ci95_low"], p["ci95_high"]) == (pytest.approx(2 - half), pytest.approx(2 + half))
    (p,) = ev.paired_differences(_runs([81.0], [80.0]))
    assert p["ci95_low"] is None


def test_results_json_schema_and_markdown(tmp_path):
    X, y, meta = synthetic()
    res = ev.run_protocol(
        X, y, meta, methods={"a": centroid_method("a"), "b": centroid_method("b")}, shots=[1, 3], seeds=[0, 1]
    )
    results = ev.build_results(
        res, {"model": "m", "dataset": "synthetic", "n_seeds": 2}, analyses={"k_sweep": []}
    )
    js, md = ev.write_results(tmp_path, results)
    doc = json.loads(js.read_text())
    assert set(doc) >= {"config", "summary", "runs", "paired"}
    assert doc["config"]["primary_metric"] == "accuracy" and doc["config"]["unit"] == "%"
    for s in doc["summary"]:
        assert set(s) >= {"method", "shots", "metric", "mean", "std", "n_seeds"}
    assert {(s["method"], s["shots"]) for s in doc["summary"]} == {("a", 1), ("a", 3), ("b", 1), ("b", 3)}
    for r in doc["runs"]:
        assert set(r) >= {"method", "shots", "seed", "part", "metrics", "params", "tuning"}
    assert {(p["a"], p["b"]) for p in doc["paired"]} == {("a", "b")}
    text = md.read_text()
    s = next(s for s in doc["summary"] if s["method"] == "a" and s["shots"] == 3)
    assert f"{s['mean']:.2f} ± {s['std']:.2f}" in text and "| model | dataset | shots | a | b |" in text
