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
    "run_protocol",
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
    "zero-shot": "zero-shot", "sav": "SAV", "sav+pl": "SAV+PL", "calm-global": "CALM-global",
    "calm": "CALM", "calm+pl": "CALM+PL", "linear-probe": "linear probe",
}  # fmt: skip


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
        desc = f"folds: support from the other folds, test fold {'all (rotating)' if len(chosen) > 1 else chosen[0]}"
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
                f"class {c!r} has {len(candidates)} training clip(s) in part {part.name}, fewer than {shots} shots"
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
    return [
        sample_episode(labels, part, n, s, classes)
        for n in shots
        for s in seeds
        for part in parts
    ]


# ----------------------------------------------------------------------------- methods


class LinearProbe:
    """Logistic regression on the flattened, standardised head features (scikit-learn estimator API)."""

    def __init__(self, C: float = 1.0, max_iter: int = 2000):
        self.C = C
        self.max_iter = max_iter

    def get_params(self, deep: bool = True) -> dict:
        return {"C": self.C, "max_iter": self.max_iter}

    def set_params(self, **params) -> LinearProbe:
        for k, v in params.items():
            setattr(self, k, v)
        return self

    @staticmethod
    def _flat(X) -> np.ndarray:
        X = np.asarray(X)
        return X.reshape(len(X), -1).astype(np.float32)

    def fit(self, X, y) -> LinearProbe:
        from sklearn.linear_model import LogisticRegression

        Xf = self._flat(X)
        self.mean_ = Xf.mean(0)
        self.scale_ = Xf.std(0)
        self.scale_[self.scale_ < 1e-8] = 1.0
        y = np.asarray(y)
        self.classes_ = np.unique(y)
        if len(self.classes_) < 2:
            raise ProtocolError("linear probe needs at least two classes")
        self.model_ = LogisticRegression(C=self.C, max_iter=self.max_iter).fit((Xf - self.mean_) / self.scale_, y)
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
    *, k: float | int = 0.25, tau_p: float = 0.03, tau_w: float = 0.5, sav_k: float | int | None = None
) -> dict[str, Method]:
    """The few-shot methods with the given defaults (paper: tau_p 0.03, tau_w 0.5)."""
    from calm import classifiers

    sav_k = k if sav_k is None else sav_k
    tau_grid = [0.01, 0.03, 0.1]
    k_grid = [0.1, 0.25, 0.5]
    return {
        "sav": Method("sav", lambda **p: classifiers.SAV(**p), {"k": sav_k}, {"k": [0.05, 0.1, 0.25, 0.5]}),
        "calm-global": Method(
            "calm-global",
            lambda **p: classifiers.CALM(weighting="global", **p),
            {"k": k, "tau_p": tau_p, "tau_w": tau_w},
            {"k": k_grid, "tau_p": tau_grid, "tau_w": [0.1, 0.5, 2.0]},
        ),
        "calm": Method(
            "calm",
            lambda **p: classifiers.CALM(**p),
            {"k": k, "tau_p": tau_p, "tau_w": tau_w},
            {"k": k_grid, "tau_p": tau_grid, "tau_w": [0.1, 0.5, 2.0]},
        ),
        "linear-probe": Method("linear-probe", lambda **p: LinearProbe(**p), {"C": 1.0}, {"C": [0.01, 0.1, 1.0, 10.0]}),
    }


def _grid_points(method: Method) -> list[dict]:
    keys = list(method.grid)
    points = [dict(zip(keys, values, strict=True)) for values in itertools.product(*(method.grid[k] for k in keys))]
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
    return dict(best), {"tuned": True, "cv_folds": n_splits, "cv_accuracy": 100 * best_score, "grid_size": len(scores)}


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
    return {"question_accuracy": 100 * float(questions), "exact_match": 100 * float(exact), "map": 100 * float(np.mean(ap))}


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


