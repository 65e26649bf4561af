"""Self-training methods in the few-shot protocol (:class:`calm.selftraining.SelfTraining` around SAV /
CALM), on the SAME episodes (support sets and queries) as `run_protocol`, so they pair with CALM / SAV.

- `calm+st`, `sav+st` (inductive): the unlabelled pool comes from the episode's TRAINING part with
  its labels hidden: every training clip outside the support set, never a query or test clip, or
  `pool` of them drawn with the episode's seed (a smaller pool is a prefix of the same seeded
  permutation). Without an official split or folds every clip outside the support set is a query,
  so no such pool exists: a `ProtocolError` says so (hold out a test part for every method with
  `calm evaluate --holdout F`, `calm.evaluate.episodes.holdout_split`, or use the `-trans` methods).
- `calm+st-trans`, `sav+st-trans` (transductive): the episode's own queries are the pool (labels
  hidden), reported under their own names so that no table mixes the two settings.

Every run records `self_training`: the pool size and how many of it were drawn (`pool_per_class`,
with the episode's seed), the pseudo-labelled clips, their accuracy against the hidden labels (%),
clips added per class, rounds run, the guard's decision (`guard`: None without a guard, else
whether it could estimate, its folds, the support set's cross-validated accuracy after 0..R rounds
and the rounds it allowed; `calm.selftraining.stopping`), and per class the clips added, how many of
them are right and the query recall with and without self-training (single-label data), the numbers
that explain a gain or a loss. `st_summary` averages them per (method, shots) for results.md.
"""

from __future__ import annotations

import time
import zlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from calm import methods as registry
from calm.errors import ParameterError
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
from calm.evaluate.estimators import Method, choose_params
from calm.evaluate.metrics import evaluate_method
from calm.evaluate.records import Run
from calm.selftraining import SelfTraining

__all__ = ["ST_BASES", "ST_METHODS", "STSpec", "run_st_protocol", "st_pool", "st_report", "st_summary"]

ST_METHODS = registry.names("self-training")
#: self-training method -> the few-shot method it wraps
ST_BASES = {m: str(registry.info(m).base) for m in ST_METHODS}
#: `SelfTraining`'s defaults, the one home of the schedule's defaults
_ST_DEFAULTS = SelfTraining().get_params()
ST_STREAM = 0x5354  # keeps the pool's random stream apart from the support draws


@dataclass(frozen=True)
class STSpec:
    """The self-training schedule and pool (defaults: those of `calm.selftraining.SelfTraining`, from
    docs/results.md "Self-training, schedule revised").

    Attributes:
        rounds: predict-pick-refit rounds.
        per_round: pseudo-labelled clips a class gains per round at most.
        confidence: `margin` (top score minus runner-up) or `probability`.
        labelled_weight: times a labelled clip counts, or `shots` (its class's labelled clips).
        max_labelled: classes with more labelled clips gain none (None: no limit).
        spread: candidates per clip added (1: the most confident; see `SelfTraining`).
        pool_per_class: self-train on at most this many pool clips per class, drawn with the
            episode's seed (None: the whole pool).
        pool: unlabelled clips per episode (None: every eligible clip).
        guard: `cv` (rounds limited by cross-validation on the support set) or None (all rounds).
    """

    rounds: int = _ST_DEFAULTS["rounds"]
    per_round: int = _ST_DEFAULTS["per_round"]
    confidence: str = _ST_DEFAULTS["confidence"]
    labelled_weight: int | str = _ST_DEFAULTS["labelled_weight"]
    max_labelled: int | None = _ST_DEFAULTS["max_labelled"]
    spread: int = _ST_DEFAULTS["spread"]
    pool_per_class: int | None = _ST_DEFAULTS["pool_per_class"]
    pool: int | None = None
    guard: str | None = _ST_DEFAULTS["guard"]

    def __post_init__(self) -> None:
        if self.rounds < 0 or self.per_round < 1 or (self.pool is not None and self.pool < 1):
            raise ParameterError("self-training needs rounds >= 0, per_round >= 1 and pool >= 1 (or None)")
        if self.confidence not in ("margin", "probability"):
            raise ParameterError(f"confidence must be 'margin' or 'probability', got {self.confidence!r}")
        self.wrap(None)._validate_params()  # labelled_weight, max_labelled, spread: the wrapper's rules

    def params(self) -> dict[str, Any]:
        """The schedule as recorded in each run's parameters."""
        return {
            "st_rounds": self.rounds,
            "st_per_round": self.per_round,
            "st_confidence": self.confidence,
            "st_labelled_weight": self.labelled_weight,
            "st_max_labelled": self.max_labelled,
            "st_spread": self.spread,
            "st_pool_per_class": self.pool_per_class,
            "st_guard": self.guard,
        }

    def wrap(self, estimator: Any, seed: int = 0) -> SelfTraining:
        """The `SelfTraining` of this schedule around `estimator`, drawing its pool with `seed`."""
        return SelfTraining(
            estimator,
            rounds=self.rounds,
            per_round=self.per_round,
            confidence=self.confidence,
            labelled_weight=self.labelled_weight,
            max_labelled=self.max_labelled,
            spread=self.spread,
            pool_per_class=self.pool_per_class,
            random_state=seed,
            guard=self.guard,
        )


