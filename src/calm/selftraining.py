"""Self-training of a head classifier on unlabelled clips (``calm+st`` / ``sav+st``; beyond the paper).

:class:`SelfTraining` wraps an unfitted SAV or CALM: it fits the inner estimator on the labelled
support set, predicts an unlabelled pool, adds each class's most confident predictions to the
support set as pseudo-labelled clips, refits, and repeats for ``rounds`` rounds. It needs no model
call beyond the features, so it works for any backbone (Whisper included).

Why a wrapper with ``fit(X, y, X_unlabelled=None)``:

- one wrapper serves SAV and CALM (and any estimator with ``fit`` / ``predict`` /
  ``decision_function``), so neither classifier grows self-training parameters, and
  ``sklearn.base.clone`` / ``get_params(deep=True)`` reach the inner parameters
  (``estimator__k``);
- the unlabelled clips travel as their own argument instead of scikit-learn's ``y == -1`` convention
  (:class:`sklearn.semi_supervised.SelfTrainingClassifier`): labels here are any hashables (class
  names are strings), so no sentinel value is safe, and (n, K, d) features of the labelled and
  unlabelled clips are not concatenated by the caller;
- the transductive setting is the same call with the queries as ``X_unlabelled``; which clips form
  the pool is the caller's decision (``calm evaluate`` draws it from the training part, never from
  the test clips, unless the ``-trans`` methods are asked for).

Schedule (defaults rounds=5, per_round=5, margin, no relabelling, labelled_weight="shots",
pool_per_class=30: chosen by paired measurements on validation splits inside the training parts,
docs/results.md "Self-training, schedule revised"; the schedule before it is ``rounds=3,
labelled_weight=1, pool_per_class=None``):

- ``pool_per_class=n`` self-trains on at most ``n * C`` clips of ``X_unlabelled`` drawn with
  ``random_state`` (``pool_index_``); None: all of them. The most confident clips of a large pool are
  the most typical ones for the labelled centroid (on FSDD, the speakers the support set already holds):
  right, but they tilt the centroids; a random draw first keeps the pool's mix;
- each round every class gains at most ``per_round`` clips: the pool clips predicted as that class
  with the highest ``confidence`` ("margin": top score minus the runner-up of
  ``decision_function``; "probability": the top entry of ``predict_proba``), so no class can
  swallow the pool; ties go to the earlier pool row. ``spread=k`` > 1 takes, of a class's
  ``k * quota`` most confident clips, the ``quota`` least similar to its current support
  (`class_similarity`);
- ``relabel=False`` keeps a clip's pseudo-label once added (classic self-training); ``True``
  re-chooses the whole pseudo-labelled set from the pool every round (``per_round * r`` a class
  after round r), so an early mistake can be dropped;
- ``labelled_weight=w`` counts every labelled clip w times in the inner fit (each pseudo-labelled
  clip once): for SAV and CALM (in-sample reliabilities) that is exactly a weighted mean in the
  centroids (Eq. 1), the reliabilities (Eq. 7 / 11) and SAV's head accuracies; "shots": as many
  times as its class has labelled clips, so pseudo-labels weigh less as the shots grow;
- ``max_labelled=n``: a class with more than n labelled clips gains no pseudo-labels (None: no limit);
- the inner estimator is refitted from scratch each round, so its heads are re-selected.

Fitted attributes: ``estimator_`` (the final inner estimator; ``predict`` and friends delegate to
it), ``classes_``, ``pool_index_`` (rows of ``X_unlabelled`` self-trained on), ``pseudo_index_``
(rows of ``X_unlabelled`` in the final pseudo-labelled set, in the order added), ``pseudo_labels_``,
``pseudo_confidence_`` (confidence when chosen), ``pseudo_round_`` (round chosen, 1-based),
``added_per_class_`` ((C,) clips per class in the final set), ``rounds_`` (one dict per round run:
``round``, ``added``, ``n_pseudo``, ``added_per_class``, ``mean_confidence``), ``n_rounds_``.
"""

