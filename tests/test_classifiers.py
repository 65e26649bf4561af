"""SAV / CALM: each equation on hand-checkable examples, the scikit-learn API, input errors and
saved files."""

from __future__ import annotations

import json
import math
import warnings

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.numpy import load_file, save_file
from sklearn.base import clone
from sklearn.model_selection import cross_val_score

import calm
from calm import _heads as H
from calm.classifiers import CALM, SAV
from tests.helpers import readonly_float16_map
from tests.test_classifiers_reference import make_problem

# ----------------------------------------------------------------------------------------------
# each equation by hand


def test_eq1_centroids():
    X = np.array([[[1.0, 0.0]], [[3.0, 0.0]], [[0.0, 2.0]]])  # 3 clips, 1 head, d = 2
    mu = H.class_centroids(X, [0, 0, 1], 2)
    np.testing.assert_allclose(mu.numpy(), [[[2.0, 0.0]], [[0.0, 2.0]]])
    with pytest.raises(ValueError, match="at least one clip"):
        H.class_centroids(X, [0, 0, 0], 2)


def test_eq2_cosine():
    X = np.array([[[1.0, 1.0]]])
    mu = np.array([[[2.0, 0.0]], [[0.0, -3.0]], [[0.0, 0.0]]])
    s = H.cosine_similarities(X, mu)
    assert s.shape == (1, 1, 3)
    np.testing.assert_allclose(
        s.numpy()[0, 0], [1 / math.sqrt(2), -1 / math.sqrt(2), 0.0]
    )  # zero centroid: 0


def test_eq3_head_prediction_ties_to_lower_class():
    s = torch.tensor([[[0.1, 0.5, 0.5], [0.9, 0.2, 0.9]]])
    assert H.head_predictions(s).tolist() == [[1, 0]]


def test_eq5_posterior():
    p = H.head_posteriors(torch.tensor([[[0.0, math.log(3.0)]]], dtype=torch.float64), tau_p=1.0)
    np.testing.assert_allclose(p.numpy()[0, 0], [0.25, 0.75])
    p = H.head_posteriors(torch.tensor([[[0.0, 0.03 * math.log(3.0)]]], dtype=torch.float64), tau_p=0.03)
    np.testing.assert_allclose(p.numpy()[0, 0], [0.25, 0.75])
    with pytest.raises(ValueError, match="tau_p"):
        H.head_posteriors(torch.zeros(1, 1, 2), tau_p=0.0)


def test_eq6_clamped_margin():
    p = torch.tensor([[[0.5, 0.3, 0.2]], [[0.5, 0.3, 0.2]], [[0.1, 0.1, 0.8]]], dtype=torch.float64)
    m = H.clamped_margins(p, [0, 1, 2])
    np.testing.assert_allclose(m.numpy()[:, 0], [0.2, 0.0, 0.7])  # wrong head -> clamped to 0


def test_eq7_and_eq11_reliability():
    m = torch.tensor([[0.2, 0.0], [0.4, 1.0], [0.6, 0.5]], dtype=torch.float64)
    np.testing.assert_allclose(H.global_reliability(m).numpy(), [0.4, 0.5])
    np.testing.assert_allclose(H.class_reliability(m, [0, 0, 1], 2).numpy(), [[0.3, 0.5], [0.6, 0.5]])


def test_eq8_eq12_softmax_weights_top_k():
    r = torch.tensor([0.5, 0.5 + math.log(3.0), 0.1], dtype=torch.float64)
    np.testing.assert_allclose(H.head_weights(r, 2, tau_w=1.0).numpy(), [0.25, 0.75, 0.0])
    # class-conditional: each row its own top-k; ties keep the lower head index
    r2 = torch.tensor([[0.2, 0.2, 0.2], [0.0, 0.9, 0.9]], dtype=torch.float64)
    np.testing.assert_allclose(H.head_weights(r2, 2, tau_w=0.5).numpy(), [[0.5, 0.5, 0.0], [0.0, 0.5, 0.5]])