def evaluate_method(clf: Any, X: np.ndarray, truth: Sequence[tuple[str, ...]], classes: Sequence[str], task: str) -> dict:
    """Metrics (%) of a fitted classifier on query features X with their true label tuples."""
    if task == "multilabel":
        return multilabel_metrics(class_scores(clf, X, classes), truth, classes)
    y_true = np.array([t[0] for t in truth])
    y_pred = np.asarray(clf.predict(X)).astype(str)
    out = {"accuracy": accuracy(y_true, y_pred)}
    if task == "spoof":
        out["macro_f1"] = macro_f1(y_true, y_pred, ["bonafide", "spoof"])
        bona = class_scores(clf, X, ["bonafide"])[:, 0]
        out["eer"] = equal_error_rate(bona, y_true == "bonafide")
    return out


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
    for ep in eps:
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
            runs.append({
                "method": name, "shots": ep.shots, "seed": ep.seed, "part": ep.part,
                "metrics": metrics, "params": _jsonable_params(params), "tuning": report,
                "n_support": len(ep.support), "n_query": len(ep.query),
                "seconds": round(time.perf_counter() - t0, 4),
            })  # fmt: skip
            if keep_fits is not None and keep_fits(name, ep.shots, ep.seed, ep.part):
                fits[(name, ep.shots, ep.seed, ep.part)] = clf
            if progress is not None:
                progress(f"{name} {ep.shots}-shot seed {ep.seed} {ep.part}")
    return ProtocolResult(runs, task, classes, protocol, fits)


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
        out.append({"method": m, "shots": n, "metric": metric, "mean": float(values.mean()), "std": std,
                    "n_seeds": len(values)})
    return out


def paired_differences(runs: Sequence[dict]) -> list[dict]:
    """For every pair of methods (in run order), shots and metric: mean per-seed a - b with a 95 % t interval."""
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
        out.append({"a": a, "b": b, "shots": n, "metric": metric, "mean_diff": mean, "ci95_low": low,
                    "ci95_high": high, "n_seeds": len(d)})
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
    lines.append(f"Protocol: {cfg.get('protocol', '?')}; {cfg.get('n_seeds', '?')} seeds; mean ± std over seeds.")
    lines.append("")
    for metric in metrics:
        lines.append(f"## {METRIC_TITLES.get(metric, metric)}")
        lines.append("")
        lines.append("| model | dataset | shots | " + " | ".join(METHOD_TITLES.get(m, m) for m in methods) + " |")
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
        lines.append(f"## Paired differences ({METRIC_TITLES.get(primary, primary)}, a - b, same support sets)")
        lines.append("")
        lines.append("| shots | a | b | mean diff | 95 % interval |")
        lines.append("|---|---|---|---|---|")
        for p in paired:
            ci = "–" if p["ci95_low"] is None else f"[{p['ci95_low']:+.2f}, {p['ci95_high']:+.2f}]"
            lines.append(f"| {p['shots']} | {METHOD_TITLES.get(p['a'], p['a'])} | "
                         f"{METHOD_TITLES.get(p['b'], p['b'])} | {p['mean_diff']:+.2f} | {ci} |")
        lines.append("")
    skipped = results.get("skipped_methods", {})
    for m, why in skipped.items():
        lines.append(f"- {m}: skipped ({why})")
    return "\n".join(lines).rstrip() + "\n"


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
        res = run_protocol(X, y, meta, methods=variants, shots=shots, seeds=seeds, test_fold=test_fold,
                           progress=progress)
        for s in summarise(res.runs):
            out.append({**s, "k": k, "fraction": float(fraction)})
    return out


def build_results(result: ProtocolResult, config: Mapping[str, Any], **extra: Any) -> dict:
    """The results.json document: config, summary, runs, paired differences and any extras."""
    primary = PRIMARY_METRIC[result.task]
    config = {**config, "task": result.task, "primary_metric": primary, "protocol": result.protocol,
              "classes": result.classes, "unit": "%"}
    return {
        "config": config,
        "summary": summarise(result.runs),
        "paired": paired_differences(result.runs),
        "runs": result.runs,
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
