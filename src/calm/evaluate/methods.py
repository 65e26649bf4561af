"""The few-shot methods: the registry (`Method`, `fewshot_methods`), tuning inside the support set, and
the linear-probe baseline.

`tune=True` chooses hyper-parameters per episode by stratified cross-validation inside the support
set only (never the queries); with fewer than two support clips in some class there is nothing to
cross-validate and the defaults are used. `choose_params` is that tune-or-defaults decision, and
what it reports is recorded in every run.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from numbers import Integral, Real
from typing import Any

import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.utils._param_validation import Interval
from sklearn.utils.validation import check_is_fitted
from threadpoolctl import threadpool_limits

from calm.evaluate.episodes import ProtocolError

__all__ = [
    "FEWSHOT_METHODS",
    "LALM_METHODS",
    "PL_BASES",
    "LinearProbe",
    "Method",
    "choose_params",
    "fewshot_methods",
    "tune",
]

FEWSHOT_METHODS = ("sav", "calm-global", "calm", "linear-probe")
LALM_METHODS = ("zero-shot", "sav+pl", "calm+pl")  # need a model that answers questions
PL_BASES = {"sav+pl": "sav", "calm+pl": "calm"}  # pseudo-label method -> the few-shot method it fits


class LinearProbe(ClassifierMixin, BaseEstimator):
    """Logistic regression on the flattened, standardised head features (what a practitioner tries
    first); a scikit-learn estimator on (n, K, d) input.

    Reproducible to the digit: the BLAS runs on one thread while the probe fits and predicts.
    OpenBLAS splits its float32 products differently with the thread count (1 against 2 threads
    gives probabilities a few ulp apart, enough to flip a near tie), so the same seeds gave other
    accuracies under other thread counts; the probe's problems are small, one thread costs little.
    """

    _parameter_constraints: dict = {
        "C": [Interval(Real, 0, None, closed="neither")],
        "max_iter": [Interval(Integral, 1, None, closed="left")],
    }

    def __init__(self, C: float = 1.0, max_iter: int = 2000):
        self.C = C
        self.max_iter = max_iter

    @staticmethod
    def _flat(X) -> np.ndarray:
        X = np.asarray(X)
        return X.reshape(len(X), -1).astype(np.float32)

    def fit(self, X, y) -> LinearProbe:
        from sklearn.linear_model import LogisticRegression

        self._validate_params()
        Xf = self._flat(X)
        self.mean_ = Xf.mean(0)
        self.scale_ = Xf.std(0)
        self.scale_[self.scale_ < 1e-8] = 1.0  # constant features stay at 0
        y = np.asarray(y)
        self.classes_ = np.unique(y)
        if len(self.classes_) < 2:
            raise ProtocolError("linear probe needs at least two classes")
        with threadpool_limits(limits=1, user_api="blas"):
            self.model_ = LogisticRegression(C=self.C, max_iter=self.max_iter).fit(
                (Xf - self.mean_) / self.scale_, y
            )
        return self

    def predict_proba(self, X) -> np.ndarray:
        check_is_fitted(self, "model_")
        with threadpool_limits(limits=1, user_api="blas"):
            return self.model_.predict_proba((self._flat(X) - self.mean_) / self.scale_)

    def predict(self, X) -> np.ndarray:
        return self.classes_[np.argmax(self.predict_proba(X), axis=1)]


@dataclass(frozen=True)
class Method:
    """A few-shot method: `build(**params)` makes an unfitted estimator; `grid` is what --tune searches."""

    name: str
    build: Callable[..., Any]
    defaults: Mapping[str, Any]
    grid: Mapping[str, Sequence[Any]] = field(default_factory=dict)


def fewshot_methods(
    *,
    k: float | int = 0.25,
    tau_p: float = 0.03,
    tau_w: float = 0.5,
    sav_k: float | int | None = None,
    sav_tie_break: str = "index",
    normalization: str = "softmax",
    reliability: str = "in-sample",
) -> dict[str, Method]:
    """The few-shot methods with the given defaults (paper: tau_p 0.03, tau_w 0.5, softmax weights,
    in-sample reliability, SAV ties to the lower head index); the other values are the named
    options of `calm.SAV` / `calm.CALM`, recorded in each run's parameters."""
    from calm import classifiers

    sav_k = k if sav_k is None else sav_k
    calm_defaults = {
        "k": k,
        "tau_p": tau_p,
        "tau_w": tau_w,
        "normalization": normalization,
        "reliability": reliability,
    }
    sav_defaults = {"k": sav_k, "tie_break": sav_tie_break}
    tau_grid = [0.01, 0.03, 0.1]
    k_grid = [0.1, 0.25, 0.5]
    return {
        "sav": Method("sav", lambda **p: classifiers.SAV(**p), sav_defaults, {"k": [0.05, 0.1, 0.25, 0.5]}),
        "calm-global": Method(
            "calm-global",
            lambda **p: classifiers.CALM(weighting="global", **p),
            calm_defaults,
            {"k": k_grid, "tau_p": tau_grid, "tau_w": [0.1, 0.5, 2.0]},
        ),
        "calm": Method(
            "calm",
            lambda **p: classifiers.CALM(**p),
            calm_defaults,
            {"k": k_grid, "tau_p": tau_grid, "tau_w": [0.1, 0.5, 2.0]},
        ),
        "linear-probe": Method(
            "linear-probe", lambda **p: LinearProbe(**p), {"C": 1.0}, {"C": [0.01, 0.1, 1.0, 10.0]}
        ),
    }