def st_pool(part: Part, episode: Episode, size: int | None, *, transductive: bool = False) -> np.ndarray:
    """Sorted row indices of an episode's unlabelled pool (see the module docstring)."""
    if transductive:
        candidates = np.asarray(episode.query, dtype=np.int64)
    else:
        candidates = np.setdiff1d(np.setdiff1d(part.train, episode.support), episode.query)
        if part.test is not None:
            candidates = np.setdiff1d(candidates, part.test)
        if len(candidates) == 0:
            raise ProtocolError(
                f"part {part.name}, {episode.shots} shots: no unlabelled training clip outside the support "
                "set and the queries (without a split every other clip is a query); hold out a test part "
                "with --holdout F, or use calm+st-trans / sav+st-trans for the transductive setting"
            )
    if size is None or size >= len(candidates):
        return np.sort(candidates)
    rng = np.random.default_rng([episode.seed, zlib.crc32(part.name.encode()), ST_STREAM])
    return np.sort(candidates[rng.permutation(len(candidates))[:size]])


def _recall(
    pred: Sequence, truth: Sequence[tuple[str, ...]], classes: Sequence[str]
) -> dict[str, float | None]:
    out: dict[str, float | None] = {}
    for c in classes:
        hits = [p == c for p, t in zip(pred, truth, strict=True) if c in t]
        out[c] = 100.0 * float(np.mean(hits)) if hits else None
    return out


def st_report(
    st: SelfTraining,
    pool: np.ndarray,
    labels: Sequence[tuple[str, ...]],
    classes: Sequence[str],
    recall: tuple[dict, dict] | None = None,
) -> dict:
    """A fitted `SelfTraining`'s pseudo-labels against the pool's hidden labels; `recall` (with, without
    self-training) per class adds the query recalls."""
    rows = pool[st.pseudo_index_]
    right = np.array([str(c) in labels[i] for c, i in zip(st.pseudo_labels_, rows, strict=True)], dtype=bool)
    added = {str(c): int(n) for c, n in zip(st.classes_, st.added_per_class_, strict=True)}
    per_class = {}
    for c in classes:
        mine = st.pseudo_labels_.astype(str) == c
        entry: dict[str, Any] = {"added": added.get(c, 0), "right": int(np.sum(right & mine))}
        if recall is not None:
            entry["query_recall"], entry["query_recall_without_st"] = recall[0][c], recall[1][c]
        per_class[c] = entry
    return {
        "pool": len(pool),
        "pool_drawn": len(st.pool_index_),
        "pseudo_labelled": len(rows),
        "pseudo_accuracy": 100.0 * float(right.mean()) if len(right) else None,
        "added_per_class": added,
        "rounds": int(st.n_rounds_),
        "guard": st.guard_,
        "per_class": per_class,
    }


def _episode_runs(
    X: Any,
    labels: Sequence[tuple[str, ...]],
    ep: Episode,
    part: Part,
    methods: Mapping[str, Method],
    spec: STSpec,
    task: str,
    do_tune: bool,
) -> list[Run]:
    """One run of every self-training method on one episode (`methods`: st name -> base method)."""
    Xs, Xq = episode_features(X, ep.support), episode_features(X, ep.query)
    truth = [labels[i] for i in ep.query]
    classes = list(ep.classes)
    pools: dict[bool, tuple[np.ndarray, np.ndarray]] = {}
    out = []
    for name, base in methods.items():
        trans = registry.info(name).transductive
        if trans not in pools:
            pool = st_pool(part, ep, spec.pool, transductive=trans)
            pools[trans] = (pool, episode_features(X, pool))
        pool, Xp = pools[trans]
        t0 = time.perf_counter()
        params, tuning = choose_params(base, Xs, ep.support_y, seed=ep.seed, do_tune=do_tune)
        clf = spec.wrap(base.build(**params), ep.seed).fit(Xs, ep.support_y, Xp)
        metrics = evaluate_method(clf, Xq, truth, classes, task)
        seconds = round(time.perf_counter() - t0, 4)
        recall = None
        if task == "single":
            alone = base.build(**params).fit(Xs, ep.support_y).predict(Xq)
            recall = (_recall(list(clf.predict(Xq)), truth, classes), _recall(list(alone), truth, classes))
        run = Run(
            method=name,
            shots=ep.shots,
            seed=ep.seed,
            part=ep.part,
            metrics=metrics,
            params={**params, **spec.params()},
            tuning=tuning,
            n_support=len(ep.support),
            n_query=len(ep.query),
            seconds=seconds,
            self_training=st_report(clf, pool, labels, classes, recall),
        )
        out.append(run)
    return out


