"""The protocol of the methods that need the model to answer, on the SAME episodes as the few-shot
protocol: `zero-shot` scores the model's own answers on each episode's queries (unparsed answers are
wrong); `sav+pl` / `calm+pl` fit SAV / CALM on the kept pseudo-labelled clips of a seeded unlabelled
pool from the training part (`pl_pool`, outside the queries). A class with no kept clip cannot be
predicted: its queries stay in the denominator as wrong, with a warning.

The model side is injected (see `calm.answering.clips`); nothing here loads a model.
"""

from __future__ import annotations

import time
import zlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from calm.data.base import LABEL_SEP
from calm.evaluate.episodes import (
    Episode,
    Labels,
    Part,
    ProtocolError,
    episode_features,
    episodes,
    make_parts,
    row_labels,
    task_of,
)
from calm.evaluate.estimators import LALM_METHODS, PL_BASES, ZERO_SHOT, Method, choose_params
from calm.evaluate.metrics import evaluate_method, prediction_metrics
from calm.evaluate.records import Run

__all__ = [
    "ConstantClassifier",
    "LALMRunsResult",
    "pl_episode_runs",
    "pl_pool",
    "run_lalm_protocol",
    "zero_shot_episode_run",
]

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
    """Per-episode report of a pool's pseudo-labels (`calm.answering.pseudolabel.PseudoLabels`) against the
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


def _missing_class_warning(episode: Episode, missing: Sequence[str], truth: Sequence[tuple[str, ...]]) -> str:
    n_lost = sum(any(c in t for c in missing) for t in truth)
    return (
        f"{episode.shots}-shot seed {episode.seed} {episode.part}: no kept pseudo-labelled clip for "
        f"class(es) {list(missing)}; they cannot be predicted and their {n_lost} "
        "query clip(s) count as wrong"
    )


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
    missing = report["missing_classes"]
    warnings = [_missing_class_warning(episode, missing, truth)] if missing else []
    Xs = episode_features(X, rows) if len(rows) else np.empty((0, *X.shape[1:]), np.float32)
    Xq = episode_features(X, episode.query)
    runs = []
    for name, method in methods.items():
        t0 = time.perf_counter()
        if len(present) < 2:
            clf: Any = ConstantClassifier(present)
            params: dict = {}
            tuning = {"tuned": False, "reason": f"{len(present)} pseudo-labelled class(es): nothing to fit"}
        else:
            params, tuning = choose_params(method, Xs, support_y, seed=episode.seed, do_tune=do_tune)
            clf = method.build(**params).fit(Xs, support_y)
        run = Run(
            method=name,
            shots=episode.shots,
            seed=episode.seed,
            part=episode.part,
            metrics=evaluate_method(clf, Xq, truth, classes, task),
            params=params,
            tuning=tuning,
            n_support=len(rows),
            n_query=len(episode.query),
            pseudo_labels=report,
            warnings=warnings,
            seconds=round(time.perf_counter() - t0, 4),
        )
        runs.append(run.to_dict())
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
    run = Run(
        method=ZERO_SHOT,
        shots=episode.shots,
        seed=episode.seed,
        part=episode.part,
        metrics=prediction_metrics(y_pred, S, truth, classes, task),
        params=dict(params),
        tuning={"tuned": False, "reason": "zero-shot has no parameters to fit"},
        n_support=0,
        n_query=len(episode.query),
        n_unparsed=sum(p is None for p in y_pred),
    )
    return run.to_dict()


@dataclass
class LALMRunsResult:
    """What `run_lalm_protocol` returns: the runs (`Run.to_dict()`), the warnings of the pseudo-label
    episodes, and each episode's pool ((shots, seed, part) -> pool rows)."""

    runs: list[dict]
    warnings: list[str]
    pools: dict = field(default_factory=dict)


ZeroShotFn = Callable[[np.ndarray], tuple[Sequence[str | None], np.ndarray | None]]