def test_power_normalization():
    r = torch.tensor([0.2, 0.6, 0.1], dtype=torch.float64)
    np.testing.assert_allclose(H.head_weights(r, 2, 0.5, "power").numpy(), [0.1, 0.9, 0.0])
    zero = torch.zeros(4, dtype=torch.float64)
    np.testing.assert_allclose(H.head_weights(zero, 2, 0.5, "power").numpy(), [0.5, 0.5, 0.0, 0.0])
    with pytest.raises(ValueError, match="normalization"):
        H.head_weights(r, 2, 0.5, "l1")


def test_eq9_eq13_weighted_scores_and_eq4_votes():
    p = torch.tensor([[[0.9, 0.1], [0.4, 0.6]]], dtype=torch.float64)  # 1 query, 2 heads, 2 classes
    w = torch.tensor([[1.0, 0.0], [0.5, 0.5]], dtype=torch.float64)  # (C, K)
    np.testing.assert_allclose(H.weighted_scores(p, w).numpy(), [[0.9, 0.35]])
    np.testing.assert_allclose(H.weighted_scores(p, torch.tensor([0.5, 0.5])).numpy(), [[0.65, 0.35]])
    assert H.vote_counts([[2, 0, 2], [1, 1, 0]], 3).tolist() == [[1, 0, 2], [1, 2, 0]]


def test_resolve_k():
    assert H.resolve_k(None, 5) == 5
    assert H.resolve_k(3, 5) == 3
    assert H.resolve_k(np.int64(2), 5) == 2
    assert H.resolve_k(0.5, 5) == 3  # 2.5 rounds up
    assert H.resolve_k(0.3, 5) == 2  # 1.5 rounds up
    assert H.resolve_k(0.01, 5) == 1
    assert H.resolve_k(1.0, 5) == 5
    for bad in (0, 6, 0.0, 1.5, -0.2, True, "3"):
        with pytest.raises(ValueError):
            H.resolve_k(bad, 5)


def _two_head_problem():
    """Head 0 separates the classes perfectly (orthogonal features), head 1 is identical for all."""
    X = np.array(
        [
            [[1.0, 0.0], [1.0, 1.0]],
            [[1.0, 0.0], [1.0, 1.0]],
            [[0.0, 1.0], [1.0, 1.0]],
            [[0.0, 1.0], [1.0, 1.0]],
        ]
    )
    return X, np.array(["a", "a", "b", "b"])


def test_calm_end_to_end_by_hand():
    X, y = _two_head_problem()
    clf = CALM(k=None, tau_p=1.0, tau_w=1.0, scores="paper").fit(X, y)
    # head 0: cos own 1, other 0 -> p_own = e / (e + 1), margin (e - 1) / (e + 1); head 1: uniform, margin 0
    m = (math.e - 1) / (math.e + 1)
    np.testing.assert_allclose(clf.reliability_, [[m, 0.0], [m, 0.0]], atol=1e-12)
    w0 = math.exp(m) / (math.exp(m) + 1)
    np.testing.assert_allclose(clf.weights_, [[w0, 1 - w0], [w0, 1 - w0]], atol=1e-12)
    # a query equal to class "a" on head 0: score_a = w0 * e / (e + 1) + (1 - w0) * 0.5
    q = X[:1]
    pa = math.e / (math.e + 1)
    np.testing.assert_allclose(clf.class_scores(q), [[w0 * pa + (1 - w0) / 2, w0 * (1 - pa) + (1 - w0) / 2]])
    assert clf.decision_function(q).shape == (1,)  # binary: classes_[1] minus classes_[0]
    np.testing.assert_allclose(clf.predict_proba(q).sum(), 1.0)
    assert clf.predict(q).tolist() == ["a"]
    assert clf.heads_.tolist() == [[0, 1], [0, 1]]
    one = CALM(k=1, tau_p=1.0, scores="paper").fit(X, y)
    np.testing.assert_allclose(one.weights_, [[1.0, 0.0], [1.0, 0.0]])
    glob = CALM(k=1, weighting="global", tau_p=1.0).fit(X, y)
    np.testing.assert_allclose(glob.reliability_, [m, 0.0], atol=1e-12)
    assert glob.heads_.tolist() == [0]


