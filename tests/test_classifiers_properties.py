"""Properties of SAV / CALM on random problems (hypothesis)."""

from __future__ import annotations

import numpy as np
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import calm
from calm import _heads as H
from calm.classifiers import CALM, SAV
from tests.test_classifiers_reference import make_problem

SETTINGS = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])

problems = st.fixed_dictionaries(
    {
        "seed": st.integers(0, 2**31 - 1),
        "n_classes": st.integers(2, 5),
        "n_heads": st.integers(2, 9),
        "head_dim": st.integers(2, 6),
        "shots": st.integers(2, 4),
    }
)
calm_params = st.fixed_dictionaries(
    {
        "weighting": st.sampled_from(["class", "global"]),
        "normalization": st.sampled_from(["softmax", "power"]),
        "reliability": st.sampled_from(["in-sample", "leave-one-out"]),
        "tau_p": st.sampled_from([0.03, 0.3, 1.0]),
        "tau_w": st.sampled_from([0.1, 0.5, 2.0]),
    }
)


def _problem(p, noise=0.8):
    return make_problem(
        p["seed"], p["n_classes"], p["n_heads"], p["head_dim"], p["shots"], n_queries=15, noise=noise
    )


@SETTINGS
@given(p=problems, params=calm_params, frac=st.floats(0.05, 1.0), data=st.data())
def test_permuting_heads_permutes_weights(p, params, frac, data):
    # tau_p = 1 keeps margins positive on these problems, so reliabilities rarely tie
    X, y, Xq, _ = _problem(p, noise=0.3)
    params = {**params, "tau_p": 1.0, "k": frac, "scores": "paper"}
    perm = np.array(data.draw(st.permutations(range(p["n_heads"]))))
    a = CALM(**params).fit(X, y)
    b = CALM(**params).fit(X[:, perm], y)
    np.testing.assert_allclose(b.reliability_, a.reliability_[..., perm], atol=1e-12)
    # which of several equally reliable heads is kept depends on head order (lower index first)
    r = np.atleast_2d(a.reliability_)
    assume(all(len(np.unique(row)) == len(row) for row in r))
    np.testing.assert_allclose(b.weights_, a.weights_[:, perm], atol=1e-12)
    np.testing.assert_allclose(b.reliability_, a.reliability_[..., perm], atol=1e-12)
    np.testing.assert_array_equal(b.predict(Xq[:, perm]), a.predict(Xq))
    np.testing.assert_allclose(b.decision_function(Xq[:, perm]), a.decision_function(Xq), atol=1e-12)


@SETTINGS
@given(p=problems, k=st.integers(1, 9), tie=st.sampled_from(["index", "margin"]), data=st.data())
def test_permuting_heads_sav(p, k, tie, data):
    X, y, Xq, _ = _problem(p, noise=0.3)
    k = min(k, p["n_heads"])
    perm = np.array(data.draw(st.permutations(range(p["n_heads"]))))
    a = SAV(k=None, tie_break=tie).fit(X, y)
    b = SAV(k=None, tie_break=tie).fit(X[:, perm], y)
    np.testing.assert_array_equal(b.head_scores_, a.head_scores_[perm])
    np.testing.assert_array_equal(b.predict(Xq[:, perm]), a.predict(Xq))
    # with k < all heads only heads of distinct support accuracy are order-free
    a, b = SAV(k=k, tie_break=tie).fit(X, y), SAV(k=k, tie_break=tie).fit(X[:, perm], y)
    if len(np.unique(a.head_scores_)) == p["n_heads"]:
        np.testing.assert_array_equal(perm[b.heads_], a.heads_)


