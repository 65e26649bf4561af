"""Metrics (%) of predictions on query clips: accuracy, macro-F1 and EER (bonafide/spoof), the
expected calibration error of probabilities (``ece``, % as the others: 16.0 is an ECE of 0.16), and for
multi-label data question accuracy, exact match and mAP.

Multi-label (AudioSet-style) data: each test clip is one question per true label, answered correctly
when that label scores above every class the clip does not carry (the other true labels are not
distractors); exact match = all of a clip's questions right.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from numpy.typing import ArrayLike

from calm.evaluate.episodes import ProtocolError

__all__ = [
    "PRIMARY_METRIC",
    "ECE_BINS",
    "accuracy",
    "average_precision",
    "calibration_bins",
    "class_scores",
    "equal_error_rate",
    "expected_calibration_error",
    "evaluate_method",
    "macro_f1",
    "multilabel_metrics",
    "prediction_metrics",
]

PRIMARY_METRIC = {"single": "accuracy", "spoof": "macro_f1", "multilabel": "exact_match"}


def accuracy(y_true: ArrayLike, y_pred: ArrayLike) -> float:
    """Percentage of queries whose prediction equals the true label."""
    true, pred = np.asarray(y_true), np.asarray(y_pred)
    if len(true) == 0:
        raise ProtocolError("accuracy of an empty query set")
    return 100.0 * float(np.mean(true == pred))


def macro_f1(y_true: ArrayLike, y_pred: ArrayLike, classes: Sequence[str]) -> float:
    """Unweighted mean over `classes` of per-class F1 (a class never predicted nor present scores 0)."""
    true, pred = np.asarray(y_true), np.asarray(y_pred)
    f1 = []
    for c in classes:
        tp = np.sum((pred == c) & (true == c))
        fp = np.sum((pred == c) & (true != c))
        fn = np.sum((pred != c) & (true == c))
        denom = 2 * tp + fp + fn
        f1.append(2 * tp / denom if denom else 0.0)
    return 100.0 * float(np.mean(f1))


def equal_error_rate(scores: ArrayLike, positive: ArrayLike) -> float:
    """EER (%) of a detector: higher score = more likely positive (e.g. bonafide).

    At each threshold t (every distinct score), false rejection FRR(t) = P(score < t | positive) and
    false acceptance FAR(t) = P(score >= t | negative); the EER is where the two curves cross, taken
    as the mean of FAR and FRR at the threshold where |FAR - FRR| is smallest.
    """
    s = np.asarray(scores, dtype=np.float64)
    pos = np.asarray(positive, dtype=bool)
    if pos.all() or not pos.any():
        raise ProtocolError("EER needs both positive and negative clips")
    thresholds = np.concatenate([np.unique(s), [np.inf]])
    frr = (s[pos][None, :] < thresholds[:, None]).mean(1)
    far = (s[~pos][None, :] >= thresholds[:, None]).mean(1)
    i = int(np.argmin(np.abs(far - frr)))
    return 100.0 * float((far[i] + frr[i]) / 2)


def average_precision(scores: np.ndarray, positive: np.ndarray) -> float:
    """Average precision: mean over positives of the precision at their rank (ties: pessimistic)."""
    s = np.asarray(scores, dtype=np.float64)
    pos = np.asarray(positive, dtype=bool)
    if not pos.any():
        return float("nan")
    # rank of each item = number of items with score >= its score (ties count against it)
    ranks = (s[None, :] >= s[pos][:, None]).sum(1)
    hits = (s[pos][None, :] >= s[pos][:, None]).sum(1)
    return float(np.mean(hits / ranks))


#: equal-width bins of the top probability in the ECE and the reliability diagrams
ECE_BINS = 15


def calibration_bins(
    confidence: ArrayLike, correct: ArrayLike, n_bins: int = ECE_BINS
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(bin index, clip count, mean confidence, accuracy) of each non-empty bin of the top
    probability ``confidence`` over ``n_bins`` equal-width bins ((i / n, (i + 1) / n], the first
    closed at 0); ``correct`` says whether each top class is the true one."""
    conf = np.asarray(confidence, dtype=np.float64).ravel()
    hits = np.asarray(correct, dtype=np.float64).ravel()
    bins = np.clip(np.ceil(conf * n_bins).astype(np.int64) - 1, 0, n_bins - 1)
    index = np.unique(bins)
    count = np.array([int((bins == b).sum()) for b in index], dtype=np.int64)
    mean_conf = np.array([conf[bins == b].mean() for b in index])
    accuracy = np.array([hits[bins == b].mean() for b in index])
    return index, count, mean_conf, accuracy