def test_leave_one_out_by_hand():
    # class a: clips [1, 0] and [1, 1]; class b: [0, 1] and [-1, 1]; one head
    X = np.array([[[1.0, 0.0]], [[1.0, 1.0]], [[0.0, 1.0]], [[-1.0, 1.0]]])
    y = np.array([0, 0, 1, 1])
    clf = CALM(k=None, tau_p=1.0, reliability="leave-one-out", scores="paper").fit(X, y)
    mu_b = np.array([-0.5, 1.0])

    def margin(h, own, other):
        s_own, s_other = H.cosine_similarities(np.array([[h]]), np.array([[own], [other]])).numpy()[0, 0]
        return max(0.0, math.tanh((s_own - s_other) / 2))  # two-class softmax margin, tau_p = 1

    # the first clip of class a is compared with the other clip of a only, i.e. [1, 1]
    expected_a = (margin([1.0, 0.0], [1.0, 1.0], mu_b) + margin([1.0, 1.0], [1.0, 0.0], mu_b)) / 2
    np.testing.assert_allclose(clf.reliability_[0, 0], expected_a, atol=1e-12)
    with pytest.warns(UserWarning, match="one clip"):
        CALM(k=None, reliability="leave-one-out").fit(X[1:], y[1:])


def test_sav_by_hand_and_margin_tie_break():
    # both heads 100 % right on the support set; head 1 separates with a much larger margin
    X = np.array(
        [
            [[1.0, 0.9], [1.0, 0.0]],
            [[0.9, 1.0], [0.0, 1.0]],
        ]
    )
    y = ["a", "b"]
    index = SAV(k=1).fit(X, y)
    margin = SAV(k=1, tie_break="margin").fit(X, y)
    np.testing.assert_allclose(index.head_scores_, [1.0, 1.0])
    assert index.heads_.tolist() == [0]
    assert margin.heads_.tolist() == [1]
    assert margin.head_margins_[1] > margin.head_margins_[0]
    # a query on which the two heads disagree: 1 vote each -> the lower class index wins
    both = SAV(k=2).fit(X, y)
    q = np.array([[[1.0, 0.5], [0.0, 1.0]]])
    assert both.class_scores(q).tolist() == [[1, 1]] and both.decision_function(q).tolist() == [0]
    assert both.predict(q).tolist() == ["a"]
    np.testing.assert_allclose(both.predict_proba(q), [[0.5, 0.5]])


def test_calm_score_tie_goes_to_lower_class():
    X, y = _two_head_problem()
    clf = CALM(k=None).fit(X, y)
    q = np.array([[[1.0, 1.0], [1.0, 1.0]]])  # equidistant from both classes on every head
    s = clf.class_scores(q)
    assert s[0, 0] == s[0, 1]
    assert clf.predict(q).tolist() == ["a"]


# ----------------------------------------------------------------------------------------------
# API: attributes, dtypes, chunks, scikit-learn


def test_attributes_and_shapes():
    X, y, Xq, yq = make_problem(0, n_classes=4, n_heads=7, head_dim=5, shots=3)
    c = CALM(k=3).fit(X, y)
    assert c.centroids_.shape == (4, 7, 5)
    assert c.reliability_.shape == c.weights_.shape == (4, 7)
    assert c.heads_.shape == (4, 3)
    assert c.classes_.tolist() == [0, 1, 2, 3]
    assert c.class_counts_.tolist() == [3, 3, 3, 3]
    assert (c.n_heads_, c.head_dim_, c.k_) == (7, 5, 3)
    g = CALM(k=0.5, weighting="global").fit(X, y)
    assert g.reliability_.shape == (7,) and g.weights_.shape == (4, 7) and g.heads_.shape == (4,)
    assert (g.weights_ == g.weights_[0]).all()
    s = SAV(k=2).fit(X, y)
    assert s.head_scores_.shape == (7,) and s.heads_.shape == (2,)
    assert s.decision_function(Xq).sum(axis=1).tolist() == [2] * len(Xq)
    assert 0.0 <= s.score(Xq, yq) <= 1.0
    p = c.predict_proba(Xq)
    np.testing.assert_allclose(p.sum(axis=1), 1.0, rtol=1e-6)


