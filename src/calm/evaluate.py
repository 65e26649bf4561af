"""The few-shot evaluation protocol: episodes, methods, metrics, summaries and paired differences.

Everything here works on a feature store's arrays, `X` (n, K, d), `y` (n,) label strings (multi-label
joined by `;`) and `meta` (columns `fold`, `split`, ...); episodes only index them, so features are
extracted once per clip.

Protocol (what `calm evaluate` runs):

- Train/test parts: an official split when the `split` column has `test` rows (train = `train` rows,
  or every non-test, non-dev row when none is marked `train`); else folds when the `fold` column is
  filled (test = `test_fold`, default 5; `"all"` rotates through every fold); else no split, and each
  episode's queries are all clips outside its support set.
- Episode (part, shots n, seed s): for each class, n support clips drawn from the training part by a
  generator seeded with (s, part, class index); a class's draws are a prefix of one seeded
  permutation, so the 1-shot support is inside the 5-shot one. Every method of a seed sees the same
  support. A class with fewer than n training clips, or a test class with no training clips, is an
  error (never dropped from the denominator).
- Multi-label (AudioSet-style) data: a clip drawn for class c joins the support as an example of c;
  each test clip is one question per true label, answered correctly when that label scores above
  every class the clip does not carry (the other true labels are not distractors). Reported:
  question accuracy, clip exact match (all of a clip's questions right) and mAP over classes.
- bonafide/spoof data: macro-F1 (primary), accuracy and the EER of the bonafide score.
- Methods that need the model to answer (`run_lalm_protocol`; the model side is injected, see
  `calm.baselines`): `zero-shot` scores the model's own answers on each episode's queries (unparsed
  answers are wrong); `sav+pl` / `calm+pl` fit SAV / CALM on the kept pseudo-labelled clips of a
  seeded unlabelled pool from the training part (`pl_pool`, outside the queries). A class with no
  kept clip cannot be predicted: its queries stay in the denominator as wrong, with a warning.
- `tune=True`: hyper-parameters chosen per episode by stratified cross-validation inside the support
  set only (never the queries); the chosen values are recorded for every run. With fewer than two
  support clips in some class there is nothing to cross-validate and the defaults are used (recorded).

Values are percentages. Summaries give mean and sample standard deviation over seeds (a seed's
value is its mean over parts when folds rotate); `paired` gives, per pair of methods, the mean
per-seed difference with a 95 % Student-t interval (the same support sets make the pairing valid).
"""

from __future__ import annotations

import itertools
import math
import time
import zlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
from sklearn.base import BaseEstimator, ClassifierMixin

from calm.data.base import LABEL_SEP

__all__ = [
    "ProtocolError",
    "Part",
    "Episode",
    "Method",
    "LinearProbe",
    "make_parts",
    "sample_episode",
    "episodes",
    "fewshot_methods",
    "tune",
    "task_of",
    "accuracy",
    "macro_f1",
    "equal_error_rate",
    "multilabel_metrics",
    "evaluate_method",
    "prediction_metrics",
    "run_protocol",
    "run_lalm_protocol",
    "pl_pool",
    "pl_episode_runs",
    "zero_shot_episode_run",
    "order_runs",
    "summarise",
    "paired_differences",
    "results_markdown",
    "PRIMARY_METRIC",
    "FEWSHOT_METHODS",
    "LALM_METHODS",
]

FEWSHOT_METHODS = ("sav", "calm-global", "calm", "linear-probe")
LALM_METHODS = ("zero-shot", "sav+pl", "calm+pl")  # need a model that answers questions
PRIMARY_METRIC = {"single": "accuracy", "spoof": "macro_f1", "multilabel": "exact_match"}
METRIC_TITLES = {
    "accuracy": "accuracy (%)",
    "macro_f1": "macro-F1 (%)",
    "eer": "EER (%, lower is better)",
    "exact_match": "exact-match accuracy (%)",
    "question_accuracy": "question accuracy (%)",
    "map": "mAP (%)",
}
METHOD_TITLES = {
    "zero-shot": "zero-shot",
    "sav": "SAV",
    "sav+pl": "SAV+PL",
    "calm-global": "CALM-global",
    "calm": "CALM",
    "calm+pl": "CALM+PL",
    "linear-probe": "linear probe",
}


class ProtocolError(ValueError):
    """An evaluation that cannot be run honestly (e.g. a test class without support clips)."""


# ----------------------------------------------------------------------------- labels and parts


def row_labels(y: Sequence[str]) -> list[tuple[str, ...]]:
    """Label strings (`a;b` for multi-label) as tuples."""
    return [tuple(p for p in str(v).split(LABEL_SEP) if p) for v in y]


