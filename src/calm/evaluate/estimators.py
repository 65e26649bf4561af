"""The few-shot methods as the protocol runs them (`Method`, `fewshot_methods`, read from
`calm.methods.REGISTRY`) and tuning inside the support set (`LinearProbe`, the linear-probe
baseline, is `calm.classifiers.LinearProbe`, re-exported here).

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
from typing import Any

import numpy as np

from calm import methods as registry
from calm.classifiers import LinearProbe

__all__ = [
    "FEWSHOT_METHODS",
    "LALM_METHODS",
    "PL_BASES",
    "ZERO_SHOT",
    "LinearProbe",
    "Method",
    "choose_params",
    "fewshot_methods",
    "tune",
]

#: the few-shot methods `calm evaluate` runs when none are named (`MethodInfo.by_default`)
FEWSHOT_METHODS = tuple(m for m in registry.names("few-shot") if registry.info(m).by_default)
LALM_METHODS = registry.names("answers", "pseudo-labels")  # need a model that answers questions
(ZERO_SHOT,) = registry.names("answers")  # the one method scoring the model's own answers
#: pseudo-label method -> the few-shot method it fits
PL_BASES = {m.name: str(m.base) for m in registry.REGISTRY.values() if m.kind == "pseudo-labels"}


@dataclass(frozen=True)
class Method:
    """A few-shot method: `build(**params)` makes an unfitted estimator; `grid` is what --tune searches."""

    name: str
    build: Callable[..., Any]
    defaults: Mapping[str, Any]
    grid: Mapping[str, Sequence[Any]] = field(default_factory=dict)


def fewshot_methods(
    *,
    k: float | int | None = None,
    tau_p: float | None = None,
    tau_w: float | None = None,
    sav_k: float | int | None = None,
    sav_tie_break: str | None = None,
    normalization: str | None = None,
    reliability: str | None = None,
    scores: str | None = None,
) -> dict[str, Method]:
    """The few-shot methods of `calm.methods.REGISTRY` with these defaults (None: the registry's
    `DEFAULTS`; `sav_k` None: `k`); the values are the named options of `calm.SAV` / `calm.CALM`,
    recorded in each run's parameters."""
    spec = _Spec(k, tau_p, tau_w, sav_k, sav_tie_break, normalization, reliability, scores)
    return {
        name: Method(name, _builder(name), m.defaults(spec), m.grid)
        for name, m in registry.REGISTRY.items()
        if m.kind == "few-shot"
    }


@dataclass(frozen=True)
class _Spec:
    """The fields of `ClassifierSpec` that `MethodInfo.defaults` reads (None: the registry's default)."""

    k: float | int | None
    tau_p: float | None
    tau_w: float | None
    sav_k: float | int | None
    sav_tie_break: str | None
    normalization: str | None
    reliability: str | None
    scores: str | None


def _builder(name: str) -> Callable[..., Any]:
    registry.info(name).estimator_class()  # imported now, not inside the first timed fit
    return lambda **params: registry.build(name, params)


def _grid_points(method: Method) -> list[dict]:
    keys = list(method.grid)
    points = [
        dict(zip(keys, values, strict=True)) for values in itertools.product(*(method.grid[k] for k in keys))
    ]
    default = {k: method.defaults[k] for k in keys if k in method.defaults}
    rest = [p for p in points if p != default]
    return [{**method.defaults, **p} for p in ([default] if len(default) == len(keys) else []) + rest]


def _labels_only(method: Method) -> dict:
    """Parameters that make a fold's fit skip its calibration pass, where the estimator has one and
    nothing needs it (a fold is scored by its labels: calibration cannot move an argmax, and the
    linear probe's refits 5 more probes)."""
    built = method.build(**method.defaults)
    params = built.get_params() if hasattr(built, "get_params") else {}
    needed = "calibration" in method.defaults or method.defaults.get("unknown") is not None
    return {"calibration": None} if "calibration" in params and not needed else {}


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
    best_score, scores, quiet = -math.inf, [], _labels_only(method)
    for params in _grid_points(method):
        correct = 0
        for tr, va in folds:
            clf = method.build(**params, **quiet).fit(X[tr], y[tr])
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