def test_half_precision_accumulates_in_float32():
    X, y, Xq, _ = make_problem(3, shots=4)
    X16 = X.astype(np.float16)
    a = CALM(k=3).fit(X16, y)
    b = CALM(k=3).fit(X16.astype(np.float32), y)
    assert a.centroids_.dtype == np.float32
    np.testing.assert_array_equal(a.centroids_, b.centroids_)
    np.testing.assert_array_equal(a.weights_, b.weights_)
    q16 = Xq.astype(np.float16)
    np.testing.assert_array_equal(a.decision_function(q16), b.decision_function(q16.astype(np.float32)))
    bf = torch.from_numpy(X).to(torch.bfloat16)
    c = CALM(k=3).fit(bf, y)
    d = CALM(k=3).fit(bf.float().numpy(), y)
    np.testing.assert_array_equal(c.weights_, d.weights_)
    # a float16 sum of many clips would overflow (65504); float32 accumulation does not
    big = np.full((40, 1, 2), 60000.0, dtype=np.float16)
    assert np.isfinite(CALM(k=None).fit(big, [0, 1] * 20).centroids_).all()


def test_torch_input_and_labels():
    X, y, Xq, _ = make_problem(4)
    a = CALM(k=3).fit(torch.from_numpy(X), torch.from_numpy(y))
    b = CALM(k=3).fit(X, y)
    np.testing.assert_array_equal(a.predict(torch.from_numpy(Xq)), b.predict(Xq))
    names = np.array(["dog", "cat", "rain", "bird"])
    c = CALM(k=3).fit(X, list(names[y]))
    assert c.classes_.tolist() == sorted(names.tolist())


def test_chunking_does_not_change_results(tmp_path):
    X, y, Xq, _ = make_problem(5, shots=5, n_queries=37)
    ref = CALM(k=3).fit(X, y)
    for chunk in (1, 4, 1000):
        clf = CALM(k=3, chunk_size=chunk).fit(X, y)
        np.testing.assert_allclose(clf.weights_, ref.weights_, atol=1e-12)
        np.testing.assert_array_equal(clf.predict(Xq), ref.predict(Xq))
        np.testing.assert_allclose(clf.decision_function(Xq), ref.decision_function(Xq), atol=1e-12)
    # a read-only float16 memory map, as a feature store provides
    ro = readonly_float16_map(tmp_path / "q.f16", Xq)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = CALM(k=3, chunk_size=8).fit(X, y).predict(ro)
    np.testing.assert_array_equal(got, CALM(k=3).fit(X, y).predict(np.asarray(ro, dtype=np.float64)))


def test_sklearn_clone_params_and_cross_val_score():
    clf = CALM(k=3, tau_p=0.1, weighting="global")
    assert clf.get_params()["tau_p"] == 0.1
    c2 = clone(clf).set_params(tau_w=2.0)
    assert c2.get_params()["tau_w"] == 2.0 and clf.tau_w == 0.5
    X, y, _, _ = make_problem(6, shots=6)
    scores3d = cross_val_score(CALM(k=3), X, y, cv=3)
    flat = X.reshape(len(X), -1)
    scores2d = cross_val_score(CALM(k=3, n_heads=7), flat, y, cv=3)
    np.testing.assert_allclose(scores3d, scores2d)
    assert cross_val_score(SAV(k=2, n_heads=7), flat, y, cv=3).shape == (3,)
    fitted = CALM(k=3).fit(X, y)  # after fit, flattened queries are accepted as well
    np.testing.assert_array_equal(fitted.predict(flat), fitted.predict(X))


def test_classes_parameter_fixes_order():
    X, y, Xq, _ = make_problem(8)
    names = np.array(["w", "x", "y", "z"])[y]
    clf = CALM(k=3, classes=["z", "y", "x", "w"]).fit(X, names)
    assert clf.classes_.tolist() == ["z", "y", "x", "w"]
    ref = CALM(k=3).fit(X, names)
    np.testing.assert_allclose(clf.weights_, ref.weights_[::-1])
    np.testing.assert_array_equal(clf.predict(Xq), ref.predict(Xq))


# ----------------------------------------------------------------------------------------------
# bad input


@pytest.fixture(scope="module")
def fitted():
    X, y, Xq, _ = make_problem(9)
    return CALM(k=3).fit(X, y), SAV(k=3).fit(X, y), X, y, Xq