def task_of(y: Sequence[str]) -> str:
    """`multilabel` if any clip has several labels, `spoof` for bonafide/spoof, else `single`."""
    labels = row_labels(y)
    if any(len(t) > 1 for t in labels):
        return "multilabel"
    if {t[0] for t in labels} == {"bonafide", "spoof"}:
        return "spoof"
    return "single"


@dataclass(frozen=True)
class Part:
    """One train/test division of the store's rows; `test` None: queries = rows outside the support."""

    name: str
    train: np.ndarray
    test: np.ndarray | None


def _column(meta: pd.DataFrame, name: str) -> pd.Series | None:
    if name not in meta.columns:
        return None
    col = meta[name]
    return None if col.isna().all() else col


def make_parts(meta: pd.DataFrame, test_fold: int | str | None = 5) -> tuple[list[Part], str]:
    """The train/test parts of a store's rows and a one-line description of the rule used."""
    n = len(meta)
    split = _column(meta, "split")
    if split is not None and (split.astype(str).str.lower() == "test").any():
        s = split.astype(str).str.lower().to_numpy()
        test = np.flatnonzero(s == "test")
        train_mask = s == "train"
        if not train_mask.any():
            train_mask = (s != "test") & (s != "dev")
        train = np.flatnonzero(train_mask)
        if len(train) == 0:
            raise ProtocolError("the split column marks no training clips")
        return [Part("official", train, test)], "official split (train -> support, test -> queries)"
    fold = _column(meta, "fold")
    if fold is not None:
        if fold.isna().any():
            raise ProtocolError(f"{int(fold.isna().sum())} clips have no fold while others do")
        folds = fold.astype(int).to_numpy()
        present = sorted(set(folds.tolist()))
        if test_fold in (None, "all"):
            chosen = present
        else:
            try:
                chosen = [int(test_fold)]
            except ValueError:
                raise ProtocolError(f"test fold {test_fold!r} is neither an integer nor 'all'") from None
            if chosen[0] not in present:
                raise ProtocolError(f"test fold {chosen[0]} not among the folds {present}")
        parts = [Part(f"fold{f}", np.flatnonzero(folds != f), np.flatnonzero(folds == f)) for f in chosen]
        which = "all (rotating)" if len(chosen) > 1 else chosen[0]
        desc = f"folds: support from the other folds, test fold {which}"
        return parts, desc
    return [Part("all", np.arange(n), None)], (
        "no official split: support drawn from all clips, queries = every clip outside the support set"
    )


# ----------------------------------------------------------------------------- episodes


@dataclass(frozen=True)
class Episode:
    part: str
    shots: int
    seed: int
    support: np.ndarray  # row indices; a multi-label row appears once per class it was drawn for
    support_y: np.ndarray  # the class each support row stands for
    query: np.ndarray  # row indices
    classes: tuple[str, ...]


def sample_episode(
    labels: Sequence[tuple[str, ...]], part: Part, shots: int, seed: int, classes: Sequence[str] | None = None
) -> Episode:
    """Draw `shots` support clips per class from `part.train` (see the module docstring)."""
    if shots < 1:
        raise ProtocolError(f"shots must be >= 1, got {shots}")
    train_classes = sorted({c for i in part.train for c in labels[i]})
    classes = list(classes) if classes is not None else train_classes
    support: list[int] = []
    support_y: list[str] = []
    part_code = zlib.crc32(part.name.encode())
    test_classes = set() if part.test is None else {c for i in part.test for c in labels[i]}
    no_train = sorted(test_classes - set(train_classes))
    if no_train:
        raise ProtocolError(
            f"test class(es) {no_train} have no support clips in part {part.name} (not in the training part)"
        )
    for ci, c in enumerate(classes):
        candidates = np.array([i for i in part.train if c in labels[i]], dtype=np.int64)
        if len(candidates) < shots:
            raise ProtocolError(
                f"class {c!r} has {len(candidates)} training clip(s) in part {part.name}, "
                f"fewer than {shots} shots"
            )
        rng = np.random.default_rng([seed, part_code, ci])
        chosen = candidates[rng.permutation(len(candidates))[:shots]]
        support.extend(chosen.tolist())
        support_y.extend([c] * shots)
    support_arr = np.array(support, dtype=np.int64)
    if part.test is None:
        query = np.setdiff1d(part.train, support_arr)
    else:
        query = np.asarray(part.test, dtype=np.int64)
    missing = sorted({c for i in query for c in labels[i]} - set(classes))
    if missing:
        raise ProtocolError(
            f"test class(es) {missing} have no support clips in part {part.name} (not in the training part)"
        )
    if len(query) == 0:
        raise ProtocolError(f"part {part.name}, {shots} shots: no query clips left outside the support set")
    return Episode(part.name, shots, seed, support_arr, np.array(support_y), query, tuple(classes))


