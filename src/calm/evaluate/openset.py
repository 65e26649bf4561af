"""The open-set protocol (`calm evaluate --open-set N`, `--unknowns-features STORE`): how well the
few-shot methods tell clips of the classes they know from clips of classes they never saw.

Per (shots, seed): N classes are held out (drawn with the seed, `held_out_classes`); the support set
is drawn from the other classes only (`calm.evaluate.episodes.sample_episode` over the known rows);
the known classes' test clips are the known queries, the held-out classes' test clips (every clip
of them when the data has no split) and every clip of the `unknowns` store are the unknown queries.

Scores of "known" (higher = more likely known), all from the classifiers' public API (`SCORES`):
`top_proba`, the calibrated top probability (the baseline); `top_decision`, the top
`decision_function` score (uncalibrated); `margin`, top minus second calibrated probability;
`similarity`, the weight-averaged cosine of the clip's heads to the predicted class's centroid over
the heads `explain` lists for that class; `known_score`, the reject option's score (`known_score`,
the classifier's default `unknown_score`) (a score is left out where the classifier lacks its method).
Each method is fitted with its defaults (never `--tune`). Metrics of one run (%, as every metric
of the evaluation): `auroc_<score>` (known vs unknown,
`sklearn.metrics.roc_auc_score`); `far95_<score>`, the false-accept rate of unknowns at the threshold
accepting 95 % of the known queries (set on the test side); `far95_support`, the same with the
top-probability threshold set from the support set's leave-one-out probabilities of their own class
(``1 - nonconformity_``; calibrated classifiers only, so none at 1 shot); `open_accuracy` and
`open_macro_f1` with "unknown" as one more class (the support-set threshold: top probability below it
is "unknown"); `far95_support_known`, `accept_support_known` and `open_accuracy_known`: the reject
option itself (the method refitted with `unknown=0.95`: its threshold on `known_score` set from the
support set's leave-one-out known scores; calibrated classifiers only): the share of unknown queries
it accepts, of known ones it accepts, and the open accuracy of its `predict`; `coverage` and
`set_size`, the conformal sets (alpha 0.1) of the known queries, and `empty_unknown`, the share of
unknown queries whose set is empty.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd

from calm.classifiers.calibration import sets_of
from calm.evaluate.config import EvalConfig
from calm.evaluate.episodes import Part, ProtocolError, episode_features, make_parts, row_labels
from calm.evaluate.episodes import sample_episode as draw
from calm.evaluate.estimators import Method
from calm.evaluate.metrics import accuracy, macro_f1
from calm.evaluate.summary import paired_differences, summarise
from calm.methods import DEFAULTS

__all__ = [
    "ACCEPT",
    "ALPHA",
    "BASELINE",
    "SCORES",
    "UNKNOWN",
    "held_out_classes",
    "open_set_metrics",
    "open_set_results",
    "open_set_unknowns",
    "open_set_paired",
    "reject_option_metrics",
    "run_open_set",
]

ACCEPT = 0.95  # share of known clips a threshold accepts
ALPHA = 0.1  # conformal level of the coverage / set-size metrics
UNKNOWN = "unknown"  # the open-set class of the open accuracy and macro-F1
OPEN_SET_STREAM = 0x4F53  # keeps the held-out classes' random stream apart from the episodes'


def _probabilities(clf: Any, X: np.ndarray) -> np.ndarray | None:
    """`predict_proba` (n, C) as float64, the one call per fitted classifier and query set every
    probability score reads (None when the classifier has none)."""
    return np.asarray(clf.predict_proba(X), dtype=np.float64) if hasattr(clf, "predict_proba") else None


def _top_proba(clf: Any, X: np.ndarray, proba: Any) -> np.ndarray:
    return np.asarray(proba).max(axis=1)


def _top_decision(clf: Any, X: np.ndarray, proba: Any) -> np.ndarray:
    d = np.asarray(clf.decision_function(X), dtype=np.float64)
    return np.abs(d) if d.ndim == 1 else d.max(axis=1)  # two classes: |score(c1) - score(c0)|


def _margin(clf: Any, X: np.ndarray, proba: Any) -> np.ndarray:
    p = np.sort(np.asarray(proba), axis=1)
    return p[:, -1] - p[:, -2]


def _known_score(clf: Any, X: np.ndarray, proba: Any) -> np.ndarray:
    return np.asarray(clf.known_score(X), dtype=np.float64)


def _similarity(clf: Any, X: np.ndarray, proba: Any) -> np.ndarray:
    """Per clip, the weight-averaged cosine of its heads to the predicted class's centroid over the
    heads `explain` lists as carrying that class's score (-1 when none does)."""
    out = []
    for e in clf.explain(X, top=int(X.shape[1])):
        heads = e["heads"][str(e["prediction"])]
        w = np.array([h["weight"] for h in heads], dtype=np.float64)
        s = np.array([h["similarity"] for h in heads], dtype=np.float64)
        out.append(float((w * s).sum() / w.sum()) if w.sum() > 0 else -1.0)
    return np.array(out)


