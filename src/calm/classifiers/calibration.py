"""Calibrated probabilities, conformal prediction sets and the reject option of a fitted head
classifier (SAV, CALM, CALM-global, the linear probe), from the support set alone; the math is
:mod:`calm._calibration` (explanations: :mod:`calm.classifiers.explain`).

``calibration="loo-temperature"``: each support clip is scored as if it had been left out (its
own class centroid recomputed without it, mu^{-i} = (n_c mu_c - h_i) / (n_c - 1); the kept heads
and weights stay those of the full fit; the linear probe instead scores each clip with a probe
refitted without it and the rest of its fold: ``_held_out_log_scores``), and one temperature T
is chosen on those scores by minimising their negative log-likelihood; ``predict_proba`` is
softmax(log score / T), a monotone map of the scores (the argmax never changes). Clips of
classes with one support clip cannot be left out: with one shot per class there is no calibration
data, T stays 1 and ``calibrated_`` is False (``predict_proba`` is then the uncalibrated one). The
leave-one-out probabilities' 1 - p_y are kept as ``nonconformity_``, the calibration scores of
the conformal sets.

Reject option (``unknown=accept``, a fraction in (0, 1)): each clip gets a known score
(:func:`known_scores`, higher = more like the support set), chosen by ``unknown_score``:
"centroid-z" (the default, chosen on validation episodes by research/reject_scores.py), each
head's cosine to the predicted class's centroid standardised by that class's mean and the head's
within-class spread of the support clips' leave-one-out cosines, averaged with the class's head
weights and over all heads, the two averages' mean (:func:`calm._calibration.centroid_z`); or
"top-proba", the calibrated top probability p as the log-odds log(p / (1 - p)).
``reject_threshold_`` is set from the leave-one-out known scores of the support clips
(:func:`calm._calibration.reject_threshold`) so that about a fraction ``accept`` of clips of the
known classes score at least it, and ``predict`` returns ``unknown_label`` for a clip scoring below
it. With one shot per class there are no leave-one-out scores: the threshold rejects
nothing and ``fit`` warns. It needs calibration.
"""

from __future__ import annotations

import warnings
from typing import Any, Protocol

import numpy as np
import torch

from calm import _calibration as cal
from calm import _heads as H
from calm.classifiers.features import Features
from calm.errors import ParameterError
from calm.methods import UNKNOWN_SCORES
from calm.serialization import TensorSpec

__all__ = [
    "MAX_CALIBRATION_CLIPS",
    "Calibratable",
    "calibration_rows",
    "float64_rows",
    "fit_calibration",
    "known_scores",
    "predict_set",
    "proba",
    "reject_info",
    "reject_line",
    "sets_of",
    "state_specs",
    "with_unknown",
]


class Calibratable(Protocol):
    """What this module reads of a fitted head classifier (:class:`calm.classifiers.base.HeadClassifier`)."""

    calibration: str | None
    classes_: np.ndarray
    class_counts_: np.ndarray
    centroids_: np.ndarray
    n_heads_: int
    metadata_: dict[str, Any]
    temperature_: float
    nonconformity_: np.ndarray
    calibrated_: bool
    unknown: float | None
    unknown_score: str
    unknown_label: Any
    reject_threshold_: float
    known_mean_: np.ndarray
    known_spread_: np.ndarray

    def _query(self, X: Any) -> Features: ...
    def class_scores(self, X: Any) -> np.ndarray: ...
    def predict_proba(self, X: Any) -> np.ndarray: ...
    def _proba(self, scores: np.ndarray) -> np.ndarray: ...
    def _log_scores(self, scores: np.ndarray) -> np.ndarray: ...
    def _contributions(self, cos: torch.Tensor) -> torch.Tensor: ...
    def _loo_scores(self, cos_in: torch.Tensor, cos_loo: torch.Tensor, y: torch.Tensor) -> torch.Tensor: ...
    def _held_out_log_scores(
        self, feats: Features, y_idx: np.ndarray, usable: np.ndarray
    ) -> np.ndarray | None: ...
    def _head_parts(self, x: torch.Tensor, cos: torch.Tensor) -> torch.Tensor: ...
    def _head_weights(self) -> np.ndarray: ...