def episodes(
    y: Sequence[str], parts: Sequence[Part], shots: Iterable[int], seeds: Iterable[int]
) -> list[Episode]:
    labels = row_labels(y)
    classes = sorted({c for t in labels for c in t})
    return [sample_episode(labels, part, n, s, classes) for n in shots for s in seeds for part in parts]


# ----------------------------------------------------------------------------- methods


class LinearProbe(ClassifierMixin, BaseEstimator):
    """Logistic regression on the flattened, standardised head features (what a practitioner tries
    first); a scikit-learn estimator on (n, K, d) input."""

    def __init__(self, C: float = 1.0, max_iter: int = 2000):
        self.C = C
        self.max_iter = max_iter

    @staticmethod
    def _flat(X) -> np.ndarray:
        X = np.asarray(X)
        return X.reshape(len(X), -1).astype(np.float32)

    def fit(self, X, y) -> LinearProbe:
        from sklearn.linear_model import LogisticRegression

        Xf = self._flat(X)
        self.mean_ = Xf.mean(0)
        self.scale_ = Xf.std(0)
        self.scale_[self.scale_ < 1e-8] = 1.0  # constant features stay at 0
        y = np.asarray(y)
        self.classes_ = np.unique(y)
        if len(self.classes_) < 2:
            raise ProtocolError("linear probe needs at least two classes")
        self.model_ = LogisticRegression(C=self.C, max_iter=self.max_iter).fit(
            (Xf - self.mean_) / self.scale_, y
        )
        return self

    def predict_proba(self, X) -> np.ndarray:
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
    best, best_score, scores = None, -math.inf, []
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


# ----------------------------------------------------------------------------- metrics


def accuracy(y_true: Sequence[str], y_pred: Sequence[str]) -> float:
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    if len(y_true) == 0:
        raise ProtocolError("accuracy of an empty query set")
    return 100.0 * float(np.mean(y_true == y_pred))


def macro_f1(y_true: Sequence[str], y_pred: Sequence[str], classes: Sequence[str]) -> float:
    """Unweighted mean over `classes` of per-class F1 (a class never predicted nor present scores 0)."""
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    f1 = []
    for c in classes:
        tp = np.sum((y_pred == c) & (y_true == c))
        fp = np.sum((y_pred == c) & (y_true != c))
        fn = np.sum((y_pred != c) & (y_true == c))
        denom = 2 * tp + fp + fn
        f1.append(2 * tp / denom if denom else 0.0)
    return 100.0 * float(np.mean(f1))


def equal_error_rate(scores: Sequence[float], positive: Sequence[bool]) -> float:
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
        return multilabel_metrics(scores, truth, classes)
    y_true = np.array([t[0] for t in truth], dtype=object)
    y_pred = np.array([None if p is None else str(p) for p in y_pred], dtype=object)
    out = {"accuracy": accuracy(y_true, y_pred)}
    if task == "spoof":
        out["macro_f1"] = macro_f1(y_true, y_pred, ["bonafide", "spoof"])
        bona = np.asarray(scores, dtype=np.float64)[:, list(classes).index("bonafide")]
        out["eer"] = equal_error_rate(bona, y_true == "bonafide")
    return out


def evaluate_method(
    clf: Any, X: np.ndarray, truth: Sequence[tuple[str, ...]], classes: Sequence[str], task: str
) -> dict:
    """Metrics (%) of a fitted classifier on query features X with their true label tuples."""
    if task == "multilabel":
        return prediction_metrics(None, class_scores(clf, X, classes), truth, classes, task)
    scores = class_scores(clf, X, classes) if task == "spoof" else None
    return prediction_metrics(list(clf.predict(X)), scores, truth, classes, task)


# ----------------------------------------------------------------------------- the protocol


def _as_float(X: np.ndarray, rows: np.ndarray) -> np.ndarray:
    return np.asarray(X[rows], dtype=np.float32)


def _jsonable_params(params: Mapping[str, Any]) -> dict:
    return {k: (v.item() if isinstance(v, np.generic) else v) for k, v in params.items()}


@dataclass
class ProtocolResult:
    runs: list[dict]
    task: str
    classes: list[str]
    protocol: str
    fits: dict = field(default_factory=dict)  # (method, shots, seed, part) -> fitted classifier (analyses)


