"""`calm.inference.Predictor.classify` with a reject option: one class-scoring pass per batch gives
both the probabilities and the known scores (what `calm predict` and `calm serve` run per batch),
equal to the classifier's own `predict_proba` and `known_score`; `Predictor.forward` (detection
windows) computes no known scores."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import calm
from calm.inference import Predictor
from calm.methods import UNKNOWN_SCORES
from tests.helpers.serve_app import ToneExtractor

torch.set_num_threads(1)


@pytest.mark.parametrize("score", sorted(UNKNOWN_SCORES))
def test_classify_scores_a_batch_once_with_a_reject_option(score):
    rng = np.random.default_rng(0)
    X = rng.normal(size=(12, 4, 8)).astype(np.float32)
    clf = calm.CALM(k=0.5, unknown=0.8, unknown_score=score).fit(X, np.repeat(["a", "b", "c"], 4))
    want_proba, want_known = clf.predict_proba(X[:5]), clf.known_score(X[:5])
    calls = []
    scores = clf.class_scores
    clf.class_scores = lambda Z: calls.append(len(Z)) or scores(Z)
    out = Predictor(clf, ToneExtractor()).classify([*X[:5], "a reason passes through"])
    assert calls == [5]
    assert out[5] == "a reason passes through"
    np.testing.assert_allclose([s.probabilities for s in out[:5]], want_proba, rtol=1e-12)
    np.testing.assert_allclose([s.known for s in out[:5]], want_known, rtol=1e-12)


def test_forward_computes_no_known_scores(monkeypatch):
    """`Predictor.forward` (detection windows: `calm detect`, `AudioClassifier.detect`) reads only
    the probabilities: no known-score pass, the same probabilities as `forward_scored`."""
    from calm.classifiers import calibration

    rng = np.random.default_rng(1)
    X = (rng.random((12, 2, 4)) + 0.1).astype(np.float32)  # the shape of ToneExtractor's features
    clf = calm.CALM(k=0.5, unknown=0.8, unknown_score="centroid-z+top").fit(X, np.repeat(["a", "b", "c"], 4))
    predictor = Predictor(clf, ToneExtractor())
    waves = [np.sin(np.arange(16000) * f / 16000).astype(np.float32) for f in (300.0, 900.0)]
    scored = predictor.forward_scored(waves)
    calls = []
    real = calibration.known_scores
    monkeypatch.setattr(calibration, "known_scores", lambda *a: calls.append(1) or real(*a))
    out = predictor.forward(waves)
    assert calls == []
    np.testing.assert_array_equal(np.stack(out), np.stack([s.probabilities for s in scored]))