#: score name -> (description, score of each clip of X under a fitted classifier, given the
#: classifier's `predict_proba(X)` (float64; None when it has none))
SCORES: dict[str, tuple[str, Callable[[Any, np.ndarray, Any], np.ndarray]]] = {
    "top_proba": ("calibrated top probability (baseline)", _top_proba),
    "top_decision": ("top decision_function score (uncalibrated)", _top_decision),
    "margin": ("top minus second calibrated probability", _margin),
    "similarity": ("weighted cosine to the predicted class's centroid (explain)", _similarity),
    "known_score": (f"the reject option's known score ({DEFAULTS['unknown_score']})", _known_score),
}
NEEDS = {"top_proba": "predict_proba", "top_decision": "decision_function", "margin": "predict_proba"}
NEEDS |= {"similarity": "explain", "known_score": "known_score"}
BASELINE = "top_proba"


def held_out_classes(classes: Sequence[str], n: int, seed: int) -> list[str]:
    """The `n` classes (sorted) held out at `seed`: a seeded draw, the same for every method and shot
    count; ProtocolError unless at least two classes stay known."""
    classes = sorted(classes)
    if not 0 <= n <= len(classes) - 2:
        raise ProtocolError(f"--open-set {n}: {len(classes)} classes leave fewer than two known ones")
    rng = np.random.default_rng([seed, OPEN_SET_STREAM])
    return sorted(classes[i] for i in rng.permutation(len(classes))[:n])


def _far(unknown: np.ndarray, threshold: float) -> float:
    """Percentage of unknown scores accepted (>= threshold)."""
    return 100.0 * float(np.mean(unknown >= threshold))


def _support_threshold(clf: Any) -> float | None:
    """The top-probability threshold accepting ACCEPT of the support set's leave-one-out probabilities
    of their own class (None when the classifier keeps none, e.g. uncalibrated at 1 shot)."""
    scores = np.asarray(getattr(clf, "nonconformity_", []), dtype=np.float64)
    if not getattr(clf, "calibrated_", False) or scores.size == 0:
        return None
    return float(np.quantile(1.0 - scores, 1.0 - ACCEPT))


def open_set_metrics(clf: Any, Xk: np.ndarray, truth: Sequence[str], Xu: np.ndarray) -> dict[str, float]:
    """The metrics (module docstring) of a fitted classifier on known queries `Xk` (true classes
    `truth`) and unknown queries `Xu`."""
    from sklearn.metrics import roc_auc_score

    out: dict[str, float] = {}
    positive = np.r_[np.ones(len(Xk)), np.zeros(len(Xu))]
    probk, probu = _probabilities(clf, Xk), _probabilities(clf, Xu)  # once per query set
    for name, (_, score) in SCORES.items():
        if not hasattr(clf, NEEDS[name]):
            continue
        sk, su = score(clf, Xk, probk), score(clf, Xu, probu)
        out[f"auroc_{name}"] = 100.0 * float(roc_auc_score(positive, np.r_[sk, su]))
        out[f"far95_{name}"] = _far(su, float(np.quantile(sk, 1.0 - ACCEPT)))
    threshold = _support_threshold(clf)
    if threshold is not None:
        pk, pu = _top_proba(clf, Xk, probk), _top_proba(clf, Xu, probu)
        out["far95_support"] = _far(pu, threshold)
        pred = np.r_[np.asarray(clf.predict(Xk), dtype=object), np.asarray(clf.predict(Xu), dtype=object)]
        pred[np.r_[pk, pu] < threshold] = UNKNOWN
        true = np.array([*truth, *[UNKNOWN] * len(Xu)], dtype=object)
        out["open_accuracy"] = accuracy(true, pred)
        out["open_macro_f1"] = macro_f1(true, pred, [*map(str, clf.classes_), UNKNOWN])
    if hasattr(clf, "predict_set"):  # `predict_set` of the probabilities above
        sets = sets_of(clf, np.asarray(probk), ALPHA)
        out["coverage"] = 100.0 * float(np.mean([t in s for t, s in zip(truth, sets, strict=True)]))
        out["set_size"] = float(np.mean([len(s) for s in sets]))
        out["empty_unknown"] = 100.0 * float(np.mean([not s for s in sets_of(clf, np.asarray(probu), ALPHA)]))
    return out


