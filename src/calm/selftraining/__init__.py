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
``round``, ``added``, ``n_pseudo``, ``added_per_class``, ``mean_confidence``), ``n_rounds_``,
``guard_`` (None without a guard, rounds or pool; else ``guard``, ``estimable``, ``folds``,
``cv_accuracy``: the support set's cross-validated accuracy after 0..``rounds`` rounds, and
``rounds_allowed``).

Guard (``guard="cv"``, the default): before self-training, `calm.selftraining.stopping` self-trains
once per fold of the support set without the fold's labelled clips and scores them after every
round; self-training then runs the whole schedule when the cross-validated accuracy after the
last round is at least that of the support set alone, else no round. It costs about one
self-training fit per fold (at most 5).
"""

from __future__ import annotations

from numbers import Integral
from typing import Any, ClassVar, NamedTuple

import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin, MetaEstimatorMixin, _fit_context, clone
from sklearn.utils._param_validation import HasMethods, Interval, StrOptions
from sklearn.utils.metaestimators import available_if
from sklearn.utils.validation import check_is_fitted

from calm.selftraining.picks import _n_rows, _rows, balanced_picks, class_similarity, confidence_scores
from calm.selftraining.stopping import choose_rounds, cv_curve, guard_folds

__all__ = ["SelfTraining", "balanced_picks", "class_similarity", "confidence_scores"]


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


class _Run(NamedTuple):
    """What one self-training run leaves: the final inner estimator, its classes, the drawn pool rows,
    the pseudo-labelled rows of the drawn pool (their class index, confidence and round), the rounds."""

    est: Any
    classes: np.ndarray
    drawn: np.ndarray
    pseudo: np.ndarray
    p_cls: np.ndarray
    p_conf: np.ndarray
    p_round: np.ndarray
    rounds: list[dict]


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
    guard : "cv" or None
        "cv": run only as many rounds as cross-validation on the support set allows (each fold
        self-trained without its held-out clips; `calm.selftraining.stopping`); nothing to hold out
        (one clip in every class): all ``rounds``. None: all ``rounds`` (the schedule before the
        guard).

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
        "guard": [StrOptions({"cv"}), None],
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
        guard: str | None = "cv",
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
        self.guard = guard

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
        inner estimator alone) for as many rounds as the guard allows. Returns self."""
        X_lab = _rows(X, np.arange(_n_rows(X)))
        y_lab = np.asarray(y)
        if y_lab.ndim != 1 or len(y_lab) != len(X_lab):
            raise ValueError(f"X has {len(X_lab)} samples but y has shape {y_lab.shape}")
        self.guard_ = self._guard(X_lab, y_lab, X_unlabelled)
        rounds = self.rounds if self.guard_ is None else self.guard_["rounds_allowed"]
        s = self._train(X_lab, y_lab, X_unlabelled, rounds)
        self.estimator_ = s.est
        self.classes_ = s.classes
        self.pool_index_ = s.drawn
        self.pseudo_index_ = s.drawn[s.pseudo]
        self.pseudo_labels_ = s.classes[s.p_cls]
        self.pseudo_confidence_ = s.p_conf
        self.pseudo_round_ = s.p_round
        self.added_per_class_ = np.bincount(s.p_cls, minlength=len(s.classes))
        self.rounds_ = s.rounds
        self.n_rounds_ = len(self.rounds_)
        return self

    def _guard(self, X_lab: np.ndarray, y_lab: np.ndarray, X_unlabelled) -> dict | None:
        """``guard_``: the guard's cross-validated accuracy after each round and the rounds it allows
        (`calm.selftraining.stopping`); None without a guard, rounds or pool."""
        if self.guard is None or not self.rounds or not _pool_rows(X_unlabelled, X_lab):
            return None

        def run(train: np.ndarray, rounds: int) -> list[np.ndarray]:
            preds: list[np.ndarray] = []
            held_out = X_lab[~train]
            self._train(
                X_lab[train], y_lab[train], X_unlabelled, rounds, lambda e: preds.append(e.predict(held_out))
            )
            return preds

        curve = cv_curve(y_lab, self.rounds, run)
        return {
            "guard": self.guard,
            "estimable": curve is not None,
            "folds": len(guard_folds(y_lab)),
            "cv_accuracy": curve,
            "rounds_allowed": self.rounds if curve is None else choose_rounds(curve),
        }

    def _train(self, X_lab: np.ndarray, y_lab: np.ndarray, X_unlabelled, rounds: int, watch=None) -> _Run:
        """Self-training for at most ``rounds`` rounds; ``watch(estimator)`` sees the inner estimator
        after round 0 and after every refit. Returns the state ``fit`` turns into attributes."""
        est = self._inner().fit(X_lab, y_lab)
        if watch is not None:
            watch(est)
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
        report = []
        for r in range(1, rounds + 1 if m else 1):
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
            if watch is not None:
                watch(est)
            report.append(_round_report(r, added, p_cls, p_conf, C))
        return _Run(est, classes, drawn, pseudo, p_cls, p_conf, p_round, report)

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