def _grid_points(method: Method) -> list[dict]:
    keys = list(method.grid)
    points = [
        dict(zip(keys, values, strict=True)) for values in itertools.product(*(method.grid[k] for k in keys))
    ]
    default = {k: method.defaults[k] for k in keys if k in method.defaults}
    rest = [p for p in points if p != default]
    return [{**method.defaults, **p} for p in ([default] if len(default) == len(keys) else []) + rest]


def tune(method: Method, X: np.ndarray, y: np.ndarray, *, seed: int) -> tuple[dict, dict]:
    """Choose `method`'s parameters by stratified k-fold CV on (X, y), the support set ONLY.

    Returns (parameters, report). The defaults win ties (they are tried first; a later point must be
    strictly better). With a class of a single support clip, no CV is possible: defaults are kept.
    """
    from sklearn.model_selection import StratifiedKFold

    y = np.asarray(y)
    counts = np.unique(y, return_counts=True)[1]
    n_splits = int(min(counts.min(), 5))
    if n_splits < 2 or not method.grid:
        reason = "no grid" if not method.grid else "a class has a single support clip: no cross-validation"
        return dict(method.defaults), {"tuned": False, "reason": reason}
    folds = list(StratifiedKFold(n_splits, shuffle=True, random_state=seed).split(np.zeros(len(y)), y))
    best: dict = dict(method.defaults)
    best_score, scores = -math.inf, []
    for params in _grid_points(method):
        correct = 0
        for tr, va in folds:
            clf = method.build(**params).fit(X[tr], y[tr])
            correct += int((np.asarray(clf.predict(X[va])) == y[va]).sum())
        score = correct / len(y)
        scores.append(score)
        if score > best_score:
            best, best_score = params, score
    return dict(best), {
        "tuned": True,
        "cv_folds": n_splits,
        "cv_accuracy": 100 * best_score,
        "grid_size": len(scores),
    }


def choose_params(
    method: Method, X: np.ndarray, y: np.ndarray, *, seed: int, do_tune: bool
) -> tuple[dict, dict]:
    """(parameters, tuning report) of one fit: `tune` inside the support set, or the method's defaults."""
    if do_tune:
        return tune(method, X, y, seed=seed)
    return dict(method.defaults), {"tuned": False, "reason": "defaults (no --tune)"}