#: The saved calibration (``calibration="loo-temperature"``): the temperature (a scalar) and the
#: leave-one-out nonconformity scores of the support clips (one per clip that could be left out).
#: A float attribute is saved as a tensor of shape (1,) and restored as a float.
_CALIBRATION_SPECS = (
    TensorSpec("temperature", (1,), bounds=(float(cal.TEMPERATURES[0]), float(cal.TEMPERATURES[-1]))),
    TensorSpec("nonconformity", (None,), bounds=(0, 1)),
)
#: The saved rejection threshold (``unknown`` set): a known score, shape (1,).
_REJECT_SPECS = (TensorSpec("reject_threshold", (1,)),)
#: The saved statistics of ``unknown_score="centroid-z"`` (with calibration): per class and head
#: the support clips' mean leave-one-out cosine to their centroid, per head the within-class spread.
_KNOWN_SPECS = (
    TensorSpec("known_mean", ("C", "K"), bounds=(-1, 1)),
    TensorSpec("known_spread", ("K",), bounds=(cal.SPREAD_FLOOR, np.inf)),
)


def state_specs(params: dict[str, Any]) -> tuple[TensorSpec, ...]:
    """The saved tensors of this module's fitted state for an estimator with ``params``."""
    calibrated = params.get("calibration") is not None
    return (
        (_CALIBRATION_SPECS if calibrated else ())
        + (_REJECT_SPECS if params.get("unknown") is not None else ())
        + (_KNOWN_SPECS if calibrated and params.get("unknown_score") == "centroid-z" else ())
    )


#: At most this many support clips are left out to fit T and give the conformal scores (taken
#: round-robin over the classes): one temperature needs few, and leaving out every clip of a large
#: support set (VGGSound: 3,090 clips x 309 classes) would cost several times the fit itself.
MAX_CALIBRATION_CLIPS = 256

#: Bytes of one chunk's (rows, K, C) float64 cosines and contributions.
_CHUNK_BYTES = 64 * 2**20


