"""keep_support and partial_fit (issue 25): adding clips or classes to a fitted SAV / CALM-global /
CALM equals fitting on the union (calibration, reject threshold included); the kept support set in
the classifier file (round trip, old files, crafted headers and tensors)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import calm
from calm import CALM, SAV, LinearProbe
from calm.errors import FeatureError
from calm.serialization import ModelFileError
from tests.helpers.model_files import join_file, replace_tensor, reseal, split_file

torch.set_num_threads(1)
pytestmark = pytest.mark.filterwarnings("ignore:leave-one-out reliability:UserWarning")

MAKERS = {
    "sav": lambda **kw: SAV(k=2, **kw),
    "sav-margin": lambda **kw: SAV(k=2, tie_break="margin", **kw),
    "calm-global": lambda **kw: CALM(k=2, weighting="global", **kw),
    "calm": lambda **kw: CALM(k=2, **kw),
    "calm-loo": lambda **kw: CALM(k=3, reliability="leave-one-out", normalization="power", **kw),
    "linear-probe": lambda **kw: LinearProbe(**kw),
}
STATE = (
    "classes_",
    "class_counts_",
    "centroids_",
    "heads_",
    "head_scores_",
    "head_margins_",
    "reliability_",
    "weights_",
    "temperature_",
    "nonconformity_",
    "calibrated_",
    "reject_threshold_",
    "support_features_",
    "support_labels_",
    "k_",
    "mean_",
    "scale_",
    "coef_",
    "intercept_",
)


def data(seed: int, classes=("a", "b", "c", "d"), n_per: int = 5, heads: int = 6, dim: int = 8):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(len(classes), heads, dim))
    X = np.concatenate([c + 0.6 * rng.normal(size=(n_per, heads, dim)) for c in centres]).astype(np.float32)
    return X, np.repeat(np.array(classes), n_per)


def assert_same(a, b, X, exact: bool = True):
    """Same fitted state (float rounding aside unless ``exact``) and identical predictions."""
    for attr in STATE:
        assert hasattr(a, attr) == hasattr(b, attr), attr
        if hasattr(a, attr):
            va, vb = getattr(a, attr), getattr(b, attr)
            if not exact and attr.startswith("support_"):
                continue  # rows in the order given
            if not exact and attr == "nonconformity_":
                va, vb = np.sort(va), np.sort(vb)  # one per support clip, in the order given
            if exact or np.asarray(va).dtype.kind not in "f":
                np.testing.assert_array_equal(va, vb, err_msg=attr)
            else:
                np.testing.assert_allclose(va, vb, rtol=1e-5, atol=1e-6, err_msg=attr)
    np.testing.assert_array_equal(a.predict(X), b.predict(X))
    np.testing.assert_allclose(a.predict_proba(X), b.predict_proba(X), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(a.decision_function(X), b.decision_function(X), rtol=1e-5, atol=1e-7)


def split(y: np.ndarray, seed: int, new_classes: int):
    """A first part (some clips of the old classes) and the rest (more clips, ``new_classes`` new classes)."""
    rng = np.random.default_rng(seed)
    classes = np.unique(y)
    new = set(rng.choice(classes, size=new_classes, replace=False).tolist())
    first = np.zeros(len(y), bool)
    for c in classes:
        if c not in new:
            rows = np.flatnonzero(y == c)
            first[rng.choice(rows, size=rng.integers(1, len(rows) + 1), replace=False)] = True
    return first


@pytest.mark.parametrize("name", sorted(MAKERS))
@pytest.mark.parametrize(
    "options", [{}, {"unknown": 0.9}, {"calibration": None}], ids=["cal", "unknown", "raw"]
)
def test_partial_fit_equals_fit_on_the_union(name, options):
    make = MAKERS[name]
    for seed in range(3):
        X, y = data(seed)
        first = split(y, seed, new_classes=seed % 3)
        order = np.r_[np.flatnonzero(first), np.flatnonzero(~first)]
        before = make(keep_support=True, **options).fit(X[first], y[first])
        before.metadata_ = {"model": "m"}
        added = before.partial_fit(X[~first], y[~first])
        assert added is before and added.metadata_ == {"model": "m"}  # returns self, keeps metadata
        assert_same(added, make(keep_support=True, **options).fit(X[order], y[order]), X)
        if name == "linear-probe":
            continue  # its held-out folds and its solver's path follow the support order
        # any order of the union: the same to float rounding
        shuffled = np.random.default_rng(seed).permutation(len(y))
        assert_same(added, make(keep_support=True, **options).fit(X[shuffled], y[shuffled]), X, exact=False)


@settings(max_examples=15, deadline=None)
@given(
    seed=st.integers(0, 2**16),
    name=st.sampled_from(sorted(MAKERS)),
    steps=st.integers(1, 3),
    new_classes=st.integers(0, 2),
)
def test_several_partial_fits_equal_one_fit(seed, name, steps, new_classes):
    X, y = data(seed % 1000, n_per=4)
    first = split(y, seed, new_classes)
    rest = np.random.default_rng(seed).permutation(np.flatnonzero(~first))
    clf = MAKERS[name](keep_support=True, unknown=0.9).fit(X[first], y[first])
    for part in np.array_split(rest, steps):
        if len(part):
            clf.partial_fit(X[part], y[part])
    order = np.r_[np.flatnonzero(first), rest]
    assert_same(clf, MAKERS[name](keep_support=True, unknown=0.9).fit(X[order], y[order]), X)


def test_new_class_sorts_like_fit_and_unfitted_partial_fit_fits():
    X, y = data(0)
    clf = CALM(k=2, keep_support=True).fit(X[y != "a"], y[y != "a"])
    assert clf.classes_.tolist() == ["b", "c", "d"]
    clf.partial_fit(X[y == "a"], y[y == "a"])
    assert clf.classes_.tolist() == ["a", "b", "c", "d"]  # sorted, as fit orders them
    assert (
        clf.class_counts_.tolist() == [5, 5, 5, 5]
        and clf.support_labels_.tolist() == [1] * 5 + [2] * 5 + [3] * 5 + [0] * 5
    )
    fresh = SAV(k=2, keep_support=True).partial_fit(X, y, classes=["a", "b", "c", "d"])
    assert_same(fresh, SAV(k=2, keep_support=True).fit(X, y), X)
    with pytest.raises(FeatureError, match=r"labels \['e'\] are not in classes"):
        fresh.partial_fit(X[:1], ["e"], classes=["a", "b", "c", "d"])
    # a fixed class order stays fixed: a label outside it is refused as fit refuses it
    fixed = CALM(k=2, classes=["d", "c", "b"], keep_support=True).fit(X[y != "a"], y[y != "a"])
    with pytest.raises(ValueError):
        fixed.partial_fit(X[y == "a"], y[y == "a"])
    assert fixed.classes_.tolist() == ["d", "c", "b"] and len(fixed.support_labels_) == 15  # unchanged


def test_other_inputs_float16_torch_and_two_d():
    X, y = data(1)
    first = np.arange(len(y)) % 2 == 0
    order = np.r_[np.flatnonzero(first), np.flatnonzero(~first)]
    half = X.astype(np.float16)
    a = (
        CALM(k=2, keep_support=True)
        .fit(half[first], y[first])
        .partial_fit(torch.from_numpy(half[~first]), y[~first])
    )
    assert a.support_features_.dtype == np.float32  # widened exactly, as fit reads float16
    assert_same(a, CALM(k=2, keep_support=True).fit(half[order], y[order]), X)
    flat = X.reshape(len(X), -1)
    b = SAV(k=2, n_heads=6, keep_support=True).fit(flat[first], y[first]).partial_fit(flat[~first], y[~first])
    assert_same(b, SAV(k=2, n_heads=6, keep_support=True).fit(flat[order], y[order]), flat)
    with pytest.raises(FeatureError, match="8 dims"):
        b.partial_fit(X[:2, :, :4], y[:2])
    with pytest.raises(FeatureError, match="2 samples but y"):
        b.partial_fit(X[:2], y[:3])


def test_without_kept_support_partial_fit_refuses_in_one_line(tmp_path):
    X, y = data(0)
    for clf in (SAV(k=2).fit(X, y), CALM(k=2).fit(X, y)):
        assert not hasattr(clf, "support_features_")
        with pytest.raises(FeatureError, match="fit with keep_support=True") as info:
            clf.partial_fit(X[:2], y[:2])
        assert "\n" not in str(info.value)
        clf.save(tmp_path / "plain.safetensors")
        with pytest.raises(FeatureError, match="keep_support=True"):
            calm.load(tmp_path / "plain.safetensors").partial_fit(X[:2], y[:2])
    # refitting without keep_support drops the support of an earlier fit
    clf = CALM(k=2, keep_support=True).fit(X, y)
    assert not hasattr(clf.set_params(keep_support=False).fit(X, y), "support_features_")


@pytest.mark.parametrize("name", ["sav-margin", "calm-global", "calm"])
def test_kept_support_round_trips_through_the_file(tmp_path, name):
    X, y = data(2)
    first = y != "c"
    clf = MAKERS[name](keep_support=True, unknown=0.9).fit(X[first], y[first])
    path = tmp_path / "m.safetensors"
    clf.save(path, metadata={"note": "x"})
    header, _ = split_file(path)
    calm_header = json.loads(header["__metadata__"]["calm"])
    assert calm_header["n_support"] == int(first.sum()) and calm_header["params"]["keep_support"] is True
    assert header["support_features"]["shape"] == [int(first.sum()), 6, 8]
    loaded = calm.load(path)
    assert_same(loaded, clf, X)
    loaded.partial_fit(X[~first], y[~first])
    order = np.r_[np.flatnonzero(first), np.flatnonzero(~first)]
    assert_same(loaded, MAKERS[name](keep_support=True, unknown=0.9).fit(X[order], y[order]), X)
    assert loaded.metadata_ == {"note": "x"}
    plain = tmp_path / "plain.safetensors"
    MAKERS[name]().fit(X, y).save(plain)
    assert "n_support" not in json.loads(split_file(plain)[0]["__metadata__"]["calm"])
    assert "support_features" not in split_file(plain)[0]


def _edit_header(path, out, edit):
    header, blob = split_file(path)
    h = json.loads(header["__metadata__"]["calm"])
    edit(h, header)
    header["__metadata__"]["calm"] = json.dumps(h)
    return join_file(out, reseal(header, blob), blob)


def _one_line_error(path, *needles):
    with pytest.raises(ModelFileError) as info:
        calm.load(path)
    text = str(info.value)
    assert "\n" not in text and str(path) in text, text
    for needle in needles:
        assert needle in text, text


def test_crafted_support_is_refused_in_one_line(tmp_path):
    X, y = data(3)
    path = tmp_path / "m.safetensors"
    CALM(k=2, keep_support=True).fit(X, y).save(path)
    n = len(y)

    def huge(h, _):
        h["n_support"] = 10**15

    def missing(h, _):
        del h["n_support"]

    def bogus(h, _):
        h["n_support"] = "20"

    def dropped(h, _):
        h["params"]["keep_support"] = False

    cases = {
        "huge": (huge, ["'support_features' has shape", f"({n}, 6, 8)"]),
        "missing": (missing, ["header has no 'n_support'"]),
        "bogus": (bogus, ["'n_support' must be a positive int"]),
        "dropped": (dropped, ["states n_support but the parameters keep no support set"]),
    }
    for name, (edit, needles) in cases.items():
        _one_line_error(_edit_header(path, tmp_path / f"{name}.safetensors", edit), *needles)
    # the plain file claiming a support set
    plain = tmp_path / "plain.safetensors"
    CALM(k=2).fit(X, y).save(plain)

    def claims(h, _):
        h["params"]["keep_support"] = True

    _one_line_error(_edit_header(plain, tmp_path / "claims.safetensors", claims), "no 'n_support'")

    def claims_n(h, _):
        h["params"]["keep_support"] = True
        h["n_support"] = n

    _one_line_error(_edit_header(plain, tmp_path / "claims_n.safetensors", claims_n), "missing tensors")
    # a tensor header claiming a huge shape: refused before any tensor byte is read
    header, blob = split_file(path)
    header["support_features"]["shape"] = [10**12, 6, 8]
    _one_line_error(
        join_file(tmp_path / "shape.safetensors", header, blob), "not a readable safetensors file"
    )
    # labels out of range, or not giving the class counts
    labels = np.asarray(calm.load(path).support_labels_)
    _one_line_error(
        replace_tensor(path, tmp_path / "range.safetensors", "support_labels", labels + 4),
        "indices in [0, 4)",
    )
    swapped = labels.copy()
    swapped[0] = (swapped[0] + 1) % 4
    _one_line_error(
        replace_tensor(path, tmp_path / "counts.safetensors", "support_labels", swapped), "class counts"
    )
    bad = np.asarray(calm.load(path).support_features_).copy()
    bad[0, 0, 0] = np.nan
    _one_line_error(replace_tensor(path, tmp_path / "nan.safetensors", "support_features", bad), "NaN")