def expected_calibration_error(confidence: ArrayLike, correct: ArrayLike, n_bins: int = ECE_BINS) -> float:
    """ECE (fraction, 0..1): over the bins of :func:`calibration_bins`, the clip-weighted mean
    |accuracy - mean confidence| of each bin."""
    _, count, conf, acc = calibration_bins(confidence, correct, n_bins)
    if count.sum() == 0:
        return 0.0
    return float((count * np.abs(acc - conf)).sum() / count.sum())


def _probabilities(scores: np.ndarray | None) -> np.ndarray | None:
    """``scores`` (n, C) if they are probabilities (finite, in [0, 1], rows summing to 1), else None."""
    if scores is None:
        return None
    s = np.asarray(scores, dtype=np.float64)
    if s.ndim != 2 or s.size == 0 or not np.isfinite(s).all() or s.min() < 0 or s.max() > 1 + 1e-6:
        return None
    return s if np.allclose(s.sum(axis=1), 1.0, atol=1e-4) else None


def multilabel_metrics(scores: np.ndarray, truth: Sequence[tuple[str, ...]], classes: Sequence[str]) -> dict:
    """Question accuracy, exact match and mAP (%) from per-class scores (n, C) of multi-label clips."""
    scores = np.asarray(scores, dtype=np.float64)
    index = {c: i for i, c in enumerate(classes)}
    Y = np.zeros(scores.shape, dtype=bool)
    for r, labels in enumerate(truth):
        Y[r, [index[c] for c in labels]] = True
    best_negative = np.where(Y, -np.inf, scores).max(1)  # the strongest class the clip does not carry
    right = Y & (scores > best_negative[:, None])
    questions = right.sum() / Y.sum()
    exact = np.mean(right.sum(1) == Y.sum(1))
    ap = [average_precision(scores[:, j], Y[:, j]) for j in range(len(classes)) if Y[:, j].any()]
    return {
        "question_accuracy": 100 * float(questions),
        "exact_match": 100 * float(exact),
        "map": 100 * float(np.mean(ap)),
    }


def class_scores(clf: Any, X: np.ndarray, classes: Sequence[str]) -> np.ndarray:
    """Per-class scores (n, C) in `classes` order from predict_proba (or decision_function)."""
    raw = clf.predict_proba(X) if hasattr(clf, "predict_proba") else clf.decision_function(X)
    raw = np.asarray(raw, dtype=np.float64)
    order = {str(c): i for i, c in enumerate(clf.classes_)}
    out = np.full((len(X), len(classes)), -np.inf)
    for j, c in enumerate(classes):
        if c in order:
            out[:, j] = raw[:, order[c]]
    return out


def prediction_metrics(
    y_pred: Sequence[str | None] | None,
    scores: np.ndarray | None,
    truth: Sequence[tuple[str, ...]],
    classes: Sequence[str],
    task: str,
) -> dict:
    """Metrics (%) of predictions of query clips with their true label tuples.

    `y_pred`: one class per query, None = no answer (always wrong; needed unless multi-label).
    `scores`: (n, C) per-class scores in `classes` order, -inf for a class that cannot be predicted
    (needed for multi-label and spoof tasks).
    """
    if task == "multilabel":
        if scores is None:
            raise ValueError("multi-label metrics need per-class scores")
        return multilabel_metrics(scores, truth, classes)
    if y_pred is None:
        raise ValueError("single-label metrics need predictions")
    y_true = np.array([t[0] for t in truth], dtype=object)
    pred = np.array([None if p is None else str(p) for p in y_pred], dtype=object)
    out = {"accuracy": accuracy(y_true, pred)}
    proba = _probabilities(scores)
    if proba is not None:  # the top probability against whether the prediction is right
        out["ece"] = 100 * expected_calibration_error(proba.max(axis=1), pred == y_true)
    if task == "spoof":
        out["macro_f1"] = macro_f1(y_true, pred, ["bonafide", "spoof"])
        bona = np.asarray(scores, dtype=np.float64)[:, list(classes).index("bonafide")]
        out["eer"] = equal_error_rate(bona, y_true == "bonafide")
    return out


def evaluate_method(
    clf: Any, X: np.ndarray, truth: Sequence[tuple[str, ...]], classes: Sequence[str], task: str
) -> dict:
    """Metrics (%) of a fitted classifier on query features X with their true label tuples."""
    if task == "multilabel":
        return prediction_metrics(None, class_scores(clf, X, classes), truth, classes, task)
    # spoof: the EER; any single-label task: the ECE when the scores are probabilities
    scores = class_scores(clf, X, classes) if hasattr(clf, "predict_proba") or task == "spoof" else None
    return prediction_metrics(list(clf.predict(X)), scores, truth, classes, task)
