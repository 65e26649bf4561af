"""The few-shot protocol: every method fitted on every (shots, seed, part) episode's support set and
scored on its queries (`run_protocol`), and the heads-kept sweep behind Fig. 4 and 5 (`k_sweep`).

Every method of a seed sees the same support set, so per-seed differences between methods are paired.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from calm.evaluate.episodes import (
    Episode,
    Labels,
    episode_features,
    episodes,
    make_parts,
    row_labels,
    task_of,
)
from calm.evaluate.estimators import Method, choose_params
from calm.evaluate.head_maps import head_weights
from calm.evaluate.metrics import class_scores, evaluate_method, prediction_metrics
from calm.evaluate.predictions import episode_record
from calm.evaluate.records import Run
from calm.evaluate.summary import summarise

__all__ = ["SWEEP_FRACTIONS", "ProtocolResult", "k_sweep", "run_protocol"]

SWEEP_FRACTIONS = (0.02, 0.05, 0.1, 0.25, 0.5, 0.75, 1.0)


@dataclass
class ProtocolResult:
    """What `run_protocol` returns: `runs` (`Run.to_dict()` records), the task (`single`, `spoof`,
    `multilabel`), the classes, a one-line description of the train/test rule, the fitted
    classifiers `keep_fits` asked for ((method, shots, seed, part) -> classifier), one
    prediction record per run (`calm.evaluate.predictions`; none for multi-label tasks) and the head
    weights (C, K) of the fits `keep_heads` asked for ((method, shots) -> one per fit;
    `calm.evaluate.head_maps`)."""

    runs: list[dict]
    task: str
    classes: list[str]
    protocol: str
    fits: dict = field(default_factory=dict)
    predictions: list[dict] = field(default_factory=list)
    head_weights: dict[tuple[str, int], list[np.ndarray]] = field(default_factory=dict)


def _score(
    clf: object, Xq: np.ndarray, ep: Episode, name: str, truth: list, task: str
) -> tuple[dict, dict | None]:
    """(metrics, prediction record or None for multi-label) of a fitted classifier on the queries."""
    classes = list(ep.classes)
    if task == "multilabel":
        return evaluate_method(clf, Xq, truth, classes, task), None
    y_pred = list(clf.predict(Xq))  # type: ignore[attr-defined]
    scores = class_scores(clf, Xq, classes)
    key = {"method": name, "shots": ep.shots, "seed": ep.seed, "part": ep.part}
    record = episode_record(key, classes, ep.query, [t[0] for t in truth], y_pred, scores)
    return prediction_metrics(y_pred, scores, truth, classes, task), record


def _selection(clf: object) -> dict:
    """What a self-choosing estimator (``auto``: `calm.classifiers.auto.AutoHead`) picked on this
    support set, recorded in the run's tuning report: ``{"selection": {...}}``, or nothing."""
    choice = getattr(clf, "selection_", None)
    return {"selection": dict(choice)} if isinstance(choice, dict) else {}


def _episode_runs(
    X: np.ndarray,
    labels: Sequence[tuple[str, ...]],
    ep: Episode,
    methods: Mapping[str, Method],
    task: str,
    do_tune: bool,
) -> list[tuple[Run, object, dict | None]]:
    """(run, fitted classifier, prediction record) of every method on one episode."""
    Xs = episode_features(X, ep.support)
    Xq = episode_features(X, ep.query)
    truth = [labels[i] for i in ep.query]
    out = []
    for name, method in methods.items():
        t0 = time.perf_counter()
        params, report = choose_params(method, Xs, ep.support_y, seed=ep.seed, do_tune=do_tune)
        clf = method.build(**params).fit(Xs, ep.support_y)
        metrics, record = _score(clf, Xq, ep, name, truth, task)
        run = Run(
            method=name,
            shots=ep.shots,
            seed=ep.seed,
            part=ep.part,
            metrics=metrics,
            params=params,
            tuning={**report, **_selection(clf)},
            n_support=len(ep.support),
            n_query=len(ep.query),
            seconds=round(time.perf_counter() - t0, 4),
        )
        out.append((run, clf, record))
    return out


def run_protocol(
    X: np.ndarray,
    y: Labels,
    meta: pd.DataFrame,
    *,
    methods: Mapping[str, Method],
    shots: Sequence[int],
    seeds: Sequence[int],
    test_fold: int | str | None = 5,
    do_tune: bool = False,
    keep_fits: Callable[[str, int, int, str], bool] | None = None,
    keep_predictions: bool = True,
    keep_heads: Callable[[str, int], bool] | None = None,
    progress: Callable[[str], None] | None = None,
) -> ProtocolResult:
    """Run every (shots, seed, part) episode for every method; one run record per (episode, method),
    and (`keep_predictions`) its prediction record: each query's true and predicted class and the
    probabilities of both; `keep_heads(method, shots)`: the fit's head weights (`head_weights`)."""
    y = np.asarray(y).astype(str)
    parts, protocol = make_parts(meta, test_fold)
    labels = row_labels(y)
    task = task_of(y)
    eps = episodes(y, parts, shots, seeds)
    classes = list(eps[0].classes)
    runs: list[dict] = []
    fits: dict = {}
    predictions: list[dict] = []
    heads: dict[tuple[str, int], list[np.ndarray]] = {}
    for ep in eps if methods else []:
        for run, clf, record in _episode_runs(X, labels, ep, methods, task, do_tune):
            runs.append(run.to_dict())
            if keep_predictions and record is not None:
                predictions.append(record)
            if keep_fits is not None and keep_fits(run.method, ep.shots, ep.seed, ep.part):
                fits[(run.method, ep.shots, ep.seed, ep.part)] = clf
            w = (
                head_weights(clf, classes)
                if keep_heads is not None and keep_heads(run.method, ep.shots)
                else None
            )
            if w is not None:
                heads.setdefault((run.method, ep.shots), []).append(w)
            if progress is not None:
                progress(f"{run.method} {ep.shots}-shot seed {ep.seed} {ep.part}")
    return ProtocolResult(runs, task, classes, protocol, fits, predictions, heads)


def k_sweep(
    X: np.ndarray,
    y: Labels,
    meta: pd.DataFrame,
    *,
    methods: Mapping[str, Method],
    shots: Sequence[int],
    seeds: Sequence[int],
    test_fold: int | str | None = 5,
    fractions: Sequence[float] = SWEEP_FRACTIONS,
    progress: Callable[[str], None] | None = None,
) -> list[dict]:
    """Metrics of `methods` (CALM, CALM-global) over the number of heads kept (Fig. 4, Fig. 5 right).

    k is passed as a head count, max(1, round(fraction * K)); the other parameters keep each
    method's defaults. Same seeded episodes as the main runs.
    """
    n_heads = int(X.shape[1])
    out = []
    for fraction in fractions:
        k = max(1, round(fraction * n_heads))
        variants = {
            name: Method(name, m.build, {**m.defaults, "k": k}, m.grid) for name, m in methods.items()
        }
        res = run_protocol(
            X,
            y,
            meta,
            methods=variants,
            shots=shots,
            seeds=seeds,
            test_fold=test_fold,
            keep_predictions=False,
            progress=progress,
        )
        for s in summarise(res.runs):
            out.append({**s, "k": k, "fraction": float(fraction)})
    return out
