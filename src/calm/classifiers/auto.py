"""`AutoHead`: the best of SAV, CALM-global, CALM and the linear probe for one support set, chosen by
cross-validation on the support clips only (method ``auto``).

Why: no single classifier wins everywhere. On speech emotions (EmoDB) the linear probe leads at 5
and 10 shots and SAV at one, while on ESC-10 CALM and CALM-global are the best (docs/results.md,
"EmoDB").
``AutoHead`` estimates each candidate's accuracy by stratified k-fold cross-validation inside the
support set (``cv`` folds, at most the smallest class's clip count: at 5 shots with ``cv=5`` each
fold holds out one clip per class), averaged over ``n_repeats`` shuffles of the folds
(`calm.methods.AUTO_CV_REPEATS`, chosen on validation), keeps the best, and refits it on every
support clip. The
candidates use their registered default parameters (`calm.methods.DEFAULTS`).

With a class of a single support clip there is nothing to cross-validate: ``fallback``
(`calm.methods.AUTO_FALLBACK`, CALM-global) is fitted, and ``reason_`` says so: SAV collapses on
spoken words at one shot (FSDD, speech_commands_mini: 27-48 % against 85-87 %); on EmoDB SAV is the
better one-shot method (docs/results.md, "EmoDB").

Saving writes the chosen inner classifier (a `calm.SAV` / `calm.CALM` / `calm.LinearProbe` file)
with the choice under the metadata key ``"selection"``, so `calm.load` returns a working
classifier and `calm predict` / `calm serve` read the file like any other.
"""

from __future__ import annotations

from collections.abc import Sequence
from numbers import Integral
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.utils._param_validation import Interval
from sklearn.utils.validation import check_is_fitted

from calm import methods as registry
from calm.classifiers.base import HeadClassifier
from calm.classifiers.features import labels_array
from calm.errors import ParameterError
from calm.methods import AUTO_CANDIDATES, AUTO_CV_REPEATS, AUTO_FALLBACK, DEFAULTS, EXPLAIN_HEADS

__all__ = ["AutoHead"]

#: Parameters of every candidate that ``AutoHead`` passes to the chosen one's final fit on all the
#: support clips (the cross-validation folds fit without them: only their labels are scored).
FINAL_FIT_PARAMS = ("calibration", "unknown", "unknown_score", "unknown_label", "keep_support")


