"""The linear probe (method ``linear-probe``): logistic regression on the flattened, standardised
head features, what a practitioner tries first; a head classifier like SAV and CALM (files,
calibration, reject option, conformal sets, ``explain``, ``partial_fit``)."""

from __future__ import annotations

from numbers import Integral, Real
from typing import Any, ClassVar, NamedTuple

import numpy as np
import torch
from sklearn.utils._param_validation import Interval
from threadpoolctl import threadpool_limits

from calm.classifiers import support
from calm.classifiers.base import HeadClassifier
from calm.classifiers.calibration import class_ranks
from calm.classifiers.features import CHUNK_BYTES, Features
from calm.classifiers.files import register
from calm.methods import DEFAULTS
from calm.serialization import TensorSpec

__all__ = ["HELD_OUT_FOLDS", "LinearProbe", "ProbeWeights"]

#: Folds of the held-out probe scores that calibrate ``predict_proba`` (and set the reject
#: threshold): each support clip that can be held out is scored by a probe fitted without its fold.
HELD_OUT_FOLDS = 5

#: A feature whose support spread is below this is constant: it is centred, not scaled.
_MIN_SCALE = 1e-8


def _standardisation(X: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-feature mean and spread (D,) of float32 rows X (n, D); constant features get spread 1."""
    mean, scale = X.mean(0), X.std(0)
    scale[scale < _MIN_SCALE] = 1.0  # constant features stay at 0
    return mean, scale


class ProbeWeights(NamedTuple):
    """A fitted probe on flat features (D = K * d): class scores = ((x - mean) / scale) @ coef.T +
    intercept."""

    mean: np.ndarray  # (D,)
    scale: np.ndarray  # (D,)
    coef: np.ndarray  # (C, D)
    intercept: np.ndarray  # (C,)


def fit_probe(
    X: np.ndarray, y_idx: np.ndarray, n_classes: int, C: float, max_iter: int
) -> tuple[ProbeWeights, int]:
    """(the :class:`ProbeWeights`, the solver's iterations) of a logistic regression on float32
    rows X (n, D) standardised by their mean and spread, with class indices y_idx (n,) (every index
    below n_classes present). Two classes: scikit-learn's one
    log-odds w x + b is split as -(w x + b) / 2, (w x + b) / 2 (the same probabilities, exactly the
    same difference). The BLAS runs on one thread (see :class:`LinearProbe`)."""
    from sklearn.linear_model import LogisticRegression

    mean, scale = _standardisation(X)
    with threadpool_limits(limits=1, user_api="blas"):
        model = LogisticRegression(C=C, max_iter=max_iter).fit((X - mean) / scale, y_idx)
    coef, intercept = np.asarray(model.coef_), np.asarray(model.intercept_)  # float32, as X
    if n_classes == 2:  # scikit-learn keeps one row for two classes
        coef, intercept = (
            np.concatenate([-coef / 2, coef / 2]),
            np.concatenate([-intercept / 2, intercept / 2]),
        )
    return ProbeWeights(mean, scale, coef, intercept), int(np.max(model.n_iter_))


def probe_logits(X: np.ndarray, probe: ProbeWeights) -> np.ndarray:
    """Class scores (n, C) of float32 rows X (n, D) under ``probe``: standardised, times coef
    (C, D), plus intercept (C,), in float32 as scikit-learn's ``decision_function`` computes them
    (one BLAS thread), then as float64."""
    mean, scale, coef, intercept = probe
    binary = len(coef) == 2 and np.array_equal(coef[0], -coef[1]) and intercept[0] == -intercept[1]
    with threadpool_limits(limits=1, user_api="blas"):
        if binary:  # the one log-odds column scikit-learn computes (another BLAS kernel than two)
            half = ((X - mean) / scale) @ coef[1:].T + intercept[1:]
            return np.concatenate([-half, half], axis=1).astype(np.float64)
        out: np.ndarray = (((X - mean) / scale) @ coef.T + intercept).astype(np.float64)
    return out


def held_out_folds(y_idx: np.ndarray, usable: np.ndarray, n_folds: int = HELD_OUT_FOLDS) -> np.ndarray:
    """Fold (n,) of each support clip: -1 where not ``usable``; the usable clips of each class take
    folds 0, 1, ... in support order, so a class of n_c >= 2 clips never has all of them in one
    fold (every fold's training part keeps every class)."""
    rank = class_ranks(y_idx, usable)
    return np.where(rank >= 0, rank % n_folds, -1)


def _log_softmax(z: np.ndarray) -> np.ndarray:
    """log-softmax over classes of scores z (n, C), float64."""
    z = np.asarray(z, dtype=np.float64)
    shifted = z - z.max(axis=1, keepdims=True)
    out: np.ndarray = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    return out


@register
class LinearProbe(HeadClassifier):
    """Logistic regression on the flattened head features, each feature standardised by its
    support-set mean and spread (method ``linear-probe``).

    Reproducible to the digit: the BLAS runs on one thread while the probe fits and scores.
    OpenBLAS splits its float32 products differently with the thread count (1 against 2 threads
    gives probabilities a few ulp apart, enough to flip a near tie), so the same seeds gave other
    accuracies under other thread counts; the probe's problems are small, one thread costs little.
    The features are read as float32 (float64 input too): the baseline the tables measured.

    The probe keeps every head (``k_`` is the head count) with the same weight 1 / K in every
    class: that is what the reject option's "centroid-z" score averages over (the cosines to the
    predicted class's centroid over "the class's kept heads" and over all heads, here the same set)
    and what ``explain`` reports as a head's weight.

    Parameters
    ----------
    C : float
        Inverse L2 regularisation strength of the logistic regression; default
        `calm.methods.DEFAULTS` (scikit-learn's 1.0).
    max_iter : int
        Iterations of the L-BFGS solver; default `calm.methods.DEFAULTS`.
    n_heads, classes, chunk_size, device, calibration, unknown, unknown_score, unknown_label,
    keep_support
        As for `calm.SAV` / `calm.CALM`. ``calibration="loo-temperature"`` fits the temperature on
        held-out probe scores: each support clip of a class with two clips or more is scored by a
        probe refitted without its fold (``HELD_OUT_FOLDS`` folds, each class's clips spread over
        them), which costs up to that many more fits; with one shot per class there is nothing to
        hold out and ``predict_proba`` is the probe's own softmax. ``partial_fit`` refits on the
        union of the kept and new clips (equal to ``fit`` on the union).

    Attributes
    ----------
    classes_ (C,), class_counts_ (C,), centroids_ (C, K, d) (for the "centroid-z" known score),
    mean_ (K, d) and scale_ (K, d) float32 standardisation, coef_ (C, K, d) and intercept_ (C,)
    float32 (class score = sum of coef_ * standardised features + intercept_), n_iter_ (the
    solver's iterations; not saved), k_ = n_heads_, head_dim_, metadata_; calibration, reject
    option and kept support as for `calm.SAV`.

    Examples
    --------
    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> X = rng.normal(size=(12, 4, 8)).astype(np.float32); X[6:, 0] += 2.0
    >>> y = np.array(["dog"] * 6 + ["rain"] * 6)
    >>> from calm import LinearProbe
    >>> clf = LinearProbe().fit(X, y)
    >>> clf.predict(X[[0, 11]]).tolist(), clf.coef_.shape
    (['dog', 'rain'], (2, 4, 8))
    """

    #: every head kept (read by the shared fit, not a parameter), all alike: no head map to draw
    #: (`calm.evaluate.head_maps`)
    k = None
    selects_heads = False

    _parameter_constraints: ClassVar[dict[str, list[Any]]] = {
        **{p: v for p, v in HeadClassifier._parameter_constraints.items() if p not in ("k", "tau_p")},
        "C": [Interval(Real, 0, None, closed="neither")],
        "max_iter": [Interval(Integral, 1, None, closed="left")],
    }

    def __init__(
        self,
        C: float = DEFAULTS["C"],
        max_iter: int = DEFAULTS["max_iter"],
        *,
        n_heads: int | None = None,
        classes: Any = None,
        chunk_size: int | None = None,
        device: Any = "cpu",
        calibration: str | None = DEFAULTS["calibration"],
        unknown: float | None = DEFAULTS["unknown"],
        unknown_score: str = DEFAULTS["unknown_score"],
        unknown_label: Any = DEFAULTS["unknown_label"],
        keep_support: bool = DEFAULTS["keep_support"],
    ):
        self.C = C
        self.max_iter = max_iter
        self.n_heads = n_heads
        self.classes = classes
        self.chunk_size = chunk_size
        self.device = device
        self.calibration = calibration
        self.unknown = unknown
        self.unknown_score = unknown_score
        self.unknown_label = unknown_label
        self.keep_support = keep_support

    @classmethod
    def _state_specs(cls, params: dict[str, Any]) -> tuple[TensorSpec, ...]:
        return (
            *super()._state_specs(params),
            TensorSpec("mean", ("K", "d")),
            TensorSpec("scale", ("K", "d"), bounds=(_MIN_SCALE, np.inf), same_dtype_as="mean"),
            TensorSpec("coef", ("C", "K", "d")),
            TensorSpec("intercept", ("C",), same_dtype_as="coef"),
        )

    # -- fitting --------------------------------------------------------------------------------

    def _support_rows(self, feats: Features) -> np.ndarray:
        """The support features as float32 rows (n, K * d) (fit checked them)."""
        X = support.as_array(feats, self._view_rows(feats), check=False)
        return np.ascontiguousarray(X.reshape(len(X), -1), dtype=np.float32)

    def _fit_heads(
        self,
        feats: Features,
        y_t: torch.Tensor,
        counts: torch.Tensor,
        rows: int,
        centroids: torch.Tensor,
    ) -> None:
        K, d, C = feats.K, feats.d, len(counts)
        X = self._support_rows(feats)
        probe, self.n_iter_ = fit_probe(X, y_t.cpu().numpy(), C, self.C, self.max_iter)
        self.mean_, self.scale_ = probe.mean.reshape(K, d), probe.scale.reshape(K, d)
        self.coef_, self.intercept_ = probe.coef.reshape(C, K, d), probe.intercept

    def _held_out_log_scores(self, feats: Features, y_idx: np.ndarray, usable: np.ndarray) -> np.ndarray:
        """Log-probabilities (n, C) of the support clips, each ``usable`` one's from a probe fitted on
        the other folds (:func:`held_out_folds`; the other rows are 0, unread)."""
        X, C = self._support_rows(feats), len(self.classes_)
        folds = held_out_folds(y_idx, usable)
        out = np.zeros((len(y_idx), C))
        for f in np.unique(folds[folds >= 0]):
            train = folds != f
            probe, _ = fit_probe(X[train], y_idx[train], C, self.C, self.max_iter)
            out[folds == f] = _log_softmax(probe_logits(X[folds == f], probe))
        return out

    def _prepare(self, unit: torch.Tensor) -> None:
        C = len(self.classes_)
        self._flat = ProbeWeights(  # on the flat features (K * d,)
            self.mean_.reshape(-1), self.scale_.reshape(-1), self.coef_.reshape(C, -1), self.intercept_
        )

    # -- predict paths --------------------------------------------------------------------------

    def class_scores(self, X: Any) -> np.ndarray:
        """The logistic regression's class scores (n, C) float64 (uncalibrated logits: the
        probabilities are their softmax); ``predict`` is their argmax."""
        feats = self._query(X)
        out = np.empty((feats.n, len(self.classes_)))
        rows = max(1, CHUNK_BYTES // (8 * self.n_features_in_))
        for start, xb in feats.chunks(rows, torch.float32):
            flat = xb.numpy().reshape(len(xb), -1)
            out[start : start + len(xb)] = probe_logits(flat, self._flat)
        return out

    def _proba(self, scores: np.ndarray) -> np.ndarray:
        """softmax of the logits (uncalibrated: the logistic regression's own probabilities)."""
        out: np.ndarray = np.exp(_log_softmax(scores))
        return out

    def _log_scores(self, scores: np.ndarray) -> np.ndarray:
        """log-softmax of the logits (the temperature divides them; the argmax is theirs)."""
        return _log_softmax(scores)

    def _head_parts(self, x: torch.Tensor, cos: torch.Tensor) -> torch.Tensor:
        """Per-head parts (n, K, C) of the class scores of features ``x`` (n, K, d): each head's
        sum of coef_ * standardised feature over its d dims (the scores are their sum plus
        ``intercept_``)."""
        xs = (x.to(torch.float32) - torch.from_numpy(self.mean_)) / torch.from_numpy(self.scale_)
        coef = torch.from_numpy(np.asarray(self.coef_, dtype=np.float64))
        return torch.einsum("nkd,ckd->nkc", xs.to(torch.float64), coef)

    def _head_weights(self) -> np.ndarray:
        """Every head with weight 1 / K in every class (the probe keeps all heads)."""
        return np.full((len(self.classes_), self.n_heads_), 1.0 / self.n_heads_)
