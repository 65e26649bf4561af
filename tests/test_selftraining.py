"""calm.selftraining.SelfTraining on synthetic per-head features."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.base import clone
from sklearn.exceptions import NotFittedError
from sklearn.utils._param_validation import InvalidParameterError

from calm import CALM, SAV
from calm.selftraining import SelfTraining, balanced_picks, class_similarity, confidence_scores
from calm.selftraining.stopping import MAX_FOLDS, choose_rounds, cv_curve, guard_folds

torch.set_num_threads(1)

C, K, D = 4, 8, 16


def _problem(seed: int, n_pool: int = 300, n_test: int = 400, noise: float = 2.0, weights=None):
    """Gaussian classes around random per-head means; 1 labelled clip per class."""
    rng = np.random.default_rng(seed)
    mu = rng.normal(size=(C, K, D))

    def draw(y):
        return (mu[y] + noise * rng.normal(size=(len(y), K, D))).astype(np.float32)

    y_lab = np.array([f"c{i}" for i in range(C)])
    X_lab = draw(np.arange(C))
    p = None if weights is None else np.asarray(weights) / np.sum(weights)
    yu = rng.choice(C, size=n_pool, p=p)
    yt = rng.integers(0, C, n_test)
    names = np.array([f"c{i}" for i in range(C)])
    return X_lab, y_lab, draw(yu), names[yu], draw(yt), names[yt]


def test_improves_on_a_toy_problem_where_the_pool_fills_in_the_classes():
    gains, base_accs = [], []
    for seed in range(6):
        X, y, Xu, _, Xt, yt = _problem(seed)
        base = CALM(k=0.5).fit(X, y).score(Xt, yt)
        st = SelfTraining(CALM(k=0.5), rounds=5, per_round=5).fit(X, y, Xu).score(Xt, yt)
        gains.append(st - base)
        base_accs.append(base)
    assert np.mean(base_accs) < 0.9  # one noisy clip per class leaves room
    assert np.mean(gains) > 0.05
    assert min(gains) > -0.02


def test_each_class_gains_at_most_per_round_clips_per_round_even_from_a_lopsided_pool():
    X, y, Xu, yu, _, _ = _problem(1, n_pool=400, weights=[0.85, 0.05, 0.05, 0.05])
    st = SelfTraining(CALM(k=0.5), rounds=4, per_round=3).fit(X, y, Xu)
    per_round = np.array([r["added_per_class"] for r in st.rounds_])
    assert per_round.shape == (4, C)
    assert np.all(np.diff(np.vstack([np.zeros(C), per_round]), axis=0) <= 3)
    assert st.added_per_class_.max() <= 12
    assert st.added_per_class_.tolist() == per_round[-1].tolist()
    assert st.added_per_class_.sum() == len(st.pseudo_index_) == len(set(st.pseudo_index_.tolist()))
    counts = {c: int(np.sum(st.pseudo_labels_ == c)) for c in st.classes_}
    assert list(counts.values()) == st.added_per_class_.tolist()


def test_balanced_picks_take_the_most_confident_rows_of_each_class_ties_to_the_lower_row():
    pred = np.array([0, 0, 0, 1, 1, 2, 0])
    conf = np.array([0.5, 0.9, 0.5, 0.1, 0.2, 0.3, 0.9])
    eligible = np.array([True, True, True, True, True, True, False])
    picks = balanced_picks(pred, conf, np.array([2, 5, 0]), eligible)
    assert picks.tolist() == [1, 0, 4, 3]  # class 0: 0.9 then the 0.5 tie at row 0; class 2 quota 0


def test_confidence_scores_margin_and_probability():
    X, y, Xu, _, _, _ = _problem(2)
    clf = CALM(k=0.5).fit(X, y)
    s = clf.decision_function(Xu)
    pred, margin = confidence_scores(clf, Xu, "margin")
    top = np.sort(s, axis=1)
    np.testing.assert_array_equal(pred, np.argmax(s, axis=1))
    np.testing.assert_allclose(margin, top[:, -1] - top[:, -2], rtol=1e-6)
    _, prob = confidence_scores(clf, Xu, "probability")
    np.testing.assert_allclose(prob, clf.predict_proba(Xu).max(axis=1), rtol=1e-6)
    with pytest.raises(ValueError, match="confidence"):
        confidence_scores(clf, Xu, "entropy")


def test_two_classes_margin_from_scikit_learns_one_column_decision_function():
    X, y, Xu, yu, _, _ = _problem(3)
    two = np.isin(y, ["c0", "c1"])
    clf = CALM(k=0.5).fit(X[two], y[two])
    assert clf.decision_function(Xu).ndim == 1  # scikit-learn's binary convention
    scores = clf.class_scores(Xu)
    pred, margin = confidence_scores(clf, Xu, "margin")
    np.testing.assert_array_equal(pred, np.argmax(scores, axis=1))  # ties to the lower index too
    np.testing.assert_allclose(margin, np.abs(scores[:, 1] - scores[:, 0]), rtol=1e-6)
    pool = np.isin(yu, ["c0", "c1"])
    st = SelfTraining(CALM(k=0.5), rounds=2, per_round=3).fit(X[two], y[two], Xu[pool])
    assert list(st.added_per_class_) == [6, 6] and set(st.pseudo_labels_) == {"c0", "c1"}


def test_per_round_report_is_cumulative_and_the_set_only_grows_without_relabel():
    X, y, Xu, yu, _, _ = _problem(3)
    st = SelfTraining(CALM(k=0.5), rounds=3, per_round=2).fit(X, y, Xu)
    assert st.n_rounds_ == 3 and [r["round"] for r in st.rounds_] == [1, 2, 3]
    assert [r["n_pseudo"] for r in st.rounds_] == [8, 16, 24]
    assert [r["added"] for r in st.rounds_] == [8, 8, 8]
    assert st.pseudo_round_.tolist() == [1] * 8 + [2] * 8 + [3] * 8
    assert len(st.pseudo_confidence_) == 24 and np.all(st.pseudo_confidence_ >= 0)
    assert set(st.pseudo_labels_) <= set(st.classes_)


def test_relabel_rechooses_the_set_each_round_with_growing_quotas():
    X, y, Xu, _, _, _ = _problem(4)
    st = SelfTraining(CALM(k=0.5), rounds=3, per_round=2, relabel=True).fit(X, y, Xu)
    assert [r["n_pseudo"] for r in st.rounds_] == [8, 16, 24]
    assert st.added_per_class_.tolist() == [6] * C
    assert np.all(st.pseudo_round_ >= 1) and np.all(st.pseudo_round_ <= 3)


def test_stops_when_the_pool_is_used_up():
    X, y, Xu, _, _, _ = _problem(5, n_pool=6)
    st = SelfTraining(CALM(k=0.5), rounds=10, per_round=5).fit(X, y, Xu)
    assert len(st.pseudo_index_) == 6
    assert st.n_rounds_ < 10 and st.rounds_[-1]["n_pseudo"] == 6


def test_without_pool_or_rounds_it_is_the_inner_estimator():
    X, y, Xu, _, Xt, _ = _problem(6)
    ref = CALM(k=0.5).fit(X, y)
    for st in (
        SelfTraining(CALM(k=0.5), rounds=3).fit(X, y),
        SelfTraining(CALM(k=0.5), rounds=0).fit(X, y, Xu),
        SelfTraining(CALM(k=0.5), rounds=3, labelled_weight=3).fit(X, y, None),
    ):
        np.testing.assert_allclose(st.decision_function(Xt), ref.decision_function(Xt), rtol=1e-5, atol=1e-6)
        assert st.rounds_ == [] and len(st.pseudo_index_) == 0
        assert st.added_per_class_.tolist() == [0] * C


def test_labelled_weight_is_a_weighted_mean_in_the_centroids():
    X, y, Xu, _, _, _ = _problem(7)
    st = SelfTraining(CALM(k=0.5), rounds=1, per_round=3, labelled_weight=4).fit(X, y, Xu)
    for ci, c in enumerate(st.classes_):
        pseudo = Xu[st.pseudo_index_[st.pseudo_labels_ == c]].astype(np.float64)
        expected = (4 * X[y == c].astype(np.float64).sum(0) + pseudo.sum(0)) / (4 * 1 + len(pseudo))
        np.testing.assert_allclose(st.estimator_.centroids_[ci], expected, rtol=1e-4, atol=1e-5)


def test_fit_predict_contract():
    X, y, Xu, _, Xt, _ = _problem(8)
    est = SelfTraining(CALM(k=0.5), rounds=2, per_round=2)
    with pytest.raises(NotFittedError):
        est.predict(Xt)
    params = est.get_params(deep=True)
    assert params["estimator__k"] == 0.5 and params["rounds"] == 2
    assert est.fit(X, y, Xu) is est
    assert not hasattr(est.estimator, "centroids_")  # the given estimator is cloned, never fitted
    Xt_copy = Xt.copy()
    before = {k: np.copy(v) for k, v in vars(est).items() if isinstance(v, np.ndarray)}
    pred = est.predict(Xt)
    np.testing.assert_array_equal(pred, est.estimator_.predict(Xt))
    np.testing.assert_array_equal(est.predict_proba(Xt), est.estimator_.predict_proba(Xt))
    np.testing.assert_array_equal(Xt, Xt_copy)
    for k, v in before.items():
        np.testing.assert_array_equal(getattr(est, k), v)
    assert est.score(Xt, est.predict(Xt)) == 1.0
    assert clone(est).get_params()["per_round"] == 2
    assert not hasattr(clone(est), "estimator_")


@pytest.mark.parametrize(
    "params",
    [
        {"rounds": -1},
        {"per_round": 0},
        {"confidence": "entropy"},
        {"labelled_weight": 0},
        {"labelled_weight": "classes"},
        {"relabel": "no"},
        {"max_labelled": 0},
        {"spread": 0},
        {"guard": "loo"},
        {"guard": True},
    ],
)
def test_invalid_parameters_are_rejected_at_fit(params):
    X, y, Xu, _, _, _ = _problem(9)
    with pytest.raises(InvalidParameterError):
        SelfTraining(CALM(), **params).fit(X, y, Xu)


def test_bad_input_shapes():
    X, y, Xu, _, _, _ = _problem(10)
    with pytest.raises(ValueError, match="X_unlabelled rows have shape"):
        SelfTraining(CALM()).fit(X, y, Xu[:, :, :5])
    with pytest.raises(ValueError, match="samples"):
        SelfTraining(CALM()).fit(X, y[:2], Xu)


def test_sav_inner_and_torch_and_memmap_pools(tmp_path):
    X, y, Xu, _, Xt, yt = _problem(11)
    a = SelfTraining(SAV(k=4), rounds=2, per_round=2).fit(X, y, Xu)
    b = SelfTraining(SAV(k=4), rounds=2, per_round=2).fit(torch.from_numpy(X), y, torch.from_numpy(Xu))
    mm = np.lib.format.open_memmap(tmp_path / "pool.npy", mode="w+", dtype=np.float32, shape=Xu.shape)
    mm[:] = Xu
    mm.flush()
    c = SelfTraining(SAV(k=4), rounds=2, per_round=2).fit(X, y, np.load(tmp_path / "pool.npy", mmap_mode="r"))
    for other in (b, c):
        np.testing.assert_array_equal(a.pseudo_index_, other.pseudo_index_)
        np.testing.assert_array_equal(a.predict(Xt), other.predict(Xt))
    assert np.all(np.isin(a.predict(Xt), a.classes_))


def test_default_estimator_is_calm():
    X, y, Xu, _, _, _ = _problem(12)
    st = SelfTraining(rounds=1).fit(X, y, Xu)
    assert isinstance(st.estimator_, CALM)


def _uneven(seed: int):
    """The toy problem with 3 labelled clips of c0 and 1 of each other class."""
    X, y, Xu, yu, Xt, yt = _problem(seed)
    extra = X[:1] + 0.5 * np.random.default_rng(seed).normal(size=(2, K, D)).astype(np.float32)
    return np.concatenate([X, extra]), np.concatenate([y, ["c0", "c0"]]), Xu, yu, Xt, yt


def test_labelled_weight_shots_counts_a_labelled_clip_as_often_as_its_class_has_labelled_clips():
    X, y, Xu, _, _, _ = _uneven(13)
    st = SelfTraining(CALM(k=0.5), rounds=1, per_round=3, labelled_weight="shots").fit(X, y, Xu)
    for ci, c in enumerate(st.classes_):
        n = int(np.sum(y == c))
        pseudo = Xu[st.pseudo_index_[st.pseudo_labels_ == c]].astype(np.float64)
        expected = (n * X[y == c].astype(np.float64).sum(0) + pseudo.sum(0)) / (n * n + len(pseudo))
        np.testing.assert_allclose(st.estimator_.centroids_[ci], expected, rtol=1e-4, atol=1e-5)
    plain = SelfTraining(CALM(k=0.5), rounds=1, per_round=3, labelled_weight=1).fit(X, y, Xu)
    assert not np.allclose(plain.estimator_.centroids_[0], st.estimator_.centroids_[0])


def test_max_labelled_leaves_classes_with_more_labelled_clips_without_pseudo_labels():
    X, y, Xu, _, Xt, _ = _uneven(14)
    st = SelfTraining(CALM(k=0.5), rounds=2, per_round=2, max_labelled=2).fit(X, y, Xu)
    assert st.added_per_class_.tolist() == [0, 4, 4, 4]  # c0 has 3 labelled clips
    assert [r["added_per_class"] for r in st.rounds_] == [[0, 2, 2, 2], [0, 4, 4, 4]]
    relabel = SelfTraining(CALM(k=0.5), rounds=2, per_round=2, relabel=True, max_labelled=2).fit(X, y, Xu)
    assert relabel.added_per_class_.tolist() == [0, 4, 4, 4]
    X2, y2 = np.concatenate([X[y != "c0"], X[y != "c0"] + 0.1]), np.concatenate([y[y != "c0"]] * 2)
    alone = SelfTraining(CALM(k=0.5), rounds=3, max_labelled=1).fit(X2, y2, Xu)  # every class has 2
    assert alone.n_rounds_ == 0 and len(alone.pseudo_index_) == 0
    np.testing.assert_allclose(
        alone.decision_function(Xt), CALM(k=0.5).fit(X2, y2).decision_function(Xt), rtol=1e-5, atol=1e-6
    )


def test_balanced_picks_with_spread_take_the_least_similar_of_the_most_confident_candidates():
    pred = np.array([0, 0, 0, 0, 1, 1, 1])
    conf = np.array([0.9, 0.8, 0.7, 0.1, 0.9, 0.8, 0.2])
    near = np.array([0.5, 0.9, 0.1, 0.0, 0.3, 0.3, 0.0])
    eligible = np.ones(7, dtype=bool)
    # quota 1, spread 2: class 0's candidates are rows 0, 1 (most confident), row 0 the less similar;
    # class 1's are 4, 5, equally similar: the lower row. Rows 3 and 6 are the least similar of all
    # but not among the most confident, so they are not taken.
    assert balanced_picks(pred, conf, np.array([1, 1]), eligible, near, spread=2).tolist() == [0, 4]
    assert balanced_picks(pred, conf, np.array([1, 1]), eligible, near, spread=1).tolist() == [0, 4]
    # spread 3: class 0's candidates 0, 1, 2 -> row 2; class 1 has only 3 rows, all candidates -> row 6
    assert balanced_picks(pred, conf, np.array([1, 1]), eligible, near, spread=3).tolist() == [2, 6]
    # quota 2, spread 2: all 4 rows of class 0 are candidates, least similar first; class 1 quota 0
    assert balanced_picks(pred, conf, np.array([2, 0]), eligible, near, spread=2).tolist() == [3, 2]


def test_class_similarity_is_the_mean_over_heads_of_the_cosine_to_the_unit_feature_mean():
    X, y, Xu, _, _, _ = _problem(15)
    pred = np.arange(len(Xu)) % C
    y_idx = np.arange(C)
    unit = X / np.linalg.norm(X, axis=-1, keepdims=True)
    mu = unit / np.linalg.norm(unit, axis=-1, keepdims=True)  # one clip a class: its own unit vector
    xu = Xu / np.linalg.norm(Xu, axis=-1, keepdims=True)
    expected = np.einsum("nkd,nkd->nk", xu, mu[pred]).mean(axis=1)
    np.testing.assert_allclose(class_similarity(Xu, X, y_idx, pred, C), expected, rtol=1e-4, atol=1e-5)


def test_spread_adds_clips_farther_from_the_class_than_the_most_confident_ones():
    X, y, Xu, yu, _, _ = _problem(16)
    top = SelfTraining(CALM(k=0.5), rounds=1, per_round=5).fit(X, y, Xu)
    far = SelfTraining(CALM(k=0.5), rounds=1, per_round=5, spread=3).fit(X, y, Xu)
    assert far.added_per_class_.tolist() == top.added_per_class_.tolist() == [5] * C
    first = CALM(k=0.5).fit(X, y)
    pred, _ = confidence_scores(first, Xu, "margin")
    near = class_similarity(Xu, X, np.arange(C), pred, C)
    assert near[far.pseudo_index_].mean() < near[top.pseudo_index_].mean()
    assert not set(far.pseudo_index_.tolist()) == set(top.pseudo_index_.tolist())


def test_default_schedule():
    st = SelfTraining()
    assert (st.rounds, st.per_round, st.confidence, st.relabel) == (5, 5, "margin", False)
    assert (st.labelled_weight, st.max_labelled, st.spread) == ("shots", None, 1)
    assert (st.pool_per_class, st.random_state) == (30, 0)
    X, y, Xu, _, _, _ = _problem(17, n_pool=300)
    X3, y3 = np.concatenate([X, X + 0.1, X - 0.1]), np.concatenate([y, y, y])
    new = SelfTraining(CALM(k=0.5)).fit(X3, y3, Xu)
    assert len(new.pool_index_) == 30 * C and new.n_rounds_ == 5
    old = SelfTraining(CALM(k=0.5), rounds=3, labelled_weight=1, pool_per_class=None).fit(
        X3, y3, Xu
    )  # the schedule before 2026-12-02
    assert len(old.pool_index_) == 300 and old.added_per_class_.tolist() == [15] * C
    assert not np.allclose(old.estimator_.centroids_, new.estimator_.centroids_)


def test_pool_per_class_self_trains_on_a_seeded_draw_of_the_pool():
    X, y, Xu, _, Xt, _ = _problem(18, n_pool=300)
    a = SelfTraining(CALM(k=0.5), pool_per_class=20, random_state=3).fit(X, y, Xu)
    assert len(a.pool_index_) == 20 * C and np.all(np.diff(a.pool_index_) > 0)
    assert set(a.pseudo_index_.tolist()) <= set(a.pool_index_.tolist())
    b = SelfTraining(CALM(k=0.5), pool_per_class=20, random_state=3).fit(X, y, Xu)
    np.testing.assert_array_equal(a.pool_index_, b.pool_index_)
    np.testing.assert_array_equal(a.pseudo_index_, b.pseudo_index_)
    c = SelfTraining(CALM(k=0.5), pool_per_class=20, random_state=4).fit(X, y, Xu)
    assert not np.array_equal(a.pool_index_, c.pool_index_)
    # the same as self-training on the drawn rows passed as the pool
    d = SelfTraining(CALM(k=0.5), pool_per_class=None).fit(X, y, Xu[a.pool_index_])
    np.testing.assert_array_equal(a.pool_index_[d.pseudo_index_], a.pseudo_index_)
    np.testing.assert_allclose(a.decision_function(Xt), d.decision_function(Xt), rtol=1e-5, atol=1e-6)
    whole = SelfTraining(CALM(k=0.5), pool_per_class=None).fit(X, y, Xu)
    assert whole.pool_index_.tolist() == list(range(300))
    small = SelfTraining(CALM(k=0.5), pool_per_class=100).fit(X, y, Xu)  # 400 > 300 rows: all of them
    assert small.pool_index_.tolist() == list(range(300))


def _shifted_pool(seed: int):
    """3 labelled clips a class; the pool comes from a shifted distribution (every clip like class 0),
    so the balanced picks give every other class wrong pseudo-labels."""
    rng = np.random.default_rng(seed)
    mu = rng.normal(size=(C, K, D))

    def draw(y):
        return (mu[y] + 2.0 * rng.normal(size=(len(y), K, D))).astype(np.float32)

    names = np.array([f"c{i}" for i in range(C)])
    y_lab = np.repeat(np.arange(C), 3)
    X_lab = draw(y_lab)
    Xu = (mu[0] + 2.0 * rng.normal(size=(200, K, D))).astype(np.float32)
    yt = rng.integers(0, C, 400)
    return X_lab, names[y_lab], Xu, draw(yt), names[yt]


@pytest.mark.parametrize("seed", [1, 4])
def test_guard_stops_when_pseudo_labels_are_systematically_wrong_and_leaves_the_inner_estimator(seed):
    X, y, Xu, Xt, yt = _shifted_pool(seed)
    base = CALM(k=0.5).fit(X, y)
    guarded = SelfTraining(CALM(k=0.5)).fit(X, y, Xu)
    unguarded = SelfTraining(CALM(k=0.5), guard=None).fit(X, y, Xu)
    g = guarded.guard_
    assert g["guard"] == "cv" and g["estimable"] and g["folds"] == 3
    assert len(g["cv_accuracy"]) == 6 and g["cv_accuracy"][-1] < g["cv_accuracy"][0]
    assert g["rounds_allowed"] == 0 and guarded.n_rounds_ == 0 and len(guarded.pseudo_index_) == 0
    np.testing.assert_array_equal(guarded.decision_function(Xt), base.decision_function(Xt))
    assert unguarded.guard_ is None and unguarded.n_rounds_ == 5
    assert unguarded.score(Xt, yt) < base.score(Xt, yt) - 0.05  # what the guard avoided


def test_guard_lets_helpful_self_training_run_as_before():
    X, y, Xu, _, Xt, _ = _problem(21, n_pool=200)
    X3, y3 = np.concatenate([X, X + 0.3, X - 0.3]), np.concatenate([y, y, y])
    guarded = SelfTraining(CALM(k=0.5)).fit(X3, y3, Xu)
    unguarded = SelfTraining(CALM(k=0.5), guard=None).fit(X3, y3, Xu)
    assert guarded.guard_["rounds_allowed"] == 5 and guarded.n_rounds_ == 5
    assert guarded.guard_["cv_accuracy"][-1] >= guarded.guard_["cv_accuracy"][0]
    np.testing.assert_array_equal(guarded.pseudo_index_, unguarded.pseudo_index_)
    np.testing.assert_array_equal(guarded.decision_function(Xt), unguarded.decision_function(Xt))


def test_guard_none_is_the_schedule_before_the_guard_bit_for_bit():
    # pseudo_index_ of the SelfTraining before the guard (commit f34bbc3, whose CALM was the paper's)
    X, y, Xu, _, _, _ = _problem(21, n_pool=200)
    X3, y3 = np.concatenate([X, X + 0.3, X - 0.3]), np.concatenate([y, y, y])
    st = SelfTraining(CALM(k=0.5, scores="paper"), guard=None).fit(X3, y3, Xu)
    assert st.pseudo_index_[:20].tolist() == [
        36,
        177,
        43,
        157,
        141,
        105,
        187,
        145,
        68,
        192,
        142,
        168,
        165,
        6,
        17,
        149,
        75,
        41,
        116,
        72,
    ]
    assert st.pseudo_index_[-5:].tolist() == [35, 91, 87, 2, 129]
    assert len(st.pseudo_index_) == 100 and st.n_rounds_ == 5 and st.guard_ is None


def test_guard_cannot_estimate_at_one_shot_and_runs_the_schedule():
    X, y, Xu, _, Xt, _ = _problem(3)
    guarded = SelfTraining(CALM(k=0.5)).fit(X, y, Xu)
    assert guarded.guard_ == {
        "guard": "cv",
        "estimable": False,
        "folds": 0,
        "cv_accuracy": None,
        "rounds_allowed": 5,
    }
    unguarded = SelfTraining(CALM(k=0.5), guard=None).fit(X, y, Xu)
    np.testing.assert_array_equal(guarded.decision_function(Xt), unguarded.decision_function(Xt))
    assert SelfTraining(CALM(k=0.5), rounds=0).fit(X, y, Xu).guard_ is None
    assert SelfTraining(CALM(k=0.5)).fit(X, y).guard_ is None


def test_guard_folds_hold_out_one_clip_a_class_of_the_classes_with_two_or_more():
    y = np.array(["a", "b", "a", "c", "a", "b"] + ["d"] * 8)
    folds = guard_folds(y)
    assert len(folds) == MAX_FOLDS
    assert [np.flatnonzero(f).tolist() for f in folds[:3]] == [[0, 1, 6], [2, 5, 7], [4, 8]]
    assert all(not f[3] for f in folds)  # "c" has one clip: never held out
    assert guard_folds(np.array(["a", "b", "c"])) == []


def test_cv_curve_pads_a_run_that_stops_early_and_choose_rounds_is_all_or_none():
    y = np.array(["a", "a", "b", "b"])
    calls = []

    def run(train, rounds):
        calls.append((train.tolist(), rounds))
        held = y[~train]
        return [held, held[::-1]]  # right after round 0, swapped after round 1, then it stops

    curve = cv_curve(y, 3, run)
    assert calls == [([False, True, False, True], 3), ([True, False, True, False], 3)]
    assert curve == [1.0, 0.0, 0.0, 0.0]
    assert choose_rounds(curve) == 0
    assert choose_rounds([0.5, 0.4, 0.6]) == 2 and choose_rounds([0.5, 0.6, 0.5]) == 2
    assert choose_rounds([0.5, 0.6, 0.4]) == 0
    assert cv_curve(np.array(["a", "b"]), 3, run) is None