def run_protocol(
    X: np.ndarray,
    y: Sequence[str],
    meta: pd.DataFrame,
    *,
    methods: Mapping[str, Method],
    shots: Sequence[int],
    seeds: Sequence[int],
    test_fold: int | str | None = 5,
    do_tune: bool = False,
    keep_fits: Callable[[str, int, int, str], bool] | None = None,
    progress: Callable[[str], None] | None = None,
) -> ProtocolResult:
    """Run every (shots, seed, part) episode for every method; one run record per (episode, method)."""
    y = np.asarray(y).astype(str)
    parts, protocol = make_parts(meta, test_fold)
    labels = row_labels(y)
    task = task_of(y)
    eps = episodes(y, parts, shots, seeds)
    classes = list(eps[0].classes)
    runs: list[dict] = []
    fits: dict = {}
    for ep in eps if methods else []:
        Xs = _as_float(X, ep.support)
        Xq = _as_float(X, ep.query)
        truth = [labels[i] for i in ep.query]
        for name, method in methods.items():
            t0 = time.perf_counter()
            if do_tune:
                params, report = tune(method, Xs, ep.support_y, seed=ep.seed)
            else:
                params, report = dict(method.defaults), {"tuned": False, "reason": "defaults (no --tune)"}
            clf = method.build(**params).fit(Xs, ep.support_y)
            metrics = evaluate_method(clf, Xq, truth, classes, task)
            runs.append(
                {
                    "method": name,
                    "shots": ep.shots,
                    "seed": ep.seed,
                    "part": ep.part,
                    "metrics": metrics,
                    "params": _jsonable_params(params),
                    "tuning": report,
                    "n_support": len(ep.support),
                    "n_query": len(ep.query),
                    "seconds": round(time.perf_counter() - t0, 4),
                }
            )
            if keep_fits is not None and keep_fits(name, ep.shots, ep.seed, ep.part):
                fits[(name, ep.shots, ep.seed, ep.part)] = clf
            if progress is not None:
                progress(f"{name} {ep.shots}-shot seed {ep.seed} {ep.part}")
    return ProtocolResult(runs, task, classes, protocol, fits)


# ------------------------------------------------------------ methods that need the model to answer

PL_BASES = {"sav+pl": "sav", "calm+pl": "calm"}  # pseudo-label method -> the few-shot method it fits
PL_STREAM = 0x504C  # keeps the pool's random stream apart from the support draws


class ConstantClassifier:
    """What is left when fewer than two classes have a pseudo-labelled clip: no SAV/CALM can be fitted
    (they need two classes); the only possible answer is the single kept class, or none at all."""

    def __init__(self, classes: Sequence[str]):
        if len(classes) > 1:
            raise ValueError(f"ConstantClassifier takes at most one class, got {list(classes)}")
        self.classes_ = np.array(list(classes), dtype=object)

    def predict(self, X) -> np.ndarray:
        value = self.classes_[0] if len(self.classes_) else None
        return np.array([value] * len(X), dtype=object)

    def predict_proba(self, X) -> np.ndarray:
        return np.ones((len(X), len(self.classes_)))


def one_hot_scores(predictions: Sequence[str | None], classes: Sequence[str]) -> np.ndarray:
    """(n, C) scores of hard predictions: 1 for the predicted class, 0 elsewhere (all 0: no answer)."""
    index = {c: j for j, c in enumerate(classes)}
    out = np.zeros((len(predictions), len(classes)))
    for i, p in enumerate(predictions):
        if p is not None:
            out[i, index[p]] = 1.0
    return out


def pl_pool(part: Part, episode: Episode, size: int, seed: int) -> np.ndarray:
    """The unlabelled pool of an episode: `size` clips drawn with `seed` from the training part,
    outside the episode's queries (no official split: the queries are every clip outside the
    support, so the pool comes from the support clips, their labels hidden). Sorted row indices; a
    smaller pool of the same seed and part is a prefix of the same seeded permutation."""
    if size < 1:
        raise ProtocolError(f"pseudo-label pool size must be >= 1, got {size}")
    candidates = np.setdiff1d(part.train, episode.query)
    if len(candidates) < size:
        raise ProtocolError(
            f"pseudo-label pool of {size} clips, but part {part.name} has only {len(candidates)} "
            "training clips outside the queries (lower --pl-pool)"
        )
    rng = np.random.default_rng([seed, zlib.crc32(part.name.encode()), PL_STREAM])
    return np.sort(candidates[rng.permutation(len(candidates))[:size]])