def run_st_protocol(
    X: Any,
    y: Labels,
    meta: pd.DataFrame,
    *,
    methods: Mapping[str, Method],
    spec: STSpec,
    shots: Sequence[int],
    seeds: Sequence[int],
    test_fold: int | str | None = 5,
    do_tune: bool = False,
    progress: Callable[[str], None] | None = None,
) -> list[dict]:
    """Runs (`Run.to_dict()`) of the self-training methods on every (shots, seed, part) episode;
    `methods` maps each st method name to the few-shot method it wraps (`ST_BASES`)."""
    unknown = [m for m in methods if m not in ST_METHODS]
    if unknown:
        raise ParameterError(f"not self-training methods: {unknown}")
    y = np.asarray(y).astype(str)
    parts, _ = make_parts(meta, test_fold)
    by_name = {p.name: p for p in parts}
    labels = row_labels(y)
    task = task_of(y)
    runs: list[dict] = []
    for ep in episodes(y, parts, shots, seeds):
        for run in _episode_runs(X, labels, ep, by_name[ep.part], methods, spec, task, do_tune):
            runs.append(run.to_dict())
            if progress is not None:
                progress(f"{run.method} {ep.shots}-shot seed {ep.seed} {ep.part}")
    return runs


def _guard_summary(reps: Sequence[dict]) -> dict[str, int]:
    """How often the guard ran, could estimate and stopped self-training before the schedule's end."""
    guards = [v["guard"] for v in reps if v.get("guard") is not None]
    est = [g for g in guards if g["estimable"]]
    return {
        "guarded": len(guards),
        "guard_estimable": len(est),
        "guard_stopped": sum(g["rounds_allowed"] < len(g["cv_accuracy"]) - 1 for g in est),
    }


def st_summary(runs: Sequence[dict]) -> list[dict]:
    """Per (method, shots) over the self-training runs: mean pool size, pseudo-labelled clips, their
    accuracy (%, episodes that added nothing left out), the mean fewest / most clips a class got, and
    the guard's decisions (episodes guarded, estimable, stopped before the schedule's end)."""
    groups: dict[tuple[str, int], list[dict]] = {}
    for r in runs:
        if r.get("self_training") is not None:
            groups.setdefault((r["method"], r["shots"]), []).append(r["self_training"])
    out = []
    for (method, shots), reps in groups.items():
        acc = [v["pseudo_accuracy"] for v in reps if v["pseudo_accuracy"] is not None]
        per = [list(v["added_per_class"].values()) for v in reps]
        out.append(
            {
                "method": method,
                "shots": shots,
                "episodes": len(reps),
                "pool": float(np.mean([v["pool"] for v in reps])),
                "pool_drawn": float(np.mean([v.get("pool_drawn", v["pool"]) for v in reps])),
                "pseudo_labelled": float(np.mean([v["pseudo_labelled"] for v in reps])),
                "pseudo_accuracy": float(np.mean(acc)) if acc else None,
                "added_min": float(np.mean([min(p) for p in per])),
                "added_max": float(np.mean([max(p) for p in per])),
                **_guard_summary(reps),
            }
        )
    return out


def _guard_cell(s: Mapping) -> str:
    """E.g. "7 of 10": episodes stopped of those the guard could judge ("-": no guard)."""
    if not s.get("guarded"):
        return "-"
    if not s["guard_estimable"]:
        return "cannot judge (1 clip a class)"
    return f"{s['guard_stopped']} of {s['guard_estimable']}"


def st_table(summary: Sequence[Mapping]) -> list[str]:
    """results.md lines for `st_summary` (empty without self-training runs)."""
    if not summary:
        return []
    lines = [
        "",
        "## Self-training (pseudo-labelled clips; mean over episodes)",
        "",
        "| method | shots | pool | drawn | pseudo-labelled | right (%) | clips a class (fewest / most) "
        "| guard stopped |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for s in summary:
        acc = "-" if s["pseudo_accuracy"] is None else f"{s['pseudo_accuracy']:.1f}"
        lines.append(
            f"| {s['method']} | {s['shots']} | {s['pool']:.0f} | {s['pool_drawn']:.0f} "
            f"| {s['pseudo_labelled']:.1f} | {acc} "
            f"| {s['added_min']:.1f} / {s['added_max']:.1f} | {_guard_cell(s)} |"
        )
    return lines
