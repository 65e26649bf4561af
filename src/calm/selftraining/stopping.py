"""The self-training guard: how many rounds the support set says self-training may run (issue 24).

``guard="cv"`` of :class:`calm.selftraining.SelfTraining`: the support set is split into at most
`MAX_FOLDS` folds, fold j holding out the j-th labelled clip of every class that has two or more;
for each fold the same self-training (same pool, same schedule) runs on the other labelled clips and
predicts the held-out ones after every round. The pseudo-labels of a fold are chosen without its
held-out clips, so the estimate is honest: on EmoDB the pseudo-labelled clips are near the labelled
clips (same speaker, other emotion) and every estimate that scores the support set with the
pseudo-labels chosen from it (reverse validation, leave-one-out with the pseudo-labels added) rates
them well while they are mostly wrong (docs/results.md, "The self-training guard").

`choose_rounds` allows the whole schedule when the cross-validated accuracy after its last round
is at least that of the support set alone, else no round (chosen on validation splits against
stopping at the first round below round 0, the best round, and the last round at least round 0).
With one labelled clip in every class there is nothing to hold out: the guard cannot estimate and
lets the schedule run (recorded as ``estimable: False``).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

__all__ = ["MAX_FOLDS", "choose_rounds", "cv_curve", "guard_folds"]

#: At most this many folds (the cost: about one self-training fit per fold)
MAX_FOLDS = 5


def guard_folds(y: np.ndarray) -> list[np.ndarray]:
    """Boolean masks of the held-out labelled clips, one per fold: fold j holds out the j-th clip (in
    row order) of each class with at least two clips and more than j; no fold when no class has two."""
    pos = np.zeros(len(y), dtype=np.int64)
    counts = np.zeros(len(y), dtype=np.int64)
    for c in np.unique(y):
        rows = np.flatnonzero(y == c)
        pos[rows], counts[rows] = np.arange(len(rows)), len(rows)
    n_folds = min(int(counts.max(initial=0)), MAX_FOLDS) if np.any(counts >= 2) else 0
    return [(pos == j) & (counts >= 2) for j in range(n_folds)]


def cv_curve(
    y: np.ndarray, rounds: int, run: Callable[[np.ndarray, int], list[np.ndarray]]
) -> list[float] | None:
    """Cross-validated accuracy (fraction) of the support set after 0..``rounds`` rounds, or None
    without folds. ``run(train_mask, rounds)`` self-trains on the rows of ``train_mask`` and returns
    the predictions of the other rows after each round run (round 0 first; a run that stops early
    returns fewer, its last one stands for the rest)."""
    hits: list[list[np.ndarray]] = [[] for _ in range(rounds + 1)]
    for out in guard_folds(y):
        preds = run(~out, rounds)
        preds += [preds[-1]] * (rounds + 1 - len(preds))
        for r, p in enumerate(preds):
            hits[r].append(np.asarray(p) == y[out])
    if not hits[0]:
        return None
    return [float(np.mean(np.concatenate(h))) for h in hits]


def choose_rounds(curve: list[float]) -> int:
    """Rounds allowed by a `cv_curve`: all of them when the cross-validated accuracy after the last
    round is at least that of the support set alone, else none."""
    return len(curve) - 1 if curve[-1] >= curve[0] else 0