def pseudo_label_report(pseudo: Any, truth: Sequence[tuple[str, ...]]) -> dict:
    """Per-episode report of a pool's pseudo-labels (`calm.pseudolabel.PseudoLabels`) against the
    true labels (a multi-label clip's pseudo-label is right when it is one of its labels), in %."""
    rep = pseudo.report([LABEL_SEP.join(t) for t in truth])
    return {
        "pool": rep["clips"],
        "kept": rep["kept"],
        "kept_per_class": rep["kept_per_class"],
        "missing_classes": [c for c, n in rep["kept_per_class"].items() if n == 0],
        "rollouts": rep["rollouts"],
        "answers_unparsed": rep["answers_unparsed"],
        "label_accuracy_kept": 100 * rep["accuracy_kept"],  # NaN (JSON null) when nothing was kept
        "label_accuracy_pool": 100 * rep["accuracy_all"],
    }


def pl_episode_runs(
    X: np.ndarray,
    labels: Sequence[tuple[str, ...]],
    episode: Episode,
    pool: np.ndarray,
    pseudo: Any,
    methods: Mapping[str, Method],
    task: str,
    *,
    do_tune: bool = False,
) -> list[dict]:
    """One run per method fitted on the pool's kept clips with their pseudo-labels, scored on the
    episode's queries. `pseudo` (`PseudoLabels`) is aligned with `pool`. A class with no kept clip
    cannot be predicted: its queries stay in the denominator and count as wrong (a warning says so)."""
    if len(pseudo.labels) != len(pool):
        raise ValueError(f"{len(pseudo.labels)} pseudo-labels for a pool of {len(pool)} clips")
    classes = list(episode.classes)
    kept = np.flatnonzero(pseudo.kept)
    rows = pool[kept]
    support_y = np.array([pseudo.labels[i] for i in kept], dtype=str)
    report = pseudo_label_report(pseudo, [labels[i] for i in pool])
    truth = [labels[i] for i in episode.query]
    present = [c for c in classes if c in set(support_y.tolist())]
    warnings = []
    if report["missing_classes"]:
        n_lost = sum(any(c in t for c in report["missing_classes"]) for t in truth)
        warnings.append(
            f"{episode.shots}-shot seed {episode.seed} {episode.part}: no kept pseudo-labelled clip for "
            f"class(es) {report['missing_classes']}; they cannot be predicted and their {n_lost} "
            "query clip(s) count as wrong"
        )
    Xs = _as_float(X, rows) if len(rows) else None
    Xq = _as_float(X, episode.query)
    runs = []
    for name, method in methods.items():
        t0 = time.perf_counter()
        if len(present) < 2:
            clf = ConstantClassifier(present)
            params, tuning = (
                {},
                {"tuned": False, "reason": f"{len(present)} pseudo-labelled class(es): nothing to fit"},
            )
        else:
            if do_tune:
                params, tuning = tune(method, Xs, support_y, seed=episode.seed)
            else:
                params, tuning = dict(method.defaults), {"tuned": False, "reason": "defaults (no --tune)"}
            clf = method.build(**params).fit(Xs, support_y)
        runs.append(
            {
                "method": name,
                "shots": episode.shots,
                "seed": episode.seed,
                "part": episode.part,
                "metrics": evaluate_method(clf, Xq, truth, classes, task),
                "params": _jsonable_params(params),
                "tuning": tuning,
                "n_support": len(rows),
                "n_query": len(episode.query),
                "pseudo_labels": report,
                "warnings": warnings,
                "seconds": round(time.perf_counter() - t0, 4),
            }
        )
    return runs


def zero_shot_episode_run(
    labels: Sequence[tuple[str, ...]],
    episode: Episode,
    predictions: Mapping[int, str | None],
    scores: Mapping[int, np.ndarray] | None,
    task: str,
    params: Mapping[str, Any],
) -> dict:
    """The zero-shot run of an episode: the model's own answers for the episode's queries (`predictions`
    and optional per-class `scores` keyed by row; no support set). Unparsed answers (None) are wrong."""
    missing = [int(i) for i in episode.query if int(i) not in predictions]
    if missing:
        raise ProtocolError(f"zero-shot: no prediction for {len(missing)} query row(s), e.g. {missing[:3]}")
    classes = list(episode.classes)
    y_pred = [predictions[int(i)] for i in episode.query]
    if scores is not None:
        S = np.stack([np.asarray(scores[int(i)], dtype=np.float64) for i in episode.query])
    else:
        S = one_hot_scores(y_pred, classes)
    truth = [labels[i] for i in episode.query]
    return {
        "method": "zero-shot",
        "shots": episode.shots,
        "seed": episode.seed,
        "part": episode.part,
        "metrics": prediction_metrics(y_pred, S, truth, classes, task),
        "params": _jsonable_params(params),
        "tuning": {"tuned": False, "reason": "zero-shot has no parameters to fit"},
        "n_support": 0,
        "n_query": len(episode.query),
        "n_unparsed": sum(p is None for p in y_pred),
    }