from __future__ import annotations

from numbers import Integral
from typing import Any, ClassVar

import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin, MetaEstimatorMixin, _fit_context, clone
from sklearn.utils._param_validation import HasMethods, Interval, StrOptions
from sklearn.utils.metaestimators import available_if
from sklearn.utils.validation import check_is_fitted

__all__ = ["SelfTraining", "balanced_picks", "class_similarity", "confidence_scores"]


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


def _pool_rows(X_unlabelled, X_lab: np.ndarray) -> int:
    """Rows of the pool (0 for None); ValueError when its rows differ in shape from the labelled ones."""
    m = 0 if X_unlabelled is None else _n_rows(X_unlabelled)
    if m and tuple(X_unlabelled.shape[1:]) != tuple(X_lab.shape[1:]):
        raise ValueError(
            f"X_unlabelled rows have shape {tuple(X_unlabelled.shape[1:])}, "
            f"the labelled rows {tuple(X_lab.shape[1:])}"
        )
    return m


def _round_report(r: int, added: int, p_cls: np.ndarray, p_conf: np.ndarray, C: int) -> dict:
    """One entry of ``rounds_``: the round, clips added, set size, clips a class, mean confidence."""
    return {
        "round": r,
        "added": added,
        "n_pseudo": len(p_cls),
        "added_per_class": np.bincount(p_cls, minlength=C).tolist(),
        "mean_confidence": float(p_conf.mean()) if len(p_conf) else None,
    }