def float64_rows(K: int, d: int, C: int) -> int:
    """Rows per chunk of float64 work on (rows, K, max(C, d)) arrays: cosines, contributions."""
    return max(1, _CHUNK_BYTES // (8 * K * max(C, d) * 3))


def calibration_rows(usable: np.ndarray, y_idx: np.ndarray, limit: int) -> np.ndarray:
    """Boolean mask of the support clips left out for calibration: every `usable` one when there
    are at most `limit`, else `limit` of them taken round-robin over the classes (each class's
    first clips first; the support order is the episode's random draw)."""
    rows = np.flatnonzero(usable)
    if len(rows) <= limit:
        return np.asarray(usable, dtype=bool)
    rank = np.zeros(len(y_idx), dtype=np.int64)
    for c in np.unique(y_idx[rows]):
        members = rows[y_idx[rows] == c]
        rank[members] = np.arange(len(members))
    chosen = rows[np.lexsort((rows, rank[rows]))[:limit]]
    mask = np.zeros(len(y_idx), dtype=bool)
    mask[chosen] = True
    return mask


def fit_calibration(clf: Calibratable, feats: Features, y_idx: np.ndarray) -> None:
    """Set ``temperature_``, ``nonconformity_`` and ``calibrated_`` of a fitted ``clf`` from its
    support features and class indices, with ``unknown_score="centroid-z"`` its support statistics
    (``known_mean_``, ``known_spread_``), and with ``unknown`` its ``reject_threshold_`` from the
    leave-one-out known scores (nothing, and those attributes removed, with ``calibration=None``)."""
    for attr in ("temperature_", "nonconformity_", "calibrated_", "reject_threshold_", *_KNOWN_STATE):
        clf.__dict__.pop(attr, None)  # from an earlier fit
    if clf.calibration is None:
        if clf.unknown is not None:
            raise ParameterError("unknown= needs calibration='loo-temperature' (its leave-one-out scores)")
        return
    counts, usable = _left_out_rows(clf, y_idx)
    centroids = torch.as_tensor(np.asarray(clf.centroids_, dtype=np.float64))
    C, K, d = centroids.shape
    centroid_z = clf.unknown_score == "centroid-z"
    reject_z = centroid_z and clf.unknown is not None  # the LOO "centroid-z" scores are needed
    logs, ys, own, at_pred, w_pred = [], [], [], [], []
    held_out = clf._held_out_log_scores(feats, y_idx, usable.numpy())  # None: leave-one-out scores
    for start, xb in feats.chunks(float64_rows(K, d, C), torch.float64):
        yb = torch.as_tensor(y_idx[start : start + len(xb)])
        keep = usable[start : start + len(xb)]
        if not bool(keep.any()):
            continue
        cos_in, cos_loo = cal.loo_cosines(xb[keep], yb[keep], centroids, counts)
        log_scores = _left_out_scores(clf, held_out, (start, keep), (cos_in, cos_loo), yb[keep])
        logs.append(log_scores)
        ys.append(yb[keep].numpy())
        if centroid_z:
            own.append(_at(cos_loo, yb[keep].numpy()))
        if reject_z:
            pred = np.argmax(log_scores, axis=1)
            at_pred.append(_at(cos_loo, pred))
            w_pred.append(_loo_pred_weights(clf, cos_in, cos_loo, yb[keep], pred))
    y_loo = np.concatenate(ys) if ys else np.zeros(0, dtype=np.int64)
    log_scores = np.concatenate(logs) if logs else np.zeros((0, C))
    clf.temperature_ = cal.fit_temperature(log_scores, y_loo)
    loo_proba = cal.calibrated_proba(log_scores, clf.temperature_)
    clf.nonconformity_ = cal.nonconformity(loo_proba, y_loo)
    clf.calibrated_ = len(y_loo) > 0
    own_cos = np.concatenate(own) if own else np.zeros((0, K))
    if centroid_z:
        clf.known_mean_, clf.known_spread_ = cal.known_statistics(own_cos, y_loo, C)
    if clf.unknown is None:
        return
    if not clf.calibrated_:
        warnings.warn(
            "unknown=: no class has two support clips, so there are no leave-one-out scores to set "
            "the rejection threshold from; nothing will be rejected",
            UserWarning,
            stacklevel=3,
        )
    if reject_z:
        pred_cos = np.concatenate(at_pred) if at_pred else np.zeros((0, K))
        weights = np.concatenate(w_pred) if w_pred else np.zeros((0, K))
        loo = _loo_centroid_z(clf, (pred_cos, weights), own_cos, np.argmax(log_scores, axis=1), y_loo)
    else:
        loo = cal.top_log_odds(log_scores, clf.temperature_)
    clf.reject_threshold_ = cal.reject_threshold(loo, clf.unknown)


def _left_out_rows(clf: Calibratable, y_idx: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """Class counts (C,) of ``clf`` and the mask (n,) of the support clips that can be left out
    (classes of 2 clips or more), at most MAX_CALIBRATION_CLIPS (:func:`calibration_rows`)."""
    counts = torch.as_tensor(np.asarray(clf.class_counts_))
    usable = calibration_rows(counts.numpy()[y_idx] >= 2, y_idx, MAX_CALIBRATION_CLIPS)
    return counts, torch.as_tensor(usable)


def _left_out_scores(
    clf: Calibratable,
    held_out: np.ndarray | None,
    rows: tuple[int, torch.Tensor],
    cos: tuple[torch.Tensor, torch.Tensor],
    y: torch.Tensor,
) -> np.ndarray:
    """Log-scores (m, C) of the support clips ``rows`` (chunk start, mask of the chunk's clips left
    out) of classes ``y`` (m,): rows of ``clf``'s own ``held_out`` scores (n, C) when it gives them,
    else its leave-one-out scores of their cosines ``cos`` (in-sample, leave-one-out)."""
    if held_out is None:
        return clf._log_scores(clf._loo_scores(*cos, y).numpy())
    start, keep = rows
    out: np.ndarray = held_out[start : start + len(keep)][keep.numpy()]
    return out


#: The fitted state of ``unknown_score="centroid-z"``: per class and head the support clips' mean
#: leave-one-out cosine to their centroid (C, K), per head the within-class spread (K,).
_KNOWN_STATE = ("known_mean_", "known_spread_")


def _at(cos: torch.Tensor, idx: np.ndarray) -> np.ndarray:
    """Cosines (n, K) of ``cos`` (n, K, C) at class ``idx`` (n,) of each row."""
    index = torch.as_tensor(idx).view(-1, 1, 1).expand(-1, cos.shape[1], 1)
    out: np.ndarray = cos.gather(-1, index)[..., 0].numpy()
    return out


def _loo_pred_weights(
    clf: Calibratable, cos_in: torch.Tensor, cos_loo: torch.Tensor, y: torch.Tensor, pred: np.ndarray
) -> np.ndarray:
    """Head weights (n, K) of the predicted classes ``pred`` of support clips left out: CALM's
    refitted without the clip (its ``_loo_weights``), the fitted ones otherwise (SAV)."""
    refit = getattr(clf, "_loo_weights", None)
    return clf._head_weights()[pred] if refit is None else np.asarray(refit(cos_in, cos_loo, y, pred))


def _loo_centroid_z(
    clf: Calibratable,
    at_pred: tuple[np.ndarray, np.ndarray],
    own: np.ndarray,
    pred: np.ndarray,
    y_loo: np.ndarray,
) -> np.ndarray:
    """Leave-one-out "centroid-z" scores (n,) of the support clips left out: ``at_pred``, their
    cosines (n, K) to the predicted class's centroid without them and that class's head weights
    (n, K) refitted without them, the cosines standardised by the class's mean without their own
    cosine where the prediction is their class (``own``, true classes ``y_loo``)."""
    pred_cos, weights = at_pred
    means = clf.known_mean_[pred].copy()
    n_c = np.bincount(y_loo, minlength=len(clf.classes_)).astype(np.float64)[pred]
    same = (pred == y_loo) & (n_c > 1)
    means[same] = (n_c[same, None] * means[same] - own[same]) / (n_c[same, None] - 1)
    return cal.centroid_z(pred_cos, means, clf.known_spread_, weights)


def known_scores(clf: Calibratable, X: Any, scores: np.ndarray | None = None) -> np.ndarray:
    """The known score (n,) of clips X under ``clf.unknown_score`` (higher: more like the support
    set; the reject option rejects a clip scoring below ``reject_threshold_``): "top-proba", the
    log-odds of the calibrated top probability; "centroid-z", :func:`calm._calibration.centroid_z`
    at the predicted class. ``scores``: ``clf.class_scores(X)`` when already computed."""
    scores = clf.class_scores(X) if scores is None else scores
    if clf.unknown_score == "top-proba":
        return cal.top_log_odds(clf._log_scores(scores), getattr(clf, "temperature_", 1.0))
    if not hasattr(clf, "known_mean_"):
        raise ParameterError(
            'unknown_score="centroid-z" needs its support statistics: fit with it and '
            'calibration="loo-temperature"'
        )
    pred = np.argmax(scores, axis=1)
    feats = clf._query(X)
    centroids = torch.as_tensor(np.asarray(clf.centroids_, dtype=np.float64))
    C, K, d = centroids.shape
    unit = H.l2_normalize(centroids)
    out = np.empty(feats.n)
    weights = clf._head_weights()
    for start, xb in feats.chunks(float64_rows(K, d, C), torch.float64):
        p = pred[start : start + len(xb)]
        cos = torch.einsum("nkd,nkd->nk", H.l2_normalize(xb), unit[torch.as_tensor(p)]).numpy()
        out[start : start + len(xb)] = cal.centroid_z(cos, clf.known_mean_[p], clf.known_spread_, weights[p])
    return out


def with_unknown(clf: Calibratable, labels: np.ndarray, rejection: np.ndarray) -> np.ndarray:
    """``labels`` (n,) with ``unknown_label`` where the ``rejection`` score (n,) is below
    ``reject_threshold_`` (unchanged when ``unknown`` is None); an array of the labels' dtype when
    it holds ``unknown_label`` too (strings), else an object array."""
    if getattr(clf, "unknown", None) is None:
        return labels
    rejected = np.asarray(rejection, dtype=np.float64) < clf.reject_threshold_
    if not rejected.any():
        return labels
    marker = np.asarray(clf.unknown_label)
    strings = labels.dtype.kind in "US" and marker.dtype.kind in "US"
    out = labels.astype(np.result_type(labels, marker) if strings else object)
    out[rejected] = clf.unknown_label
    return out


def proba(clf: Calibratable, scores: np.ndarray) -> np.ndarray:
    """Probabilities (n, C) of class ``scores``: calibrated where ``clf`` was, else ``clf._proba``."""
    if clf.calibration is None or not getattr(clf, "calibrated_", False):
        return clf._proba(scores)
    return cal.calibrated_proba(clf._log_scores(scores), clf.temperature_)


def predict_set(clf: Calibratable, X: Any, alpha: float) -> list[list[Any]]:
    """For each clip, the classes (entries of ``classes_``) that cannot be excluded at level
    ``alpha``: those with 1 - p_c(x) at most the conformal threshold of the leave-one-out
    nonconformity scores. Without calibration data (one shot, ``calibration=None``) or with too
    few support clips for ``alpha`` no class can be excluded: every class is in every set."""
    _check_alpha(alpha)  # before the probabilities
    return sets_of(clf, clf.predict_proba(X), alpha)


def _check_alpha(alpha: float) -> None:
    if not 0.0 < alpha < 1.0:
        raise ParameterError(f"alpha must be in (0, 1), got {alpha!r}")


def sets_of(clf: Calibratable, probabilities: np.ndarray, alpha: float) -> list[list[Any]]:
    """:func:`predict_set` of probability rows (n, C) already computed by ``clf.predict_proba``."""
    _check_alpha(alpha)
    scores = getattr(clf, "nonconformity_", np.zeros(0)) if getattr(clf, "calibrated_", False) else []
    member = cal.prediction_sets(probabilities, cal.conformal_threshold(np.asarray(scores), alpha))
    return [list(clf.classes_[row]) for row in member]


def reject_info(clf: Any) -> dict[str, Any] | None:
    """How ``clf`` rejects, JSON-ready (None without ``unknown``): the accept rate asked for, the
    label, the known score (``unknown_score``: its name and description) and its threshold, the
    smallest calibrated top probability accepted ("top-proba" only), and whether anything can be
    rejected (not with one shot per class)."""
    if getattr(clf, "unknown", None) is None:
        return None
    t = float(clf.reject_threshold_)
    name = getattr(clf, "unknown_score", "top-proba")
    out = {
        "accept_rate": float(clf.unknown),
        "label": clf.unknown_label,
        "score": name,
        "score_description": UNKNOWN_SCORES[name],
        "threshold": t,
        "active": t > cal.ACCEPT_ALL,
    }
    if name == "top-proba":
        out["min_probability"] = float(1.0 / (1.0 + np.exp(-t))) if t > cal.ACCEPT_ALL else 0.0
    return out


def reject_line(clf: Any) -> str | None:
    """:func:`reject_info` as one line for the command line (None without a reject option)."""
    info = reject_info(clf)
    if info is None:
        return None
    if not info["active"]:
        return "reject option: inactive (no class has two support clips to set its threshold from)"
    return (
        f"reject option: accepts about {100 * info['accept_rate']:.0f} % of clips of the known classes; "
        f"score {info['score']} ({info['score_description']}), "
        f"{info['label']!r} below {info['threshold']:.4g}"
    )
