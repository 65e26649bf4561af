"""The blocked fit and predict passes of CALM and SAV (issue 11): feature views read without copying, head
blocks of any size, NaN checks in every block, and the float64 support side against a direct
computation of Eq. 2, 5 and 6."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from calm import _heads as H
from calm.classifiers import CALM, SAV
from calm.classifiers import kernels as KN
from calm.classifiers.features import Features
from tests.helpers import readonly_float16_map
from tests.test_classifiers_reference import make_problem

CASES = [
    dict(k=3),  # most heads in use: every head is read
    dict(k=1, tau_p=0.01),  # few heads in use: the used heads are gathered block by block
    dict(k=0.5, weighting="global"),
    dict(k=2, reliability="leave-one-out"),
    dict(k=2, tau_p=0.0005),  # 1 / tau_p too large for exp without the max-shift
]


def _tiny_blocks(monkeypatch):
    """One head per compute block, two per read block: every partial block is exercised."""
    monkeypatch.setattr(KN, "BLOCK_BYTES", 1)
    monkeypatch.setattr(KN, "SUPPORT_BLOCK_BYTES", 1)
    monkeypatch.setattr(KN, "READ_BYTES", 2 * 8 * 5 * 4)  # 2 heads x 8 rows x 5 dims x float32
    monkeypatch.setattr(KN, "SUPPORT_READ_BYTES", 2 * 8 * 5 * 8)  # the same in float64


@pytest.mark.parametrize("params", CASES)
def test_block_sizes_and_chunks_do_not_change_results(monkeypatch, params):
    X, y, Xq, _ = make_problem(11, n_heads=9, shots=4, n_queries=29)
    ref = CALM(**params).fit(X, y)
    ref_scores = ref.decision_function(Xq.astype(np.float32))
    _tiny_blocks(monkeypatch)
    for chunk in (None, 3, 8):
        clf = CALM(**params, chunk_size=chunk).fit(X, y)
        np.testing.assert_allclose(clf.reliability_, ref.reliability_, rtol=0, atol=1e-13)
        np.testing.assert_array_equal(clf.heads_, ref.heads_)
        scores = clf.decision_function(Xq.astype(np.float32))
        np.testing.assert_allclose(scores, ref_scores, rtol=1e-5, atol=1e-7)


def test_support_margin_sums_equal_the_equations():
    # Eq. 2, 5, 6 directly in float64 (pure functions of calm._heads), summed per head and class
    X, y, _, _ = make_problem(3, n_heads=6, shots=5, noise=0.8)
    Xt, yt = torch.from_numpy(X), torch.from_numpy(y)
    C = 4
    centroids = H.class_centroids(Xt, yt, C)
    margins = H.clamped_margins(H.head_posteriors(H.cosine_similarities(Xt, centroids), 0.02), yt)  # (n, K)
    want = torch.zeros(X.shape[1], C, dtype=torch.float64).index_add_(1, yt, margins.T)
    views = Features(X).views(4)
    got = KN.support_margin_sums(views, yt, centroids.clone(), 0.02)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-13)


def test_views_share_memory_and_are_never_written(tmp_path):
    X = np.random.default_rng(0).normal(size=(10, 3, 4))
    (start, v), *rest = Features(X).views(4)
    assert start == 0 and v.shape == (4, 3, 4) and np.shares_memory(v.numpy(), X)
    assert [s for s, _ in rest] == [4, 8]
    ro = readonly_float16_map(tmp_path / "x.f16", X)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning about the read-only memory map
        views = list(Features(ro).views(3))
    assert views[0][1].dtype == torch.float16 and len(views) == 4
    ints = list(Features(np.arange(24).reshape(2, 3, 4)).views(2))[0][1]
    assert ints.dtype == torch.float64 and ints[1, 2, 3] == 23
    t = torch.from_numpy(X)
    assert list(Features(t).views(10))[0][1].data_ptr() == t.data_ptr()


@pytest.mark.parametrize("params", CASES[:2])
def test_nan_in_any_block_is_refused(monkeypatch, params):
    X, y, Xq, _ = make_problem(12, n_heads=9, shots=4, n_queries=20)
    clf = CALM(**params).fit(X, y)
    _tiny_blocks(monkeypatch)
    used = np.flatnonzero((clf.weights_ > 0).any(axis=0))
    for value in (np.nan, np.inf):
        bad = Xq.copy()
        bad[13, used[-1], 2] = value  # the last block of heads read, in the second chunk
        with pytest.raises(ValueError, match=r"rows 8\.\.15\) contains NaN or infinite"):
            clf.set_params(chunk_size=8).predict(bad)
        bad_fit = X.copy()
        bad_fit[5, -1, 0] = value
        with pytest.raises(ValueError, match="NaN or infinite"):
            CALM(**params, chunk_size=4).fit(bad_fit, y)


@pytest.mark.parametrize("tie_break", ["index", "margin"])
def test_sav_support_side_is_the_same_for_any_block_size(monkeypatch, tie_break):
    X, y, Xq, _ = make_problem(5, n_heads=9, shots=3, n_queries=17, noise=0.6)
    ref = SAV(k=3, tie_break=tie_break).fit(X, y)
    _tiny_blocks(monkeypatch)
    for chunk in (None, 2, 7):
        clf = SAV(k=3, tie_break=tie_break, chunk_size=chunk).fit(X, y)
        np.testing.assert_array_equal(clf.head_scores_, ref.head_scores_)
        np.testing.assert_array_equal(clf.heads_, ref.heads_)
        if tie_break == "margin":
            np.testing.assert_allclose(clf.head_margins_, ref.head_margins_, rtol=0, atol=1e-13)
        np.testing.assert_array_equal(clf.predict(Xq), ref.predict(Xq))
    bad = X.copy()
    bad[4, -1, 0] = np.nan
    with pytest.raises(ValueError, match="NaN or infinite"):
        SAV(k=3, tie_break=tie_break, chunk_size=2).fit(bad, y)


def test_support_votes_equal_the_equations():
    # Eq. 2-3 (accuracy of each head's nearest centroid) and Eq. 5-6 directly in float64
    X, y, _, _ = make_problem(4, n_heads=6, shots=5, noise=0.8)
    Xt, yt = torch.from_numpy(X), torch.from_numpy(y)
    centroids = H.class_centroids(Xt, yt, 4)
    s = H.cosine_similarities(Xt, centroids)  # (n, K, C)
    want_correct = (s.argmax(dim=-1) == yt[:, None]).sum(dim=0)
    want_margins = H.clamped_margins(H.head_posteriors(s, 0.02), yt).sum(dim=0)
    before = centroids.clone()
    correct, margins = KN.support_votes(Features(X).views(4), yt, centroids, 0.02)
    torch.testing.assert_close(correct, want_correct)
    torch.testing.assert_close(margins, want_margins, rtol=0, atol=1e-13)
    torch.testing.assert_close(centroids, before, rtol=0, atol=0)  # read, never written
    assert KN.support_votes(Features(X).views(4), yt, centroids)[1] is None