@dataclass
class LALMRunsResult:
    runs: list[dict]
    warnings: list[str]
    pools: dict = field(default_factory=dict)  # (shots, seed, part) -> pool rows


def run_lalm_protocol(
    X: np.ndarray,
    y: Sequence[str],
    meta: pd.DataFrame,
    *,
    methods: Sequence[str],
    shots: Sequence[int],
    seeds: Sequence[int],
    test_fold: int | str | None = 5,
    zero_shot: Callable[[np.ndarray], tuple[Sequence[str | None], np.ndarray | None]] | None = None,
    zero_shot_params: Mapping[str, Any] | None = None,
    pseudo_label: Callable[[np.ndarray], Any] | None = None,
    fewshot: Mapping[str, Method] | None = None,
    pl_pool_size: int | None = None,
    do_tune: bool = False,
    progress: Callable[[str], None] | None = None,
) -> LALMRunsResult:
    """Runs of `zero-shot`, `sav+pl`, `calm+pl` on the SAME episodes (queries) as `run_protocol`.

    The model side is injected: `zero_shot(rows) -> (predictions, scores (len(rows), C) or None)`
    is called once with every query row of every episode (sorted), and
    `pseudo_label(rows) -> PseudoLabels` once with every row of every episode's pool (sorted);
    each episode then scores its own queries / fits on its own pool. Pools: `pl_pool_size` clips
    (default shots x classes) per episode, see `pl_pool`.
    """
    unknown = [m for m in methods if m not in LALM_METHODS]
    if unknown:
        raise ValueError(f"not a method that needs the model to answer: {unknown}")
    y = np.asarray(y).astype(str)
    parts, _ = make_parts(meta, test_fold)
    by_name = {p.name: p for p in parts}
    labels = row_labels(y)
    task = task_of(y)
    eps = episodes(y, parts, shots, seeds)
    runs: list[dict] = []
    warnings: list[str] = []
    if "zero-shot" in methods:
        if zero_shot is None:
            raise ValueError("zero-shot requested without a zero_shot function")
        rows = np.unique(np.concatenate([ep.query for ep in eps]))
        preds, scores = zero_shot(rows)
        if len(preds) != len(rows) or (scores is not None and len(scores) != len(rows)):
            raise ValueError(f"zero_shot returned {len(preds)} predictions for {len(rows)} clips")
        pred_map = {int(r): p for r, p in zip(rows, preds, strict=True)}
        score_map = None if scores is None else {int(r): s for r, s in zip(rows, scores, strict=True)}
        for ep in eps:
            runs.append(zero_shot_episode_run(labels, ep, pred_map, score_map, task, zero_shot_params or {}))
            if progress is not None:
                progress(f"zero-shot {ep.shots}-shot seed {ep.seed} {ep.part}")
    pl_methods = [m for m in methods if m in PL_BASES]
    pools: dict = {}
    if pl_methods:
        if pseudo_label is None or fewshot is None:
            raise ValueError("pseudo-label methods requested without pseudo_label / fewshot methods")
        chosen = {m: fewshot[PL_BASES[m]] for m in pl_methods}
        for ep in eps:
            size = pl_pool_size if pl_pool_size is not None else ep.shots * len(ep.classes)
            pools[(ep.shots, ep.seed, ep.part)] = pl_pool(by_name[ep.part], ep, size, ep.seed)
        rows = np.unique(np.concatenate(list(pools.values())))
        pseudo = pseudo_label(rows)
        if len(pseudo.labels) != len(rows):
            raise ValueError(f"pseudo_label returned {len(pseudo.labels)} labels for {len(rows)} clips")
        position = {int(r): i for i, r in enumerate(rows)}
        for ep in eps:
            pool = pools[(ep.shots, ep.seed, ep.part)]
            sub = pseudo.subset([position[int(r)] for r in pool])
            ep_runs = pl_episode_runs(X, labels, ep, pool, sub, chosen, task, do_tune=do_tune)
            runs.extend(ep_runs)
            warnings.extend(ep_runs[0]["warnings"])
            if progress is not None:
                progress(f"pseudo-labels {ep.shots}-shot seed {ep.seed} {ep.part}")
    return LALMRunsResult(runs, warnings, pools)


def order_runs(runs: Sequence[dict], methods: Sequence[str]) -> list[dict]:
    """Runs sorted (stably) by the position of their method in `methods` (the table's column order)."""
    rank = {m: i for i, m in enumerate(methods)}
    return sorted(runs, key=lambda r: rank.get(r["method"], len(rank)))


