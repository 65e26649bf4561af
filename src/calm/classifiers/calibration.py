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
(:func:`known_scores`, higher = more like the support set) by ``unknown_score`` (`calm.methods`);
``reject_threshold_`` is set from the support clips' leave-one-out known scores
(:func:`calm._calibration.reject_threshold`) so that about a fraction ``accept`` of clips of the
known classes score at least it, and ``predict`` returns ``unknown_label`` for a clip scoring below
it. With one shot per class there are no leave-one-out scores: nothing is rejected and ``fit``
warns. It needs calibration.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch

from calm import _calibration as cal
from calm import _heads as H
from calm.classifiers.features import Features
from calm.errors import ParameterError
from calm.serialization import TensorSpec

__all__ = [
    "MAX_CALIBRATION_CLIPS",
    "CENTROID_Z_SCORES",
    "Calibratable",
    "LeaveOneOut",
    "calibration_rows",
    "class_ranks",
    "float64_chunks",
    "fit_calibration",
    "known_scores",
    "leave_one_out",
    "loo_known_scores",
    "predict_set",
    "proba",
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
    known_loc_: np.ndarray
    known_scale_: np.ndarray

    def _query(self, X: Any) -> Features: ...
    def class_scores(self, X: Any) -> np.ndarray: ...
    def predict_proba(self, X: Any) -> np.ndarray: ...
    def _proba(self, scores: np.ndarray) -> np.ndarray: ...
    def _log_scores(self, scores: np.ndarray) -> np.ndarray: ...
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
#: The saved statistics of ``unknown_score`` "centroid-z" and "centroid-z+top" (with calibration):
#: per class and head the support clips' mean leave-one-out cosine to their centroid, per head the
#: within-class spread.
_KNOWN_SPECS = (
    TensorSpec("known_mean", ("C", "K"), bounds=(-1, 1)),
    TensorSpec("known_spread", ("K",), bounds=(cal.SPREAD_FLOOR, np.inf)),
)
#: The saved scales of ``unknown_score="centroid-z+top"``: the locations and scales of the support
#: clips' leave-one-out centroid-z and top log-odds, shape (2,) each.
_SUM_SPECS = (
    TensorSpec("known_loc", (2,)),
    TensorSpec("known_scale", (2,), bounds=(cal.SPREAD_FLOOR, np.inf)),
)


#: The known scores built on the centroid-z support statistics (``known_mean_``, ``known_spread_``).
CENTROID_Z_SCORES = ("centroid-z", "centroid-z+top")

#: The fitted state of the known scores: the attributes of ``_KNOWN_SPECS`` and ``_SUM_SPECS``.
_KNOWN_STATE = tuple(spec.name + "_" for spec in _KNOWN_SPECS + _SUM_SPECS)


def state_specs(params: dict[str, Any]) -> tuple[TensorSpec, ...]:
    """The saved tensors of this module's fitted state for an estimator with ``params``."""
    calibrated = params.get("calibration") is not None
    score = params.get("unknown_score")
    return (
        (_CALIBRATION_SPECS if calibrated else ())
        + (_REJECT_SPECS if params.get("unknown") is not None else ())
        + (_KNOWN_SPECS if calibrated and score in CENTROID_Z_SCORES else ())
        + (_SUM_SPECS if calibrated and score == "centroid-z+top" else ())
    )


#: At most this many support clips are left out to fit T and give the conformal scores (taken
#: round-robin over the classes): one temperature needs few, and leaving out every clip of a large
#: support set (VGGSound: 3,090 clips x 309 classes) would cost several times the fit itself.
MAX_CALIBRATION_CLIPS = 256

#: Bytes of one chunk's (rows, K, C) float64 cosines and contributions.
_CHUNK_BYTES = 64 * 2**20


def float64_chunks(
    clf: Calibratable, feats: Features
) -> tuple[torch.Tensor, Iterator[tuple[int, torch.Tensor]]]:
    """``clf``'s stored centroids (C, K, d) and ``feats``' (start, (rows, K, d)) chunks in float64, as
    many rows as keep a chunk's float64 work on (rows, K, max(C, d)) arrays (cosines) in budget."""
    centroids = torch.as_tensor(np.asarray(clf.centroids_, dtype=np.float64))
    C, K, d = centroids.shape
    return centroids, feats.chunks(max(1, _CHUNK_BYTES // (8 * K * max(C, d) * 3)), torch.float64)


def class_ranks(y_idx: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Rank (n,) of each ``mask`` (n,) clip among its class's masked clips in support order
    (0, 1, ...), -1 elsewhere: the round-robin order over the classes of the clips left out."""
    mask, rank = np.asarray(mask, dtype=bool), np.full(len(y_idx), -1, dtype=np.int64)
    for c in np.unique(y_idx[mask]):
        members = np.flatnonzero(mask & (y_idx == c))
        rank[members] = np.arange(len(members))
    return rank


def calibration_rows(usable: np.ndarray, y_idx: np.ndarray, limit: int) -> np.ndarray:
    """Boolean mask of the support clips left out for calibration: every `usable` one when there
    are at most `limit`, else `limit` of them taken round-robin over the classes (each class's
    first clips first; the support order is the episode's random draw)."""
    rows = np.flatnonzero(usable)
    if len(rows) <= limit:
        return np.asarray(usable, dtype=bool)
    rank = class_ranks(y_idx, usable)
    chosen = rows[np.lexsort((rows, rank[rows]))[:limit]]
    mask = np.zeros(len(y_idx), dtype=bool)
    mask[chosen] = True
    return mask


def fit_calibration(clf: Calibratable, feats: Features, y_idx: np.ndarray) -> None:
    """Set ``temperature_``, ``nonconformity_`` and ``calibrated_`` of a fitted ``clf`` from its
    support features and class indices, the support statistics of its ``unknown_score``
    (``known_mean_``, ``known_spread_``; for "centroid-z+top" also ``known_loc_``, ``known_scale_``),
    and with ``unknown`` its ``reject_threshold_`` from the leave-one-out known scores (nothing, and
    those attributes removed, with ``calibration=None``)."""
    for attr in ("temperature_", "nonconformity_", "calibrated_", "reject_threshold_", *_KNOWN_STATE):
        clf.__dict__.pop(attr, None)  # from an earlier fit
    if clf.calibration is None:
        if clf.unknown is not None:
            raise ParameterError("unknown= needs calibration='loo-temperature' (its leave-one-out scores)")
        return
    score, loo = clf.unknown_score, leave_one_out(clf, feats, y_idx)
    clf.temperature_ = cal.fit_temperature(loo.log_scores, loo.y)
    loo_proba = cal.calibrated_proba(loo.log_scores, clf.temperature_)
    clf.nonconformity_ = cal.nonconformity(loo_proba, loo.y)
    clf.calibrated_ = len(loo.y) > 0
    if score in CENTROID_Z_SCORES:
        clf.known_mean_, clf.known_spread_ = cal.known_statistics(loo.own, loo.y, len(clf.classes_))
    if score == "centroid-z+top":
        clf.known_loc_, clf.known_scale_ = cal.score_scales(_loo_parts(clf, loo))
    if clf.unknown is None:
        return
    if not clf.calibrated_:
        warnings.warn(
            "unknown=: no class has two support clips, so there are no leave-one-out scores to set "
            "the rejection threshold from; nothing will be rejected",
            UserWarning,
            stacklevel=3,
        )
    clf.reject_threshold_ = cal.reject_threshold(loo_known_scores(clf, loo), clf.unknown)


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


@dataclass
class LeaveOneOut:
    """The support clips left out (:data:`MAX_CALIBRATION_CLIPS` at most): their classes ``y``
    (m,), leave-one-out log class scores ``log_scores`` (m, C), cosines ``own`` (m, K) to their own
    class's centroid without them, ``pred_cos`` (m, K) to the predicted class's centroid (without
    them where it is their class) and that class's head weights ``pred_weights`` (m, K) refitted
    without them (these three (0, K) under "top-proba", which reads none of them)."""

    y: np.ndarray  # (m,)
    log_scores: np.ndarray  # (m, C)
    own: np.ndarray  # (m, K)
    pred_cos: np.ndarray  # (m, K)
    pred_weights: np.ndarray  # (m, K)


def leave_one_out(clf: Calibratable, feats: Features, y_idx: np.ndarray) -> LeaveOneOut:
    """The :class:`LeaveOneOut` quantities of a fitted ``clf``'s support clips (classes of two clips
    or more), chunk by chunk."""
    counts = torch.as_tensor(np.asarray(clf.class_counts_))
    usable = torch.as_tensor(calibration_rows(counts.numpy()[y_idx] >= 2, y_idx, MAX_CALIBRATION_CLIPS))
    centroids, chunks = float64_chunks(clf, feats)
    C, K, _ = centroids.shape
    logs, ys, own, pred_cos, pred_w = [], [], [], [], []
    held_out = clf._held_out_log_scores(feats, y_idx, usable.numpy())  # None: leave-one-out scores
    centroid_z = clf.unknown_score in CENTROID_Z_SCORES
    for start, xb in chunks:
        yb = torch.as_tensor(y_idx[start : start + len(xb)])
        keep = usable[start : start + len(xb)]
        if not bool(keep.any()):
            continue
        cos_in, cos_loo = cal.loo_cosines(xb[keep], yb[keep], centroids, counts)
        log_scores = _left_out_scores(clf, held_out, (start, keep), (cos_in, cos_loo), yb[keep])
        logs.append(log_scores)
        ys.append(yb[keep].numpy())
        if not centroid_z:
            continue
        own.append(cal.at_class(cos_loo, yb[keep].numpy()))
        pred = np.argmax(log_scores, axis=1)
        pred_cos.append(cal.at_class(cos_loo, pred))
        pred_w.append(_loo_pred_weights(clf, cos_in, cos_loo, yb[keep], pred))

    def rows(parts: list[np.ndarray], width: int) -> np.ndarray:
        return np.concatenate(parts) if parts else np.zeros((0, width))

    return LeaveOneOut(
        y=np.concatenate(ys) if ys else np.zeros(0, dtype=np.int64),
        log_scores=rows(logs, C),
        own=rows(own, K),
        pred_cos=rows(pred_cos, K),
        pred_weights=rows(pred_w, K),
    )


def loo_known_scores(clf: Calibratable, loo: LeaveOneOut) -> np.ndarray:
    """The known scores (m,) under ``clf.unknown_score`` of the support clips left out (each scored
    as :func:`known_scores` scores a query, with what depends on the clip refitted without it)."""
    if clf.unknown_score == "top-proba":
        return cal.top_log_odds(loo.log_scores, clf.temperature_)
    if clf.unknown_score == "centroid-z":
        return _loo_centroid_z(clf, loo)
    return cal.standardised_sum(_loo_parts(clf, loo), clf.known_loc_, clf.known_scale_)


def _loo_parts(clf: Calibratable, loo: LeaveOneOut) -> np.ndarray:
    """The parts (m, 2) of "centroid-z+top" of the support clips left out: centroid-z, top log-odds."""
    return np.stack([_loo_centroid_z(clf, loo), cal.top_log_odds(loo.log_scores, clf.temperature_)], axis=1)


def _loo_pred_weights(
    clf: Calibratable, cos_in: torch.Tensor, cos_loo: torch.Tensor, y: torch.Tensor, pred: np.ndarray
) -> np.ndarray:
    """Head weights (n, K) of the predicted classes ``pred`` of support clips left out: CALM's
    refitted without the clip (its ``_loo_weights``), the fitted ones otherwise (SAV)."""
    refit = getattr(clf, "_loo_weights", None)
    return clf._head_weights()[pred] if refit is None else np.asarray(refit(cos_in, cos_loo, y, pred))


def _loo_centroid_z(clf: Calibratable, loo: LeaveOneOut) -> np.ndarray:
    """Leave-one-out "centroid-z" scores (m,) of the support clips left out: their cosines to the
    predicted class's centroid without them and that class's head weights refitted without them,
    the cosines standardised by the class's mean without their own cosine where the prediction is
    their class."""
    pred = np.argmax(loo.log_scores, axis=1)
    means = clf.known_mean_[pred].copy()
    n_c = np.bincount(loo.y, minlength=len(clf.classes_)).astype(np.float64)[pred]
    same = (pred == loo.y) & (n_c > 1)
    means[same] = (n_c[same, None] * means[same] - loo.own[same]) / (n_c[same, None] - 1)
    return cal.centroid_z(loo.pred_cos, means, clf.known_spread_, loo.pred_weights)


def known_scores(clf: Calibratable, X: Any, scores: np.ndarray | None = None) -> np.ndarray:
    """The known score (n,) of clips X under ``clf.unknown_score`` (higher: more like the support
    set; the reject option rejects a clip scoring below ``reject_threshold_``): "top-proba", the
    log-odds of the calibrated top probability; "centroid-z", :func:`calm._calibration.centroid_z`
    at the predicted class; "centroid-z+top", the two on the support clips' scales and summed
    (:func:`calm._calibration.standardised_sum`). ``scores``: ``clf.class_scores(X)`` when already
    computed."""
    scores = clf.class_scores(X) if scores is None else scores
    top = cal.top_log_odds(clf._log_scores(scores), getattr(clf, "temperature_", 1.0))
    if clf.unknown_score == "top-proba":
        return top
    if not hasattr(clf, "known_mean_"):
        raise ParameterError(
            f'unknown_score="{clf.unknown_score}" needs its support statistics: fit with it and '
            'calibration="loo-temperature"'
        )
    z = _centroid_z(clf, X, np.argmax(scores, axis=1))
    if clf.unknown_score == "centroid-z":
        return z
    return cal.standardised_sum(np.stack([z, top], axis=1), clf.known_loc_, clf.known_scale_)


def _centroid_z(clf: Calibratable, X: Any, pred: np.ndarray) -> np.ndarray:
    """:func:`calm._calibration.centroid_z` (n,) of clips X at their predicted classes ``pred``."""
    feats = clf._query(X)
    centroids, chunks = float64_chunks(clf, feats)
    unit = H.l2_normalize(centroids)
    out = np.empty(feats.n)
    weights = clf._head_weights()
    for start, xb in chunks:
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