def _zero_shot_runs(
    eps: Sequence[Episode],
    labels: Sequence[tuple[str, ...]],
    task: str,
    zero_shot: ZeroShotFn,
    params: Mapping[str, Any],
    progress: Callable[[str], None] | None,
) -> list[dict]:
    """The zero-shot run of every episode; `zero_shot` is asked once for all query rows (sorted)."""
    rows = np.unique(np.concatenate([ep.query for ep in eps]))
    preds, scores = zero_shot(rows)
    if len(preds) != len(rows) or (scores is not None and len(scores) != len(rows)):
        raise ValueError(f"zero_shot returned {len(preds)} predictions for {len(rows)} clips")
    pred_map = {int(r): p for r, p in zip(rows, preds, strict=True)}
    score_map = None if scores is None else {int(r): s for r, s in zip(rows, scores, strict=True)}
    runs = []
    for ep in eps:
        runs.append(zero_shot_episode_run(labels, ep, pred_map, score_map, task, params))
        if progress is not None:
            progress(f"zero-shot {ep.shots}-shot seed {ep.seed} {ep.part}")
    return runs


def _pl_runs(
    X: np.ndarray,
    eps: Sequence[Episode],
    parts: Sequence[Part],
    labels: Sequence[tuple[str, ...]],
    task: str,
    *,
    methods: Mapping[str, Method],
    pseudo_label: Callable[[np.ndarray], Any],
    pool_size: int | None,
    do_tune: bool,
    progress: Callable[[str], None] | None,
) -> LALMRunsResult:
    """The pseudo-label runs of every episode; `pseudo_label` is asked once for all pool rows (sorted)."""
    by_name = {p.name: p for p in parts}
    pools: dict = {}
    for ep in eps:
        size = pool_size if pool_size is not None else ep.shots * len(ep.classes)
        pools[(ep.shots, ep.seed, ep.part)] = pl_pool(by_name[ep.part], ep, size, ep.seed)
    rows = np.unique(np.concatenate(list(pools.values())))
    pseudo = pseudo_label(rows)
    if len(pseudo.labels) != len(rows):
        raise ValueError(f"pseudo_label returned {len(pseudo.labels)} labels for {len(rows)} clips")
    position = {int(r): i for i, r in enumerate(rows)}
    runs: list[dict] = []
    warnings: list[str] = []
    for ep in eps:
        pool = pools[(ep.shots, ep.seed, ep.part)]
        sub = pseudo.subset([position[int(r)] for r in pool])
        ep_runs = pl_episode_runs(X, labels, ep, pool, sub, methods, task, do_tune=do_tune)
        runs.extend(ep_runs)
        warnings.extend(ep_runs[0]["warnings"])
        if progress is not None:
            progress(f"pseudo-labels {ep.shots}-shot seed {ep.seed} {ep.part}")
    return LALMRunsResult(runs, warnings, pools)


def run_lalm_protocol(
    X: np.ndarray,
    y: Labels,
    meta: pd.DataFrame,
    *,
    methods: Sequence[str],
    shots: Sequence[int],
    seeds: Sequence[int],
    test_fold: int | str | None = 5,
    zero_shot: ZeroShotFn | None = None,
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
    labels = row_labels(y)
    task = task_of(y)
    eps = episodes(y, parts, shots, seeds)
    result = LALMRunsResult([], [])
    if ZERO_SHOT in methods:
        if zero_shot is None:
            raise ValueError("zero-shot requested without a zero_shot function")
        result.runs += _zero_shot_runs(eps, labels, task, zero_shot, zero_shot_params or {}, progress)
    pl_methods = [m for m in methods if m in PL_BASES]
    if pl_methods:
        if pseudo_label is None or fewshot is None:
            raise ValueError("pseudo-label methods requested without pseudo_label / fewshot methods")
        chosen = {m: fewshot[PL_BASES[m]] for m in pl_methods}
        pl = _pl_runs(
            X,
            eps,
            parts,
            labels,
            task,
            methods=chosen,
            pseudo_label=pseudo_label,
            pool_size=pl_pool_size,
            do_tune=do_tune,
            progress=progress,
        )
        result.runs += pl.runs
        result.warnings, result.pools = pl.warnings, pl.pools
    return result