def _seed_values(runs: Sequence[dict], method: str, shots: int, metric: str) -> dict[int, float]:
    """Each seed's value of a metric (mean over the parts of that seed)."""
    per: dict[int, list[float]] = {}
    for r in runs:
        if r["method"] == method and r["shots"] == shots and metric in r["metrics"]:
            per.setdefault(r["seed"], []).append(r["metrics"][metric])
    return {s: float(np.mean(v)) for s, v in sorted(per.items())}


def _metrics_of(runs: Sequence[dict]) -> list[str]:
    return list(dict.fromkeys(m for r in runs for m in r["metrics"]))


def _keys(runs: Sequence[dict]) -> tuple[list[str], list[int]]:
    return list(dict.fromkeys(r["method"] for r in runs)), sorted({r["shots"] for r in runs})


def summarise(runs: Sequence[dict]) -> list[dict]:
    """Mean and sample std over seeds for every (method, shots, metric)."""
    methods, shots = _keys(runs)
    out = []
    for m, n, metric in itertools.product(methods, shots, _metrics_of(runs)):
        values = np.array(list(_seed_values(runs, m, n, metric).values()))
        if len(values) == 0:
            continue
        std = float(values.std(ddof=1)) if len(values) > 1 else 0.0
        out.append(
            {
                "method": m,
                "shots": n,
                "metric": metric,
                "mean": float(values.mean()),
                "std": std,
                "n_seeds": len(values),
            }
        )
    return out


def paired_differences(runs: Sequence[dict]) -> list[dict]:
    """For every pair of methods (in run order), shots and metric: mean per-seed a - b, 95 % t interval."""
    from scipy import stats

    methods, shots = _keys(runs)
    out = []
    for (a, b), n, metric in itertools.product(itertools.combinations(methods, 2), shots, _metrics_of(runs)):
        va, vb = _seed_values(runs, a, n, metric), _seed_values(runs, b, n, metric)
        common = sorted(set(va) & set(vb))
        if not common:
            continue
        d = np.array([va[s] - vb[s] for s in common])
        mean = float(d.mean())
        if len(d) > 1:
            half = float(stats.t.ppf(0.975, len(d) - 1) * d.std(ddof=1) / math.sqrt(len(d)))
            low, high = mean - half, mean + half
        else:
            low = high = None
        out.append(
            {
                "a": a,
                "b": b,
                "shots": n,
                "metric": metric,
                "mean_diff": mean,
                "ci95_low": low,
                "ci95_high": high,
                "n_seeds": len(d),
            }
        )
    return out


# ----------------------------------------------------------------------------- reports


def results_markdown(results: Mapping[str, Any]) -> str:
    """results.md: the paper's Table 1 layout (rows: model / dataset / shots; columns: methods)."""
    cfg = results.get("config", {})
    summary = results["summary"]
    methods = list(dict.fromkeys(s["method"] for s in summary))
    metrics = list(dict.fromkeys(s["metric"] for s in summary))
    primary = cfg.get("primary_metric", metrics[0] if metrics else "accuracy")
    metrics = [primary] + [m for m in metrics if m != primary]
    lookup = {(s["method"], s["shots"], s["metric"]): s for s in summary}
    shots = sorted({s["shots"] for s in summary})
    model, data = cfg.get("model", "?"), cfg.get("dataset", "?")
    lines = [f"# Results: {model} on {data}", ""]
    lines.append(
        f"Protocol: {cfg.get('protocol', '?')}; {cfg.get('n_seeds', '?')} seeds; mean ± std over seeds."
    )
    lines.append("")
    for metric in metrics:
        lines.append(f"## {METRIC_TITLES.get(metric, metric)}")
        lines.append("")
        lines.append(
            "| model | dataset | shots | " + " | ".join(METHOD_TITLES.get(m, m) for m in methods) + " |"
        )
        lines.append("|---|---|---|" + "---|" * len(methods))
        for n in shots:
            cells = []
            for m in methods:
                s = lookup.get((m, n, metric))
                cells.append("–" if s is None else f"{s['mean']:.2f} ± {s['std']:.2f}")
            lines.append(f"| {model} | {data} | {n} | " + " | ".join(cells) + " |")
        lines.append("")
    paired = [p for p in results.get("paired", []) if p["metric"] == primary]
    if paired:
        lines.append(
            f"## Paired differences ({METRIC_TITLES.get(primary, primary)}, a - b, same support sets)"
        )
        lines.append("")
        lines.append("| shots | a | b | mean diff | 95 % interval |")
        lines.append("|---|---|---|---|---|")
        for p in paired:
            ci = "–" if p["ci95_low"] is None else f"[{p['ci95_low']:+.2f}, {p['ci95_high']:+.2f}]"
            lines.append(
                f"| {p['shots']} | {METHOD_TITLES.get(p['a'], p['a'])} | "
                f"{METHOD_TITLES.get(p['b'], p['b'])} | {p['mean_diff']:+.2f} | {ci} |"
            )
        lines.append("")
    pl = results.get("pseudo_label_summary", [])
    if pl:
        lines.append("## Pseudo-labels (support of SAV+PL / CALM+PL; mean over episodes)")
        lines.append("")
        lines.append("| shots | pool | kept | right among kept (%) | episodes with a class never kept |")
        lines.append("|---|---|---|---|---|")
        for r in pl:
            acc = "–" if r["label_accuracy_kept"] is None else f"{r['label_accuracy_kept']:.1f}"
            lines.append(
                f"| {r['shots']} | {r['pool']:.1f} | {r['kept']:.1f} | {acc} | "
                f"{r['episodes_missing_classes']} of {r['episodes']} |"
            )
        lines.append("")
    zs = cfg.get("zero_shot")
    if zs:
        lines.append(
            f"- zero-shot ({zs['mode']}): {zs['n_unparsed']} of {zs['clips']} answers named no class "
            "(counted wrong)"
        )
    for w in results.get("warnings", []):
        lines.append(f"- warning: {w}")
    skipped = results.get("skipped_methods", {})
    for m, why in skipped.items():
        lines.append(f"- {m}: skipped ({why})")
    return "\n".join(lines).rstrip() + "\n"