class SelfTraining(MetaEstimatorMixin, ClassifierMixin, BaseEstimator):
    """Self-training around a head classifier (see the module docstring for the schedule).

    Parameters
    ----------
    estimator : unfitted estimator or None
        The inner classifier (``calm.CALM(...)``, ``calm.SAV(...)``); None: ``CALM()``.
    rounds : int >= 0
        Rounds of predict-pick-refit; 0 is the inner estimator alone.
    per_round : int >= 1
        Pseudo-labelled clips a class gains per round at most.
    confidence : "margin" or "probability"
        How pool predictions are ranked within a class.
    relabel : bool
        Re-choose the whole pseudo-labelled set every round instead of only adding to it.
    labelled_weight : int >= 1 or "shots"
        How many times a labelled clip counts relative to a pseudo-labelled one ("shots": the number
        of labelled clips of its class).
    max_labelled : int >= 1 or None
        Classes with more labelled clips than this gain no pseudo-labels.
    spread : int >= 1
        Take a class's clips among its ``spread * quota`` most confident, least similar first.
    pool_per_class : int >= 1 or None
        Self-train on at most this many pool clips per class (times the number of classes), drawn
        with ``random_state``; None: the whole pool.
    random_state : int >= 0 or None
        Seed of that draw.

    Examples
    --------
    One labelled clip per class and ten unlabelled ones (made-up features, see :class:`calm.SAV`):

    >>> import numpy as np
    >>> from calm import CALM, SelfTraining
    >>> rng = np.random.default_rng(0)
    >>> centres = rng.normal(size=(2, 4, 8))
    >>> X = np.concatenate([c + 0.3 * rng.normal(size=(6, 4, 8)) for c in centres]).astype(np.float32)
    >>> y = np.array(["dog"] * 6 + ["rain"] * 6)
    >>> labelled, pool = [0, 6], [1, 2, 3, 4, 5, 7, 8, 9, 10, 11]
    >>> st = SelfTraining(CALM(k=2), rounds=2, per_round=1, pool_per_class=None)
    >>> st = st.fit(X[labelled], y[labelled], X_unlabelled=X[pool])
    >>> st.added_per_class_.tolist()  # pseudo-labelled clips each class gained
    [2, 2]
    >>> st.predict(X[[0, 11]]).tolist()
    ['dog', 'rain']
    """

    _parameter_constraints: ClassVar[dict[str, list[Any]]] = {
        "estimator": [HasMethods(["fit", "predict", "decision_function"]), None],
        "rounds": [Interval(Integral, 0, None, closed="left")],
        "per_round": [Interval(Integral, 1, None, closed="left")],
        "confidence": [StrOptions({"margin", "probability"})],
        "relabel": ["boolean"],
        "labelled_weight": [Interval(Integral, 1, None, closed="left"), StrOptions({"shots"})],
        "max_labelled": [Interval(Integral, 1, None, closed="left"), None],
        "spread": [Interval(Integral, 1, None, closed="left")],
        "pool_per_class": [Interval(Integral, 1, None, closed="left"), None],
        "random_state": [Interval(Integral, 0, None, closed="left"), None],
    }

    def __init__(
        self,
        estimator=None,
        *,
        rounds: int = 5,
        per_round: int = 5,
        confidence: str = "margin",
        relabel: bool = False,
        labelled_weight: int | str = "shots",
        max_labelled: int | None = None,
        spread: int = 1,
        pool_per_class: int | None = 30,
        random_state: int | None = 0,
    ):
        self.estimator = estimator
        self.rounds = rounds
        self.per_round = per_round
        self.confidence = confidence
        self.relabel = relabel
        self.labelled_weight = labelled_weight
        self.max_labelled = max_labelled
        self.spread = spread
        self.pool_per_class = pool_per_class
        self.random_state = random_state

    def _inner(self):
        if self.estimator is None:
            from calm.classifiers import CALM

            return CALM()
        return clone(self.estimator)

    def _labelled_repeats(self, y_lab: np.ndarray) -> np.ndarray:
        """How many times each labelled clip counts: ``labelled_weight``, or with "shots" the number
        of labelled clips of its class."""
        if self.labelled_weight == "shots":
            _, inverse, counts = np.unique(y_lab, return_inverse=True, return_counts=True)
            return counts[inverse]
        return np.full(len(y_lab), int(self.labelled_weight))

    def _quota(self, y_lab: np.ndarray, classes: np.ndarray, per_class: int) -> np.ndarray:
        """(C,) clips a class may hold or gain: ``per_class``, 0 for a class with more than
        ``max_labelled`` labelled clips."""
        quota = np.full(len(classes), per_class)
        if self.max_labelled is not None:
            n_lab = np.array([np.sum(y_lab == c) for c in classes])
            quota[n_lab > self.max_labelled] = 0
        return quota

    def _draw(self, m: int, C: int) -> np.ndarray:
        """Sorted rows of the pool self-trained on: all ``m``, or ``pool_per_class * C`` of them drawn
        with ``random_state``."""
        if self.pool_per_class is None or self.pool_per_class * C >= m:
            return np.arange(m)
        rng = np.random.default_rng(self.random_state)
        return np.sort(rng.permutation(m)[: self.pool_per_class * C])

    def _picks(self, X_lab, y_lab, X_pool, pred, conf, quota, eligible, pseudo, p_cls) -> np.ndarray:
        """`balanced_picks` of one round; with ``spread`` > 1 the similarity of each pool clip to its
        predicted class's current support (labelled + ``pseudo`` with classes ``p_cls``)."""
        near = None
        if self.spread > 1:
            _, y_idx = np.unique(y_lab, return_inverse=True)
            Xs = np.concatenate([X_lab, _rows(X_pool, pseudo)]) if len(pseudo) else X_lab
            near = class_similarity(X_pool, Xs, np.concatenate([y_idx, p_cls]), pred, len(quota))
        return balanced_picks(pred, conf, quota, eligible, near, self.spread)

    def _refit(self, X_lab: np.ndarray, y_lab: np.ndarray, X_pool, pseudo: np.ndarray, labels: np.ndarray):
        """A fresh inner estimator on the labelled clips (each repeated per `_labelled_repeats`) +
        ``pseudo``."""
        rep = self._labelled_repeats(y_lab)
        Xs = [np.repeat(X_lab, rep, axis=0)] + ([_rows(X_pool, pseudo)] if len(pseudo) else [])
        ys = [np.repeat(y_lab, rep)] + ([labels] if len(pseudo) else [])
        return self._inner().fit(np.concatenate(Xs), np.concatenate(ys))

    @_fit_context(prefer_skip_nested_validation=False)
    def fit(self, X, y, X_unlabelled=None):
        """Fit on labelled features X (n, K, d) and labels y, self-training on ``X_unlabelled``
        (m, K, d) (rows of any array-like with ``shape`` and row indexing; None or 0 rows: the
        inner estimator alone). Returns self."""
        X_lab = _rows(X, np.arange(_n_rows(X)))
        y_lab = np.asarray(y)
        if y_lab.ndim != 1 or len(y_lab) != len(X_lab):
            raise ValueError(f"X has {len(X_lab)} samples but y has shape {y_lab.shape}")
        est = self._inner().fit(X_lab, y_lab)
        classes = np.asarray(est.classes_)
        C = len(classes)
        m = _pool_rows(X_unlabelled, X_lab)
        drawn = self._draw(m, C)
        X_pool = _rows(X_unlabelled, drawn) if len(drawn) < m else X_unlabelled
        m = len(drawn)
        pseudo = np.empty(0, dtype=np.int64)
        p_cls = np.empty(0, dtype=np.int64)
        p_conf = np.empty(0, dtype=np.float64)
        p_round = np.empty(0, dtype=np.int64)
        self.rounds_ = []
        for r in range(1, self.rounds + 1 if m else 1):
            pred, conf = confidence_scores(est, X_pool, self.confidence)
            if self.relabel:
                quota = self._quota(y_lab, classes, self.per_round * r)
                keep = np.empty(0, dtype=np.int64)
                new = self._picks(X_lab, y_lab, X_pool, pred, conf, quota, np.ones(m, bool), keep, keep)
                old = {int(i): int(k) for i, k in zip(pseudo, p_round, strict=True)}
                rounds_of = np.array([old.get(int(i), r) for i in new], dtype=np.int64)
                added = int(np.sum(~np.isin(new, pseudo)))
                pseudo, p_cls, p_conf, p_round = new, pred[new], conf[new], rounds_of
            else:
                eligible = np.ones(m, dtype=bool)
                eligible[pseudo] = False
                quota = self._quota(y_lab, classes, self.per_round)
                new = self._picks(X_lab, y_lab, X_pool, pred, conf, quota, eligible, pseudo, p_cls)
                added = len(new)
                pseudo = np.concatenate([pseudo, new])
                p_cls = np.concatenate([p_cls, pred[new]])
                p_conf = np.concatenate([p_conf, conf[new]])
                p_round = np.concatenate([p_round, np.full(len(new), r)])
            if added == 0 and not self.relabel:
                break  # nothing left to add: the estimator would not change
            est = self._refit(X_lab, y_lab, X_pool, pseudo, classes[p_cls])
            self.rounds_.append(_round_report(r, added, p_cls, p_conf, C))
        self.estimator_ = est
        self.classes_ = classes
        self.pool_index_ = drawn
        self.pseudo_index_ = drawn[pseudo]
        self.pseudo_labels_ = classes[p_cls]
        self.pseudo_confidence_ = p_conf
        self.pseudo_round_ = p_round
        self.added_per_class_ = np.bincount(p_cls, minlength=C)
        self.n_rounds_ = len(self.rounds_)
        return self

    def predict(self, X) -> np.ndarray:
        """Labels predicted by the final inner estimator."""
        check_is_fitted(self, "estimator_")
        return self.estimator_.predict(X)

    @available_if(lambda self: self.estimator is None or hasattr(self.estimator, "predict_proba"))
    def predict_proba(self, X) -> np.ndarray:
        """``predict_proba`` of the final inner estimator."""
        check_is_fitted(self, "estimator_")
        return self.estimator_.predict_proba(X)

    def decision_function(self, X) -> np.ndarray:
        """``decision_function`` of the final inner estimator."""
        check_is_fitted(self, "estimator_")
        return self.estimator_.decision_function(X)

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.input_tags.three_d_array = True
        return tags