@SETTINGS
@given(p=problems, params=calm_params, k=st.integers(1, 9), data=st.data())
def test_renaming_labels_renames_predictions(p, params, k, data):
    X, y, Xq, _ = _problem(p)
    C = p["n_classes"]
    k = min(k, p["n_heads"])
    order_kept = [f"class-{i:02d}" for i in range(C)]  # sorts like the integer labels
    shuffled = data.draw(st.permutations([f"name-{i}" for i in range(C)]))
    for names in (np.array(order_kept), np.array(shuffled)):
        for est in (CALM(k=k, **params), SAV(k=k)):
            base = type(est)(**est.get_params()).fit(X, y)
            renamed = type(est)(**est.get_params()).fit(X, names[y])
            pred = renamed.predict(Xq)
            if names[0] == order_kept[0]:
                np.testing.assert_array_equal(pred, names[base.predict(Xq)])
            else:
                # a reordering of classes changes who wins an exact tie (lower class index) and
                # nothing else; exact ties are common (vote counts, posteriors saturated at 1.0)
                s = base.class_scores(Xq)
                clear = (s == s.max(axis=1, keepdims=True)).sum(axis=1) == 1
                np.testing.assert_array_equal(pred[clear], names[base.predict(Xq)][clear])


@SETTINGS
@given(p=problems, params=calm_params, k=st.integers(1, 9))
def test_weight_rows_sum_to_one_over_kept_heads(p, params, k):
    X, y, _, _ = _problem(p)
    k = min(k, p["n_heads"])
    clf = CALM(k=k, **params).fit(X, y)
    np.testing.assert_allclose(clf.weights_.sum(axis=1), 1.0, atol=1e-12)
    kept = np.zeros_like(clf.weights_, dtype=bool)
    rows = np.arange(p["n_classes"])[:, None]
    kept[rows, clf.heads_ if clf.heads_.ndim == 2 else clf.heads_[None, :]] = True
    assert (kept.sum(axis=1) == k).all()
    assert (clf.weights_[~kept] == 0).all()
    assert (clf.weights_ >= 0).all()
    if params["normalization"] == "softmax":
        assert (clf.weights_[kept] > 0).all()
    # the kept heads are the most reliable ones (per class for "class" weighting)
    r = np.broadcast_to(clf.reliability_, clf.weights_.shape)
    assert (r[kept].reshape(-1, k).min(axis=1) >= np.where(kept, -np.inf, r).max(axis=1)).all()


@SETTINGS
@given(p=problems, tau_p=st.sampled_from([0.03, 0.3, 1.0]), tau_w=st.sampled_from([0.1, 0.5, 2.0]))
def test_global_with_all_heads_and_equal_reliability_is_mean_posterior(p, tau_p, tau_w):
    X, y, Xq, _ = _problem(p)
    # every head sees a rotated copy of the same support features: cosines, margins and so
    # reliabilities are equal across heads, while queries differ per head
    rng = np.random.default_rng(p["seed"])
    d = p["head_dim"]
    rot = np.linalg.qr(rng.normal(size=(p["n_heads"], d, d)))[0]
    X = np.einsum("hij,nj->nhi", rot, X[:, 0])
    clf = CALM(k=None, weighting="global", tau_p=tau_p, tau_w=tau_w).fit(X, y)
    np.testing.assert_allclose(clf.reliability_, clf.reliability_[0], atol=1e-12)
    np.testing.assert_allclose(clf.weights_, 1.0 / p["n_heads"], atol=1e-12)
    post = H.head_posteriors(H.cosine_similarities(Xq, clf.centroids_), tau_p).numpy()
    np.testing.assert_allclose(clf.class_scores(Xq), post.mean(axis=1), atol=1e-12)


@SETTINGS
@given(
    p=problems,
    params=calm_params,
    k=st.one_of(st.none(), st.integers(1, 9), st.floats(0.05, 1.0)),
    tie=st.sampled_from(["index", "margin"]),
    dtype=st.sampled_from([np.float32, np.float64, np.float16]),
)
def test_save_load_round_trip(tmp_path_factory, p, params, k, tie, dtype):
    X, y, Xq, _ = _problem(p)
    if isinstance(k, int):
        k = min(k, p["n_heads"])
    path = tmp_path_factory.mktemp("rt") / "m.safetensors"
    for clf in (CALM(k=k, **params), SAV(k=k, tie_break=tie, tau_p=params["tau_p"])):
        clf.fit(X.astype(dtype), y)
        clf.save(path, metadata={"seed": p["seed"]})
        back = calm.load(path)
        assert back.metadata_ == {"seed": p["seed"]}
        np.testing.assert_array_equal(
            back.decision_function(Xq.astype(dtype)), clf.decision_function(Xq.astype(dtype))
        )
        np.testing.assert_array_equal(back.predict(Xq), clf.predict(Xq))