def pseudo_label_summary(runs: Sequence[dict]) -> list[dict]:
    """Per shots, over the episodes of the pseudo-label methods: mean pool size, mean clips kept,
    mean accuracy (%) of the kept pseudo-labels (episodes that kept nothing left out of that mean,
    None when none kept anything), and how many episodes left a class without any kept clip."""
    per: dict[int, dict[tuple, dict]] = {}
    for r in runs:
        if r["method"] in PL_BASES:
            per.setdefault(r["shots"], {})[(r["seed"], r["part"])] = r["pseudo_labels"]
    out = []
    for shots, reps in sorted(per.items()):
        acc = [v["label_accuracy_kept"] for v in reps.values() if v["kept"] > 0]
        out.append(
            {
                "shots": shots,
                "episodes": len(reps),
                "pool": float(np.mean([v["pool"] for v in reps.values()])),
                "kept": float(np.mean([v["kept"] for v in reps.values()])),
                "label_accuracy_kept": float(np.mean(acc)) if acc else None,
                "episodes_missing_classes": sum(bool(v["missing_classes"]) for v in reps.values()),
            }
        )
    return out


# ----------------------------------------------------------------------------- analyses and results

SWEEP_FRACTIONS = (0.02, 0.05, 0.1, 0.25, 0.5, 0.75, 1.0)


def k_sweep(
    X: np.ndarray,
    y: Sequence[str],
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
            X, y, meta, methods=variants, shots=shots, seeds=seeds, test_fold=test_fold, progress=progress
        )
        for s in summarise(res.runs):
            out.append({**s, "k": k, "fraction": float(fraction)})
    return out


def build_results(result: ProtocolResult, config: Mapping[str, Any], **extra: Any) -> dict:
    """The results.json document: config, summary, runs, paired differences and any extras."""
    primary = PRIMARY_METRIC[result.task]
    config = {
        **config,
        "task": result.task,
        "primary_metric": primary,
        "protocol": result.protocol,
        "classes": result.classes,
        "unit": "%",
    }
    pl = pseudo_label_summary(result.runs)
    return {
        "config": config,
        "summary": summarise(result.runs),
        "paired": paired_differences(result.runs),
        "runs": result.runs,
        **({"pseudo_label_summary": pl} if pl else {}),
        **extra,
    }


def _clean(value: Any) -> Any:
    """JSON-safe: NaN/inf -> None, NumPy scalars -> Python, tuples -> lists, paths -> strings."""
    if isinstance(value, Mapping):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_clean(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if hasattr(value, "__fspath__"):
        return str(value)
    return value


def write_results(out_dir, results: Mapping[str, Any]) -> tuple[Any, Any]:
    """Write results.json and results.md into out_dir; returns their paths."""
    import json
    from pathlib import Path

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    js = out_dir / "results.json"
    md = out_dir / "results.md"
    js.write_text(json.dumps(_clean(results), indent=1, allow_nan=False) + "\n")
    md.write_text(results_markdown(results))
    return js, md