@pytest.mark.parametrize("est", [CALM, SAV])
def test_bad_fit_input(est):
    X, y, _, _ = make_problem(10)
    cases = [
        (X[0], y, "shape"),
        (X[..., None], y, "shape"),
        (X.reshape(len(X), -1), y, "n_heads"),
        (X[:0], y[:0], "empty"),
        (X, y[:-1], "labels"),
        (X, np.zeros(len(y)), "two classes"),
        (np.where(np.arange(X.size).reshape(X.shape) == 5, np.nan, X), y, "NaN"),
        (np.where(np.arange(X.size).reshape(X.shape) == 5, np.inf, X), y, "infinite"),
        (X.astype(np.complex64), y, "real"),
        (X, np.stack([y, y], axis=1), "1-D"),
    ]
    for bad_X, bad_y, msg in cases:
        with pytest.raises(ValueError, match=msg):
            est(k=2).fit(bad_X, bad_y)
    with pytest.raises(ValueError, match="zero clips"):
        est(k=2, classes=[0, 1, 2, 3, 4]).fit(X, y)
    with pytest.raises(ValueError, match="not in classes"):
        est(k=2, classes=[0, 1, 2]).fit(X, y)
    with pytest.raises(ValueError, match="split"):
        est(k=2, n_heads=4).fit(X.reshape(len(X), -1), y)
    with pytest.raises(ValueError, match="k"):
        est(k=99).fit(X, y)


@pytest.mark.parametrize(
    "params",
    [
        dict(tau_p=0.0),
        dict(tau_p=-1),
        dict(tau_w=0.0),
        dict(tau_w=float("nan")),
        dict(weighting="local"),
        dict(normalization="l1"),
        dict(reliability="oob"),
        dict(k="all"),
        dict(k=1.5),
        dict(chunk_size=0),
        dict(n_heads=2.5),
    ],
)
def test_bad_calm_params(params):
    X, y, _, _ = make_problem(11)
    (name,) = params
    with pytest.raises(ValueError, match=f"'{name}' parameter of CALM must be"):
        CALM(**params).fit(X, y)


def test_bad_sav_params():
    X, y, _, _ = make_problem(11)
    with pytest.raises(ValueError, match="'tie_break' parameter of SAV must be a str among"):
        SAV(tie_break="random").fit(X, y)
    with pytest.raises(ValueError, match="'tau_p' parameter of SAV must be a float in the range"):
        SAV(tau_p=float("inf")).fit(X, y)


def test_bad_predict_input(fitted):
    clf, sav, X, _, Xq = fitted
    for model in (clf, sav):
        with pytest.raises(ValueError, match="heads"):
            model.predict(Xq[:, :-1])
        with pytest.raises(ValueError, match="dims"):
            model.predict(Xq[:, :, :-1])
        with pytest.raises(ValueError, match="empty"):
            model.predict(Xq[:0])
        with pytest.raises(ValueError, match="shape"):
            model.predict(Xq[0, 0])
        bad = Xq.copy()
        bad[-1, :, 1] = np.nan  # predict checks the heads it reads (SAV: the kept ones)
        with pytest.raises(ValueError, match="NaN"):
            model.set_params(chunk_size=4).predict(bad)
        model.set_params(chunk_size=None)
    with pytest.raises(ValueError, match="not fitted"):
        CALM().predict(Xq)


# ----------------------------------------------------------------------------------------------
# files


@pytest.mark.parametrize(
    "est",
    [
        CALM(k=3),
        CALM(k=0.5, weighting="global", normalization="power"),
        SAV(k=2),
        SAV(k=3, tie_break="margin"),
    ],
)
def test_save_load_round_trip(tmp_path, est):
    X, y, Xq, _ = make_problem(12)
    names = np.array(["cat", "dog", "rain", "wind"])[y]
    clf = clone(est).fit(X.astype(np.float32), names)
    path = tmp_path / "m.safetensors"
    clf.save(path, metadata={"model": "whisper-tiny.en", "prompt": "What is it?"})
    back = calm.load(path)
    assert type(back) is type(clf)
    assert back.get_params() == clf.get_params()
    assert back.metadata_ == {"model": "whisper-tiny.en", "prompt": "What is it?"}
    assert back.classes_.tolist() == clf.classes_.tolist()
    np.testing.assert_array_equal(back.decision_function(Xq), clf.decision_function(Xq))
    np.testing.assert_array_equal(back.predict(Xq), clf.predict(Xq))
    with safe_open(str(path), framework="numpy") as f:
        header = json.loads(f.metadata()["calm"])
    assert header["calm_version"] == calm.__version__
    assert (header["n_heads"], header["head_dim"], header["format_version"]) == (7, 5, 1)
    int_labels = clone(est).fit(X, y)
    int_labels.save(path)
    assert calm.load(path).classes_.tolist() == [0, 1, 2, 3]


