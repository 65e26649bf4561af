"""The open-set evaluation (`calm evaluate --open-set N`, `--unknowns-features STORE`): held-out
classes never reach a support set, the metrics of a separable case, results.json / results.md /
report.html, and the command line that reproduces it."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

from calm.evaluate import EvalConfig, Method, ProtocolError, run_evaluation
from calm.evaluate.config import ClassifierSpec
from calm.evaluate.openset import (
    SCORES,
    held_out_classes,
    open_set_metrics,
    reject_option_metrics,
    run_open_set,
)
from tests.test_evaluate import synthetic
from tests.test_methods import NpyExtractor, _clips, store  # noqa: F401 (the fixture)

torch.set_num_threads(1)


class Spy:
    """Nearest class mean with probabilities and decision scores; records the classes it was fitted on."""

    fitted: list[set[str]] = []

    def fit(self, X, y):
        Spy.fitted.append(set(map(str, y)))
        self.classes_ = np.unique(y)
        self.means_ = np.stack([X[y == c].reshape((y == c).sum(), -1).mean(0) for c in self.classes_])
        return self

    def decision_function(self, X):
        return -((X.reshape(len(X), 1, -1) - self.means_[None]) ** 2).sum(-1)

    def predict_proba(self, X):
        d = self.decision_function(X)
        e = np.exp(d - d.max(1, keepdims=True))
        return e / e.sum(1, keepdims=True)

    def predict(self, X):
        return self.classes_[self.decision_function(X).argmax(1)]


def test_held_out_classes_never_reach_a_support_set():
    X, y, meta = synthetic(n_classes=5, per_class=10)
    Spy.fitted = []
    doc = run_open_set(
        X, y, meta, methods={"spy": Method("spy", Spy, {})}, shots=[1, 3], seeds=[0, 1, 2, 3], n_held_out=2
    )
    held = doc["held_out"]
    assert len(Spy.fitted) == 8  # seeds x shots, one part (test fold 5)
    for i, classes in enumerate(Spy.fitted):
        seed = str(i // 2)
        assert len(held[seed]) == 2 and not classes & set(held[seed])
        assert classes == {f"c{k}" for k in range(5)} - set(held[seed])
    assert len({tuple(v) for v in held.values()}) > 1  # the seed chooses them
    assert held_out_classes([f"c{k}" for k in range(5)], 2, 3) == held["3"]  # reproducibly
    run = doc["runs"][0]
    assert run["n_unknown"] == 2 * 2 and run["n_known"] == 3 * 2  # fold 5: 2 test clips per class
    with pytest.raises(ProtocolError, match="fewer than two known"):
        held_out_classes(["a", "b", "c"], 2, 0)


def _separable(n=12, seed=0):
    """Three tight known classes (one axis each) and unknowns equidistant from all of them."""
    rng = np.random.default_rng(seed)
    K, d = 4, 8
    eye = np.eye(d)
    Xk = np.concatenate([eye[c] + 0.05 * rng.normal(size=(n, K, d)) for c in range(3)]).astype(np.float32)
    yk = np.repeat(["a", "b", "c"], n)
    Xu = (eye[:3].sum(0) / np.sqrt(3) + 0.05 * rng.normal(size=(n, K, d))).astype(np.float32)
    return Xk, yk, Xu


@pytest.mark.parametrize("method", ["sav", "calm-global", "calm"])
def test_a_separable_case_scores_an_auroc_near_one(method):
    """Unknowns equidistant from three tight classes: the centroid similarity (and CALM's uncalibrated
    top score) ranks every known clip above every unknown one. The calibrated top probability
    saturates at 1 on such tight classes (the leave-one-out temperature is the smallest), and SAV's
    unanimous votes tie, so the baseline is no better than the others anywhere."""
    Xk, yk, Xu = _separable()
    clf = ClassifierSpec().registry()[method].build().fit(Xk[::2], yk[::2])
    metrics = open_set_metrics(clf, Xk[1::2], list(yk[1::2]), Xu)
    assert metrics["auroc_similarity"] > 99.0 and metrics["far95_similarity"] == 0.0
    if method != "sav":
        assert metrics["auroc_top_decision"] > 99.0 and metrics["far95_top_decision"] == 0.0
    assert all(metrics[f"auroc_{name}"] <= metrics["auroc_similarity"] for name in SCORES)
    assert metrics["coverage"] == 100.0 and metrics["set_size"] == 1.0
    assert set(metrics) >= {"far95_support", "open_accuracy", "open_macro_f1", "empty_unknown"}


@pytest.mark.parametrize("method", ["sav", "calm-global", "calm"])
def test_the_reject_option_rejects_the_separable_unknowns(method):
    """The reject option refitted with unknown=0.95: its support-side threshold on the known score
    (centroid-z+top) accepts the known queries and no unknown one, where the top probability's
    accepts many unknowns (it saturates). 72 support clips (0.95 needs 19 or more to reject
    anything) and 72 known queries, so that sampling noise stays under the 5 points of slack."""
    Xk, yk, Xu = _separable(n=48)
    clf = ClassifierSpec().registry()[method].build().fit(Xk[::2], yk[::2])
    metrics = reject_option_metrics(clf, Xk[::2], yk[::2], Xk[1::2], list(yk[1::2]), Xu)
    assert metrics["far95_support_known"] == 0.0 and metrics["accept_support_known"] >= 90.0
    assert metrics["open_accuracy_known"] >= 95.0
    plain = open_set_metrics(clf, Xk[1::2], list(yk[1::2]), Xu)
    assert plain["auroc_known_score"] > 99.0 and plain["far95_support"] > 40.0


def test_a_classifier_without_a_score_s_method_leaves_that_score_out():
    Xk, yk, Xu = _separable()
    spy = Spy().fit(Xk[::2], yk[::2])
    metrics = open_set_metrics(spy, Xk[1::2], list(yk[1::2]), Xu)
    assert metrics["auroc_top_proba"] > 99.0 and metrics["far95_top_proba"] == 0.0
    assert metrics["auroc_top_decision"] > 99.0 and "auroc_similarity" not in metrics
    assert "coverage" not in metrics and "far95_support" not in metrics  # no conformal sets, no LOO


def test_run_evaluation_writes_the_open_set_results(store, tmp_path):  # noqa: F811
    from calm.data.base import Clip
    from calm.store import extract_to_store

    folder, fake, _ = store
    others, labels = _clips(tmp_path / "others", 2, seed=5)
    clips = [Clip(path=p, labels=(f"x{label}",)) for p, label in zip(others, labels, strict=True)]
    unknowns = tmp_path / "unknowns"
    extract_to_store(NpyExtractor(), clips, unknowns, dtype="float32", progress=False, allow_failures=False)
    config = EvalConfig(
        out=tmp_path / "run",
        features=folder,
        shots=[2],
        seeds=[0, 1],
        methods=["sav", "calm"],
        open_set=1,
        unknowns_features=unknowns,
        figures=False,
    )
    result = run_evaluation(config)
    doc = json.loads((tmp_path / "run" / "results.json").read_text())["open_set"]
    assert set(doc) >= {"held_out", "n_held_out", "summary", "paired", "runs", "scores", "unknowns_features"}
    assert doc["n_held_out"] == 1 and doc["n_unknowns_external"] == 6 and set(doc["held_out"]) == {"0", "1"}
    assert doc["unknowns_features"] == str(unknowns)
    metrics = {s["metric"] for s in doc["summary"]}
    assert {"auroc_top_proba", "auroc_top_decision", "far95_support", "open_accuracy", "coverage"} <= metrics
    assert {(p["method"], p["a"], p["b"]) for p in doc["paired"]} >= {
        ("calm", "top_decision", "top_proba"),
        ("calm", "known_score", "top_proba"),  # the reject option's score, paired against the baseline
    }
    assert {"auroc_known_score", "far95_support_known", "open_accuracy_known"} <= metrics
    assert "centroid-z" in doc["scores"]["known_score"]
    assert all(r["n_unknown"] == 5 + 6 for r in doc["runs"])  # no split: every held-out clip; the store's
    assert "## Open set" in result.markdown and 'id="open-set"' in result.report_html.read_text()
    assert "AUROC known score (reject option)" in result.markdown
    assert "FAR@95 reject option (support thr.)" in result.report_html.read_text()
    assert "--open-set 1 --unknowns-features" in result.results["config"]["command"]


def test_the_open_set_options_parse_back_into_the_same_config(tmp_path):
    from calm.commands.evaluate import eval_config, evaluate

    config = EvalConfig(out="run", features=tmp_path, open_set=3, unknowns_features=tmp_path / "u s")
    ctx = evaluate.make_context("evaluate", config.to_cli_args())
    assert eval_config(ctx.params) == config
    with pytest.raises(ValueError, match="open_set"):
        EvalConfig(out="run", features=tmp_path, open_set=-1)


def test_an_open_set_run_needs_unknowns():
    X, y, meta = synthetic()
    with pytest.raises(ProtocolError, match="--open-set N"):
        run_open_set(X, y, pd.DataFrame(meta), methods={"spy": Method("spy", Spy, {})}, shots=[1], seeds=[0])


class OtherNpy(NpyExtractor):
    model_id = "npy-other"


def test_bad_open_set_options_fail_before_any_episode_runs(store, tmp_path):  # noqa: F811
    from calm.data.base import Clip
    from calm.errors import CalmError
    from calm.store import extract_to_store

    folder, _, queries = store
    other = tmp_path / "other"
    clips = [Clip(path=p, labels=("x",)) for p in queries]
    extract_to_store(OtherNpy(), clips, other, dtype="float32", progress=False, allow_failures=False)
    stages: list[str] = []
    for options, message in [
        ({"unknowns_features": other}, "matches no key"),
        ({"open_set": 2}, "fewer than"),
    ]:
        config = EvalConfig(
            out=tmp_path / "run", features=folder, shots=[2], seeds=[0], figures=False, **options
        )
        with pytest.raises(CalmError, match=message) as error:
            run_evaluation(config, progress=lambda stage, done, total: stages.append(stage))
        assert "unknowns_features" not in options or str(other) in str(error.value)
    assert stages == []


def test_an_episode_without_unknown_queries_is_an_error_not_a_silent_auroc():
    X, y, meta = synthetic(n_classes=3, per_class=10)
    meta.loc[y == "c0", "fold"] = 1  # c0 has no test-fold clip
    seed = next(s for s in range(50) if held_out_classes(["c0", "c1", "c2"], 1, s) == ["c0"])
    with pytest.raises(ProtocolError, match="no unknown queries"):
        run_open_set(
            X, y, meta, methods={"spy": Method("spy", Spy, {})}, shots=[1], seeds=[seed], n_held_out=1
        )