def reject_option_metrics(
    clf: Any, Xs: np.ndarray, ys: Any, Xk: np.ndarray, truth: Sequence[str], Xu: np.ndarray
) -> dict[str, float]:
    """The reject option's metrics (module docstring) of a classifier fitted on `Xs`, `ys`: a clone
    refitted with `unknown=ACCEPT` ({} without an `unknown` parameter or leave-one-out scores)."""
    import warnings

    from sklearn.base import clone

    params = clf.get_params() if hasattr(clf, "get_params") else {}
    if "unknown" not in params or not getattr(clf, "calibrated_", False):
        return {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rej = clone(clf).set_params(unknown=ACCEPT).fit(Xs, ys)
    pk, pu = np.asarray(rej.predict(Xk), dtype=object), np.asarray(rej.predict(Xu), dtype=object)
    label = rej.unknown_label
    true = np.array([*truth, *[label] * len(Xu)], dtype=object)
    return {
        "far95_support_known": 100.0 * float(np.mean(pu != label)),
        "accept_support_known": 100.0 * float(np.mean(pk != label)),
        "open_accuracy_known": accuracy(true, np.r_[pk, pu]),
    }


def _known_part(part: Part, known_rows: np.ndarray) -> Part:
    """`part` restricted to the rows of known classes."""
    test = None if part.test is None else np.intersect1d(part.test, known_rows)
    return Part(part.name, np.intersect1d(part.train, known_rows), test)


def _unknown_rows(part: Part, held_rows: np.ndarray) -> np.ndarray:
    """The held-out classes' rows that are queries of `part` (all of them when it has no test part)."""
    return held_rows if part.test is None else np.intersect1d(part.test, held_rows)


def _episode_runs(
    X: Any, labels: list, known: Part, unknown_X: np.ndarray, ep_args: tuple, methods: Mapping[str, Method]
) -> list[dict]:
    """One run record per method of one open-set episode (its known part, its unknown features)."""
    shots, seed, classes = ep_args
    ep = draw(labels, known, shots, seed, classes)
    if len(unknown_X) == 0:
        raise ProtocolError(
            f"part {ep.part}, seed {seed}: no unknown queries (no test clip of a held-out class)"
        )
    Xs, Xk = episode_features(X, ep.support), episode_features(X, ep.query)
    truth = [labels[i][0] for i in ep.query]
    runs = []
    for name, method in methods.items():
        clf = method.build(**method.defaults).fit(Xs, ep.support_y)
        metrics = open_set_metrics(clf, Xk, truth, unknown_X)
        metrics |= reject_option_metrics(clf, Xs, ep.support_y, Xk, truth, unknown_X)
        runs.append(
            {
                "method": name,
                "shots": shots,
                "seed": seed,
                "part": ep.part,
                "metrics": metrics,
                "n_support": len(ep.support),
                "n_known": len(ep.query),
                "n_unknown": len(unknown_X),
            }
        )
    return runs


def run_open_set(
    X: Any,
    y: Sequence[str] | np.ndarray,
    meta: pd.DataFrame,
    *,
    methods: Mapping[str, Method],
    shots: Sequence[int],
    seeds: Sequence[int],
    n_held_out: int = 0,
    unknowns: Any = None,
    test_fold: int | str | None = 5,
    progress: Callable[[str], None] | None = None,
) -> dict:
    """The open-set document of results.json: held-out classes per seed, runs, summary, paired
    differences of each score against the baseline. `unknowns`: features (m, K, d) of clips of
    another source, unknown queries of every episode."""
    labels = row_labels(np.asarray(y).astype(str))
    if any(len(t) != 1 for t in labels):
        raise ProtocolError("the open-set evaluation needs single-label clips")
    all_classes = sorted({t[0] for t in labels})
    extra = np.zeros((0, *X.shape[1:]), np.float32) if unknowns is None else np.asarray(unknowns, np.float32)
    if n_held_out == 0 and len(extra) == 0:
        raise ProtocolError("the open-set evaluation needs held-out classes (--open-set N) or --unknowns")
    parts, _ = make_parts(meta, test_fold)
    held: dict[int, list[str]] = {}
    runs: list[dict] = []
    for seed in seeds:
        held[seed] = held_out_classes(all_classes, n_held_out, seed)
        is_held = np.array([t[0] in held[seed] for t in labels])
        known_rows, held_rows = np.flatnonzero(~is_held), np.flatnonzero(is_held)
        classes = [c for c in all_classes if c not in held[seed]]
        unknown_X = [  # read once per seed and part, the unknown queries of every shot count
            np.concatenate([episode_features(X, _unknown_rows(part, held_rows)), extra]) for part in parts
        ]
        for n in shots:
            for part, unknown in zip(parts, unknown_X, strict=True):
                args = (n, seed, classes)
                runs += _episode_runs(X, labels, _known_part(part, known_rows), unknown, args, methods)
                if progress is not None:
                    progress(f"open set {n}-shot seed {seed} {part.name}")
    runs.sort(key=lambda r: (list(methods).index(r["method"]), r["shots"], r["seed"]))
    return {
        "held_out": {str(s): c for s, c in held.items()},
        "n_held_out": n_held_out,
        "n_unknowns_external": len(extra),
        "accept": ACCEPT,
        "alpha": ALPHA,
        "scores": {name: text for name, (text, _) in SCORES.items()},
        "baseline": BASELINE,
        "summary": summarise(runs),
        "paired": open_set_paired(runs),
        "runs": runs,
    }


def open_set_unknowns(config: EvalConfig, y: np.ndarray, meta: pd.DataFrame) -> Any:
    """Checked before any episode runs (so that a bad option loses no finished work): the features
    of `config.unknowns_features`, read with the extraction key of the evaluated features
    (`meta.attrs["digest"]`; None without the option), and whether `config.open_set` classes can
    be held out (ProtocolError; StoreError naming the store when it lacks that key)."""
    from calm.store import load_features

    if config.open_set:
        held_out_classes(sorted({str(c) for c in y}), config.open_set, 0)
    if config.unknowns_features is None:
        return None
    return load_features(config.unknowns_features, key=meta.attrs.get("digest"))[0]


def open_set_results(
    config: EvalConfig,
    X: Any,
    y: np.ndarray,
    meta: pd.DataFrame,
    methods: Mapping[str, Method],
    unknowns: Any = None,
    progress: Callable[[str, int, int | None], None] | None = None,
) -> dict:
    """results.json's `{"open_set": ...}`: `run_open_set` as `config` asks (`open_set`, and
    `unknowns`, the features of `config.unknowns_features`: `open_set_unknowns`), the unknowns
    store recorded; `{}` when it asks for none. `progress(stage, done, total)` counts the episodes."""
    if not config.open_set and config.unknowns_features is None:
        return {}
    done = [0]

    def step(_: str) -> None:
        done[0] += 1
        if progress is not None:
            progress("open-set episodes", done[0], None)

    doc = run_open_set(
        X,
        y,
        meta,
        methods=methods,
        shots=list(config.shots),
        seeds=list(config.seeds),
        n_held_out=config.open_set,
        unknowns=unknowns,
        test_fold=config.test_fold,
        progress=step,
    )
    return {
        "open_set": {**doc, "unknowns_features": None if unknowns is None else str(config.unknowns_features)}
    }


def open_set_paired(runs: Sequence[dict]) -> list[dict]:
    """Per method and shots, each alternative score's AUROC and FAR at 95 % (test-side and, for the
    baseline only, support-side) minus the baseline's: mean per-seed difference, 95 % t interval.
    `a` is the alternative score, `b` the baseline, `metric` `auroc` or `far95`."""
    out = []
    for method in dict.fromkeys(r["method"] for r in runs):
        scored = []
        for r in runs:
            if r["method"] != method:
                continue
            for name in [*(s for s in SCORES if s != BASELINE), BASELINE]:  # the baseline last: b
                metrics = {
                    k: r["metrics"][f"{k}_{name}"]
                    for k in ("auroc", "far95")
                    if f"{k}_{name}" in r["metrics"]
                }
                scored.append({**r, "method": name, "metrics": metrics})
        for p in paired_differences(scored):
            if p["b"] == BASELINE:
                out.append({**p, "method": method})
    return out
