"""CALM(scores="loo") (issue 24): tau_p and the reliability pooling chosen per support set by
leave-one-out; its pieces on hand examples and against an explicit loop over left-out clips."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import calm
from calm import _calibration as cal
from calm import _heads as H
from calm.classifiers import CALM
from calm.classifiers.calm import LOO_POOLING, LOO_TAU_P, loo_criterion
from calm.evaluate.estimators import fewshot_methods
from calm.methods import DEFAULTS
from tests.test_classifiers_reference import make_problem

torch.set_num_threads(1)


def test_shrunk_reliability_by_hand():
    rc = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    rg = torch.tensor([0.5, 0.5], dtype=torch.float64)
    counts = torch.tensor([1, 3])
    np.testing.assert_allclose(H.shrunk_reliability(rc, rg, counts, 0.0), rc)
    np.testing.assert_allclose(H.shrunk_reliability(rc, rg, counts, math.inf), [[0.5, 0.5], [0.5, 0.5]])
    # (n_c r_c + r) / (n_c + 1): (1 [1, 0] + [.5, .5]) / 2 and (3 [0, 1] + [.5, .5]) / 4
    np.testing.assert_allclose(H.shrunk_reliability(rc, rg, counts, 1.0), [[0.75, 0.25], [0.125, 0.875]])


@pytest.mark.parametrize("lam", [0.0, 1.0, math.inf])
def test_loo_reliabilities_are_the_shrunk_reliabilities_refitted_without_each_clip(lam):
    rng = np.random.default_rng(0)
    y = np.array([0, 1, 2, 0, 1, 2, 0, 2])
    m = rng.uniform(size=(len(y), 4))
    counts = np.bincount(y)
    rc, rg = H.class_reliability(m, y, 3), H.global_reliability(m)
    got = H.loo_reliabilities(m, y, rc, rg, counts, lam).numpy()
    for i in range(len(y)):
        m_i, y_i = np.delete(m, i, axis=0), np.delete(y, i)
        rc_i = np.stack([m_i[y_i == c].mean(axis=0) for c in range(3)])
        want = H.shrunk_reliability(rc_i, m_i.mean(axis=0), np.bincount(y_i), lam).numpy()
        np.testing.assert_allclose(got[i], want, atol=1e-12)


def test_loo_criterion_by_hand():
    scores = torch.tensor([[3.0, 1.0], [1.0, 1.0], [0.0, 2.0]], dtype=torch.float64)
    # normalised rows [.75, .25], [.5, .5], [0, 1]: right, a tie of two (half right), right;
    # margins p_y - max rival: .5, 0, 1
    assert loo_criterion(scores, torch.tensor([0, 1, 1])) == pytest.approx(2.5 / 3 + 0.1 * 0.5)
    # the same with the classes swapped: a tie counts the same whichever class comes first
    swapped = loo_criterion(scores.flip(1), torch.tensor([1, 0, 0]))
    assert swapped == loo_criterion(scores, torch.tensor([0, 1, 1]))


def test_one_clip_a_class_averages_class_and_global_reliabilities():
    X, y, Xq, _ = make_problem(3, shots=1)
    clf = CALM(k=3, tau_p=0.05, scores="loo").fit(X, y)
    assert (clf.tau_p_, clf.pooling_) == (0.05, 1.0)  # no leave-one-out: tau_p as given
    per_class = CALM(k=3, tau_p=0.05, scores="paper").fit(X, y)
    shared = CALM(k=3, tau_p=0.05, weighting="global", scores="paper").fit(X, y)
    np.testing.assert_allclose(
        clf.reliability_, (per_class.reliability_ + shared.reliability_) / 2, atol=1e-12
    )
    np.testing.assert_array_equal(clf.predict(Xq), clf.classes_[clf.class_scores(Xq).argmax(axis=1)])


def _reference_choice(X, y, k, tau_p, tau_w=0.5):
    """(tau_p, pooling) chosen by an explicit loop: each clip's margins taken out of the class /
    global means, heads and weights refitted, its class scored against the centroids without it.
    The cosines come from `calm._calibration.loo_cosines` (tested in test_calibration.py) and the
    means without a clip are formed as the fit forms them: saturated margins (r = 1 up to 1e-16)
    then rank heads alike (the formula itself: the test above)."""
    C = int(y.max()) + 1
    counts = np.bincount(y)
    mu = np.stack([X[y == c].mean(axis=0) for c in range(C)])
    cos_in, cos_loo = cal.loo_cosines(
        torch.from_numpy(X), torch.from_numpy(y), torch.from_numpy(mu), torch.from_numpy(counts)
    )
    grid = sorted(set(LOO_TAU_P) | {tau_p}, key=lambda t: (abs(math.log(t / tau_p)), -t))
    best, choice = -math.inf, None
    for tau in grid:
        m = H.clamped_margins(H.head_posteriors(cos_in, tau), y).numpy()
        rc_all = np.stack([m[y == c].mean(axis=0) for c in range(C)])
        for lam in LOO_POOLING:
            rows = []
            for i in range(len(y)):
                post = torch.softmax(cos_loo[i] / tau, dim=-1)  # (K, C), Eq. 5
                # the means without clip i, as (n r - m_i) / (n - 1) like the fit (rounding alike)
                rc, n_c = rc_all.copy(), counts.copy()
                rc[y[i]] = (counts[y[i]] * rc_all[y[i]] - m[i]) / (counts[y[i]] - 1)
                n_c[y[i]] -= 1
                rg = (len(y) * m.mean(axis=0) - m[i]) / (len(y) - 1)
                r = H.shrunk_reliability(rc, rg, n_c, lam)
                w = H.head_weights(r, k, tau_w)  # (C, K)
                rows.append((w.T * post).sum(dim=0))  # score_c = sum_j w_c^j p_c^j
            value = loo_criterion(torch.stack(rows), torch.from_numpy(y))
            if value > best:
                best, choice = value, (tau, lam)
    return choice


def test_loo_choice_matches_a_loop_reference_and_the_paper_fit_it_picks():
    picked = set()
    for seed in range(6):
        X, y, Xq, _ = make_problem(40 + seed, shots=3, noise=1.0 + 0.3 * seed)
        clf = CALM(k=3, scores="loo").fit(X, y)
        tau, lam = _reference_choice(X, y, 3, DEFAULTS["tau_p"])
        assert (clf.tau_p_, clf.pooling_) == (tau, lam)
        picked.add((tau, lam))
        # what it picked is the paper's CALM (lam 0) or CALM-global (lam inf) at that tau_p
        weighting = "class" if lam == 0 else "global"
        paper = CALM(k=3, tau_p=tau, weighting=weighting, scores="paper").fit(X, y)
        np.testing.assert_allclose(clf.weights_, paper.weights_, atol=1e-12)
        np.testing.assert_allclose(clf.decision_function(Xq), paper.decision_function(Xq), rtol=1e-6)
    assert len(picked) > 1  # not the paper's (0.03, class) every time


def test_loo_state_is_saved_and_the_chosen_tau_p_kept_after_set_params(tmp_path):
    X, y, Xq, _ = make_problem(44, shots=3, noise=1.9)
    clf = CALM(k=3, scores="loo").fit(X, y)
    before = clf.decision_function(Xq)
    clf.save(tmp_path / "loo.safetensors")
    back = calm.load(tmp_path / "loo.safetensors")
    assert back.scores == "loo" and back.tau_p_ == clf.tau_p_
    np.testing.assert_array_equal(back.decision_function(Xq), before)
    # tau_p is the anchor of the choice, fitted into tau_p_: changing it after fit changes nothing
    np.testing.assert_array_equal(clf.set_params(tau_p=0.2).decision_function(Xq), before)


def test_loo_is_the_default_and_global_weighting_ignores_it():
    assert CALM().scores == DEFAULTS["scores"] == "loo"
    X, y, Xq, _ = make_problem(45, shots=3)
    a = CALM(k=3, weighting="global", scores="loo").fit(X, y)
    b = CALM(k=3, weighting="global", scores="paper").fit(X, y)
    np.testing.assert_array_equal(a.decision_function(Xq), b.decision_function(Xq))
    assert fewshot_methods(scores="paper")["calm"].defaults["scores"] == "paper"
