"""Which pool clips a self-training round picks: confidence of predictions, balanced picks per class,
similarity of a clip to its predicted class (the pure helpers of :class:`calm.selftraining.SelfTraining`)."""

from __future__ import annotations

import numpy as np

__all__ = ["balanced_picks", "class_similarity", "confidence_scores"]


def confidence_scores(estimator, X, measure: str) -> tuple[np.ndarray, np.ndarray]:
    """(predicted class index (n,), confidence (n,)) of a fitted estimator on X.

    "margin": best minus second-best ``decision_function`` score; "probability": the best entry of
    ``predict_proba``. Ties between classes go to the lower class index, as in ``predict``.
    """
    if measure == "margin":
        s = np.asarray(estimator.decision_function(X), dtype=np.float64)
    elif measure == "probability":
        s = np.asarray(estimator.predict_proba(X), dtype=np.float64)
    else:
        raise ValueError(f"confidence must be 'margin' or 'probability', got {measure!r}")
    if s.ndim == 1:  # two classes: scikit-learn's score of classes_[1] minus that of classes_[0]
        return (s > 0).astype(np.int64), np.abs(s)
    pred = np.argmax(s, axis=1)
    if measure == "probability":
        return pred, s[np.arange(len(s)), pred]
    top2 = np.sort(s, axis=1)[:, -2:] if s.shape[1] > 1 else np.concatenate([s, s], axis=1)
    return pred, top2[:, 1] - top2[:, 0]


def balanced_picks(
    pred: np.ndarray,
    conf: np.ndarray,
    quota: np.ndarray,
    eligible: np.ndarray,
    near: np.ndarray | None = None,
    spread: int = 1,
) -> np.ndarray:
    """Rows to add: for each class c, the ``quota[c]`` eligible rows predicted as c with the highest
    confidence (ties: the lower row). With ``near`` ((n,) similarity of each row to its predicted
    class) and ``spread`` > 1, the ``spread * quota[c]`` most confident rows are the candidates and
    the ``quota[c]`` least similar of them are taken. Returns row indices grouped by class."""
    picks = []
    for c in range(len(quota)):
        rows = np.flatnonzero(eligible & (pred == c))
        if len(rows) and quota[c] > 0:
            order = np.lexsort((rows, -conf[rows]))  # confidence descending, then lower row
            if near is None or spread == 1:
                picks.append(rows[order[: int(quota[c])]])
                continue
            cand = rows[order[: int(quota[c]) * spread]]
            picks.append(cand[np.lexsort((cand, near[cand]))[: int(quota[c])]])  # least similar first
    return np.concatenate(picks) if picks else np.empty(0, dtype=np.int64)


def class_similarity(
    X_pool, X_support: np.ndarray, y_idx: np.ndarray, pred: np.ndarray, C: int
) -> np.ndarray:
    """(m,) mean over heads of the cosine similarity of each pool clip to the mean of the unit-length
    features of the support clips (labelled + pseudo-labelled) of its predicted class."""
    from calm._heads import class_centroids, cosine_similarities, l2_normalize

    centroids = class_centroids(l2_normalize(X_support), y_idx, C)
    sims = cosine_similarities(_rows(X_pool, np.arange(_n_rows(X_pool))), centroids).mean(dim=1)
    return sims.numpy()[np.arange(len(pred)), pred]


def _rows(X, idx: np.ndarray) -> np.ndarray:
    """Rows ``idx`` of X (NumPy, memory map, torch tensor, ShardedArray) as a NumPy array."""
    if hasattr(X, "detach"):
        X = X.detach().cpu().numpy()
    return np.asarray(X[np.asarray(idx, dtype=np.int64)])


def _n_rows(X) -> int:
    return int(X.shape[0]) if hasattr(X, "shape") else len(X)