# scikit-learn ships no type information: its bases are Any to mypy
class AutoHead(ClassifierMixin, BaseEstimator):  # type: ignore[misc]
    """The best of several head classifiers by cross-validation inside the support set.

    Parameters
    ----------
    candidates : sequence of str, default `calm.methods.AUTO_CANDIDATES`
        Registered head methods (`calm.methods`) to choose among, each with its default parameters.
    cv : int, default 5
        Stratified folds (at most the smallest class's support count is used; fewer than 2 possible:
        no cross-validation, ``fallback`` is fitted).
    fallback : str, default `calm.methods.AUTO_FALLBACK`
        The method fitted without cross-validation; also wins ties of the CV accuracy (otherwise
        ties go to the earlier candidate).
    random_state : int, default 0
        Seed of the first fold shuffle.
    n_repeats : int, default `calm.methods.AUTO_CV_REPEATS`
        Shuffles of the folds (seeds ``random_state``, ``random_state + 1``, ...) whose accuracies
        are averaged; 1 is the single shuffle ``auto`` used before.
    calibration, unknown, unknown_score, unknown_label, keep_support : as `calm.CALM`'s
        Given to the chosen classifier's final fit (`FINAL_FIT_PARAMS`; defaults
        `calm.methods.DEFAULTS`): its calibrated probabilities, reject option and kept support set.

    Attributes
    ----------
    estimator_ : the chosen classifier, refitted on every support clip.
    chosen_ : str, its method name.
    cv_scores_ : dict, method -> CV accuracy (%) on the support set, the mean over the shuffles
        (empty without CV).
    cv_folds_ : int, folds used (0 without CV).
    reason_ : str, how the choice was made.
    classes_ : the classes (of ``estimator_``).

    Examples
    --------
    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> X = rng.normal(size=(12, 4, 8)).astype(np.float32); X[6:] += 1.0
    >>> y = ["a"] * 6 + ["b"] * 6
    >>> clf = AutoHead(cv=3).fit(X, y)
    >>> clf.chosen_ in AUTO_CANDIDATES, sorted(clf.cv_scores_) == sorted(AUTO_CANDIDATES)
    (True, True)
    """

    _parameter_constraints: ClassVar[dict[str, list[Any]]] = {
        "candidates": [list, tuple],
        "cv": [Interval(Integral, 2, None, closed="left")],
        "fallback": [str],
        "random_state": [Interval(Integral, 0, None, closed="left")],
        "n_repeats": [Interval(Integral, 1, None, closed="left")],
        **{p: HeadClassifier._parameter_constraints[p] for p in FINAL_FIT_PARAMS},
    }

    def __init__(
        self,
        candidates: Sequence[str] = AUTO_CANDIDATES,
        cv: int = 5,
        fallback: str = AUTO_FALLBACK,
        random_state: int = 0,
        n_repeats: int = AUTO_CV_REPEATS,
        *,
        calibration: str | None = DEFAULTS["calibration"],
        unknown: float | None = DEFAULTS["unknown"],
        unknown_score: str = DEFAULTS["unknown_score"],
        unknown_label: Any = DEFAULTS["unknown_label"],
        keep_support: bool = DEFAULTS["keep_support"],
    ) -> None:
        self.candidates = candidates
        self.cv = cv
        self.fallback = fallback
        self.random_state = random_state
        self.n_repeats = n_repeats
        self.calibration = calibration
        self.unknown = unknown
        self.unknown_score = unknown_score
        self.unknown_label = unknown_label
        self.keep_support = keep_support

    def _check_methods(self) -> list[str]:
        allowed = [m for m in registry.fit_methods() if registry.info(m).estimator_class() is not AutoHead]
        names = list(self.candidates)
        bad = [m for m in [*names, self.fallback] if m not in allowed]
        if bad or not names:
            raise ParameterError(
                f"AutoHead: candidates and fallback must be among {allowed}, got {names or '[]'}"
                f" / {self.fallback!r}"
            )
        return names

    @staticmethod
    def _build(name: str, **overrides: Any) -> Any:
        return registry.build(name, {**registry.info(name).defaults(), **overrides})

    def _cv_scores(self, X: Any, y: np.ndarray, names: list[str], n_splits: int) -> dict[str, float]:
        from sklearn.model_selection import StratifiedKFold

        splits = [
            split
            for r in range(self.n_repeats)
            for split in StratifiedKFold(n_splits, shuffle=True, random_state=self.random_state + r).split(
                np.zeros(len(y)), y
            )
        ]
        scores = {}
        for name in names:
            right = 0
            for train, test in splits:
                # a fold is scored by its labels only: no calibration pass (it cannot move an argmax)
                clf = self._build(name, calibration=None).fit(X[train], y[train])
                right += int((np.asarray(clf.predict(X[test])) == y[test]).sum())
            scores[name] = round(100.0 * right / (len(y) * self.n_repeats), 4)
        return scores

    def fit(self, X: Any, y: Any) -> AutoHead:
        """Choose among ``candidates`` by CV on (X, y) -- the support set only -- and refit the
        choice on all of it."""
        self._validate_params()
        names = self._check_methods()
        y_arr = labels_array(y)
        counts = np.unique(y_arr, return_counts=True)[1]
        n_splits = int(min(self.cv, counts.min()))
        X = X if hasattr(X, "shape") else np.asarray(X)
        if n_splits < 2 or len(counts) < 2:
            chosen, scores, n_splits = self.fallback, {}, 0
            reason = f"no cross-validation (a class has a single support clip): fallback {self.fallback}"
        else:
            scores = self._cv_scores(X, y_arr, names, n_splits)
            best = max(scores.values())
            tied = [m for m in names if scores[m] == best]
            chosen = self.fallback if self.fallback in tied else tied[0]
            shuffles = f", mean of {self.n_repeats} shuffles" if self.n_repeats > 1 else ""
            reason = f"best {n_splits}-fold cross-validated accuracy on the support set{shuffles}"
        final = {p: getattr(self, p) for p in FINAL_FIT_PARAMS}
        self.estimator_ = self._build(chosen, **final).fit(X, y_arr)
        self.chosen_, self.cv_scores_, self.cv_folds_, self.reason_ = chosen, scores, n_splits, reason
        self.classes_ = self.estimator_.classes_
        return self

    @property
    def selection_(self) -> dict[str, Any]:
        """The choice as a JSON-ready dict (recorded in results.json runs and saved files)."""
        check_is_fitted(self, "estimator_")
        return {
            "chosen": self.chosen_,
            "cv_scores": dict(self.cv_scores_),
            "cv_folds": self.cv_folds_,
            "cv_repeats": self.n_repeats if self.cv_folds_ else 0,
            "reason": self.reason_,
            "candidates": list(self.candidates),
        }

    # -- the chosen classifier ---------------------------------------------------------------------

    def _fitted(self) -> Any:
        check_is_fitted(self, "estimator_")
        return self.estimator_

    def predict(self, X: Any) -> np.ndarray:
        return np.asarray(self._fitted().predict(X))

    def predict_proba(self, X: Any) -> np.ndarray:
        return np.asarray(self._fitted().predict_proba(X))

    def decision_function(self, X: Any) -> np.ndarray:
        return np.asarray(self._fitted().decision_function(X))

    def predict_set(self, X: Any, alpha: float = 0.1) -> list[list[Any]]:
        """The chosen classifier's conformal prediction sets."""
        return list(self._fitted().predict_set(X, alpha))

    def known_score(self, X: Any) -> np.ndarray:
        """The chosen classifier's known score (its reject option's, ``unknown_score``)."""
        return np.asarray(self._fitted().known_score(X))

    def explain(self, X: Any, top: int = EXPLAIN_HEADS) -> list[dict[str, Any]]:
        """The chosen classifier's `explain` (why each clip got its label)."""
        return list(self._fitted().explain(X, top))

    @property
    def n_heads_(self) -> int:
        return int(self._fitted().n_heads_)

    @property
    def class_counts_(self) -> np.ndarray:
        return np.asarray(self._fitted().class_counts_)

    @property
    def metadata_(self) -> dict[str, Any]:
        return {**self._fitted().metadata_, "selection": self.selection_}

    def save(self, path: str | Path, metadata: dict[str, Any] | None = None) -> None:
        """Write the chosen classifier to ``path`` (its own file format), with ``metadata`` plus the
        choice under ``"selection"``; `calm.load` reads it back as that classifier."""
        meta = dict(self._fitted().metadata_ if metadata is None else metadata)
        self.estimator_.save(path, {**meta, "selection": self.selection_})