def test_save_refuses_unserialisable(tmp_path, fitted):
    clf = fitted[0]
    with pytest.raises(ValueError, match="JSON"):
        clf.save(tmp_path / "m.safetensors", metadata={"f": object()})
    X, _, _, _ = make_problem(13)
    tuples = CALM(k=2).fit(X, [("a", i % 4) for i in range(len(X))])
    with pytest.raises(ValueError, match="class labels"):
        tuples.save(tmp_path / "t.safetensors")
    with pytest.raises(ValueError, match="not fitted"):
        CALM().save(tmp_path / "u.safetensors")


def _rewrite(path, out, *, header=None, tensors=None, raw_meta=None):
    t = load_file(str(path))
    with safe_open(str(path), framework="numpy") as f:
        h = json.loads(f.metadata()["calm"])
    if header:
        header(h)
    if tensors:
        tensors(t)
    save_file(t, str(out), metadata=raw_meta if raw_meta is not None else {"calm": json.dumps(h)})
    return out


def test_load_refuses_bad_files(tmp_path, fitted):
    clf = fitted[0]
    good = tmp_path / "good.safetensors"
    clf.save(good)
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a safetensors file at all")
    truncated = tmp_path / "trunc.safetensors"
    truncated.write_bytes(good.read_bytes()[:200])
    cases = {
        junk: "safetensors",
        truncated: "safetensors",
        _rewrite(good, tmp_path / "a", raw_meta={"other": "x"}): "no 'calm' header",
        _rewrite(good, tmp_path / "b", raw_meta={"calm": "{not json"}): "JSON",
        _rewrite(good, tmp_path / "c", header=lambda h: h.update(format_version=99)): "format version 99",
        _rewrite(good, tmp_path / "d", header=lambda h: h.update(format="other")): "format",
        _rewrite(good, tmp_path / "e", header=lambda h: h.pop("classes")): "missing",
        _rewrite(good, tmp_path / "f", tensors=lambda t: t.pop("weights")): "missing tensors",
        _rewrite(good, tmp_path / "g", tensors=lambda t: t.update(weights=t["weights"][:, :-1])): "shape",
        _rewrite(good, tmp_path / "h", header=lambda h: h.update(estimator="KNN")): "estimator",
        _rewrite(good, tmp_path / "i", header=lambda h: h["params"].update(tau_p=-1)): "parameters",
        _rewrite(good, tmp_path / "j", header=lambda h: h["params"].update(bogus=1)): "parameters",
        _rewrite(
            good, tmp_path / "k", header=lambda h: h.update(classes=["a", "b", "c", "d"])
        ): "class names",
        _rewrite(good, tmp_path / "k2", header=lambda h: h.update(classes=[0, 1])): "class names",
        _rewrite(
            good, tmp_path / "l", tensors=lambda t: t.update(heads=t["heads"] + 100)
        ): r"indices in \[0, 7\)",
        _rewrite(
            good, tmp_path / "m", tensors=lambda t: t.update(centroids=np.full_like(t["centroids"], np.nan))
        ): "NaN",
    }
    for path, msg in cases.items():
        with pytest.raises(ValueError, match=msg):
            calm.load(path)
    with pytest.raises(FileNotFoundError):
        calm.load(tmp_path / "absent.safetensors")


# ----------------------------------------------------------------------------------------------
# temperatures, feature scale, device (issues 9.7, 9.10, 11.2)


@pytest.mark.parametrize("params", [dict(tau_p=1e-40), dict(tau_w=1e-300), dict(tau_p=0.0), dict(tau_w=-1.0)])
def test_temperatures_that_overflow_are_refused_at_fit(params):
    X, y, _, _ = make_problem(0)
    name = next(iter(params))
    with pytest.raises(ValueError, match=name):
        CALM(k=3, **params).fit(X.astype(np.float32), y)


def test_smallest_accepted_temperatures_give_finite_weights_and_scores():
    X, y, Xq, _ = make_problem(0)
    for est in (CALM(k=3, tau_p=1e-30, tau_w=1e-30), CALM(k=3, tau_w=1e-30, normalization="power")):
        est.fit(X.astype(np.float32), y)
        assert np.isfinite(est.weights_).all() and (est.weights_ >= 0).all()
        np.testing.assert_allclose(est.weights_.sum(axis=1), 1.0)
        assert np.isfinite(est.decision_function(Xq.astype(np.float32))).all()


@pytest.mark.parametrize("scale", [1e20, 1e-25])
@pytest.mark.parametrize(
    "est",
    [CALM(k=3), CALM(k=3, weighting="global", reliability="leave-one-out"), SAV(k=3, tie_break="margin")],
)
def test_predictions_do_not_depend_on_feature_scale(est, scale):
    X, y, Xq, _ = make_problem(3)
    X32, Xq32 = X.astype(np.float32), Xq.astype(np.float32)
    base = clone(est).fit(X32, y)
    scaled = clone(est).fit((X * scale).astype(np.float32), y)
    q = (Xq * scale).astype(np.float32)
    assert np.isfinite(scaled.decision_function(q)).all()
    np.testing.assert_array_equal(scaled.predict(q), base.predict(Xq32))
    np.testing.assert_allclose(
        scaled.decision_function(q), base.decision_function(Xq32), rtol=1e-4, atol=1e-6
    )
    np.testing.assert_array_equal(scaled.heads_, base.heads_)


@pytest.mark.parametrize("est", [CALM(k=3), CALM(k=0.5, weighting="global"), SAV(k=3)])
def test_device_parameter_runs_chunks_there_and_is_not_saved(est, tmp_path):
    X, y, Xq, _ = make_problem(5)
    X32, Xq32 = X.astype(np.float32), Xq.astype(np.float32)
    ref = clone(est).fit(X32, y)
    other = clone(est).set_params(device=torch.device("cpu"), chunk_size=4).fit(X32, y)
    np.testing.assert_allclose(other.decision_function(Xq32), ref.decision_function(Xq32), rtol=0, atol=1e-5)
    assert other._device() == torch.device("cpu")
    other.save(tmp_path / "m.safetensors")
    loaded = calm.load(tmp_path / "m.safetensors")
    assert loaded.device == "cpu" and "device" not in loaded.metadata_
    with pytest.raises((RuntimeError, ValueError)):
        clone(est).set_params(device="no-such-device").fit(X32, y)


@pytest.mark.parametrize("tau_p", [0.01, 0.03, 0.1])
def test_calm_float32_scores_are_as_accurate_as_float32_allows(tau_p):
    # the query path takes exp as exp2 with log2(e) / tau_p folded into the centroids (issue 11):
    # against Eq. 13 evaluated in float64 from the fitted state, the float32 scores stay within
    # float32 rounding of the exponents (|s / tau_p| up to 100: a few 1e-6 at worst)
    rng = np.random.default_rng(0)
    C, K, d, n = 12, 24, 16, 400
    means = rng.normal(size=(C, K, d)) * 0.5 + rng.normal(size=(1, K, d)) * 1.5
    ys = np.repeat(np.arange(C), 4)
    Xs = (means[ys] + rng.normal(size=(len(ys), K, d))).astype(np.float32)
    Xq = (means[rng.integers(0, C, n)] + rng.normal(size=(n, K, d))).astype(np.float32)
    clf = CALM(k=0.4, tau_p=tau_p, scores="paper").fit(Xs, ys)
    got = clf.class_scores(Xq)
    assert got.dtype == np.float32
    X = H.l2_normalize(torch.from_numpy(Xq.astype(np.float64)))
    mu = H.l2_normalize(torch.from_numpy(clf.centroids_.astype(np.float64)))
    p = torch.softmax(torch.einsum("nkd,ckd->nkc", X, mu) / tau_p, dim=-1)
    truth = torch.einsum("nkc,ck->nc", p, torch.from_numpy(clf.weights_)).numpy()
    rel = np.abs(got - truth) / truth
    assert np.median(rel) < 3e-6 and rel.max() < 5e-5
    top = truth.max(axis=1)
    assert (np.abs(got.max(axis=1) - top) / top).max() < 5e-6
    np.testing.assert_array_equal(got.argmax(axis=1), truth.argmax(axis=1))
