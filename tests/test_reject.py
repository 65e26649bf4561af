"""The reject option (``unknown=``): a threshold on the known score (``unknown_score``: "centroid-z+top",
"centroid-z" or the calibrated top probability), set from the support set's leave-one-out scores, returns
``unknown_label`` for clips of no known class."""

from __future__ import annotations

import copy
import warnings

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import calm
from calm import _calibration as cal
from calm.errors import ParameterError
from calm.methods import UNKNOWN_SCORES
from calm.serialization import ModelFileError, read_classifier, write_classifier

torch.set_num_threads(1)

C, K, D = 4, 12, 8


def open_world(seed: int, shots: int, queries: int = 200, noise: float = 1.5):
    """Support clips of C Gaussian classes, queries of those classes and of one held-out class."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(C + 1, K, D))

    def draw(classes: np.ndarray):
        return (centres[classes] + noise * rng.normal(size=(len(classes), K, D))).astype(np.float32)

    y = np.repeat(np.arange(C), shots)
    yq = np.repeat(np.arange(C), queries // C)
    return draw(y), y, draw(yq), yq, draw(np.full(queries // C, C))


def estimators(**kw):
    return [
        calm.SAV(k=0.5, **kw),
        calm.CALM(k=0.5, **kw),
        calm.CALM(k=0.5, weighting="global", **kw),
        calm.LinearProbe(**kw),
    ]


@pytest.mark.parametrize("score", sorted(UNKNOWN_SCORES))
@pytest.mark.parametrize("index", range(4))
def test_accept_rate_is_the_requested_one_and_unknowns_are_rejected(index, score):
    accepted, rejected_unknowns = [], []
    for seed in range(15):
        X, y, Xq, _, Xu = open_world(seed, shots=10)
        clf = estimators(unknown=0.9, unknown_score=score)[index].fit(X, y)
        assert cal.ACCEPT_ALL < clf.reject_threshold_ < np.inf
        accepted.append(np.mean(clf.predict(Xq) != "unknown"))
        rejected_unknowns.append(np.mean(clf.predict(Xu) == "unknown"))
    # at least the requested rate (the conformal rank); SAV's vote counts tie, so it keeps more
    assert 0.9 - 0.02 < np.mean(accepted) < 0.9 + (0.06 if index == 0 else 0.04)
    # clips of the held-out class are rejected several times as often as known-class clips
    assert np.mean(rejected_unknowns) > max(0.35, 3 * (1 - np.mean(accepted)))
    if index == 1:  # CALM (class weights): most of them
        assert np.mean(rejected_unknowns) > 0.6


@pytest.mark.parametrize("score", sorted(UNKNOWN_SCORES))
@pytest.mark.parametrize("index", range(4))
def test_accepted_clips_keep_their_label(index, score):
    X, y, Xq, _, Xu = open_world(1, shots=6)
    queries = np.concatenate([Xq, Xu])
    plain = estimators()[index].fit(X, y).predict(queries)
    clf = estimators(unknown=0.8, unknown_label="none of these", unknown_score=score)[index].fit(X, y)
    pred = clf.predict(queries)
    kept = pred != "none of these"
    assert 0 < kept.sum() < len(pred)
    assert pred[kept].astype(plain.dtype).tolist() == plain[kept].tolist()
    known = clf.known_score(queries)  # a threshold on the known score
    assert (known[~kept] < clf.reject_threshold_).all() and (known[kept] >= clf.reject_threshold_).all()
    if score == "top-proba":  # the log-odds of the top probability
        top = clf.predict_proba(queries).max(axis=1)
        assert top[~kept].max() <= top[kept].min()
        odds = cal.proba_log_odds(clf.predict_proba(queries))
        # p near 1 rounds in float64 (log-odds of 36 is 1 - p = 2e-16): compare where p resolves them
        finite = np.abs(odds) < 30
        assert known[finite] == pytest.approx(odds[finite], rel=1e-3, abs=1e-3)


def test_string_classes_get_the_label_unshortened():
    X, y, _, _, Xu = open_world(2, shots=6)
    names = np.array(["a", "b", "c", "d"])[y]
    pred = calm.CALM(k=0.5, unknown=0.8).fit(X, names).predict(Xu)
    assert "unknown" in pred.tolist()


def test_off_by_default_and_needs_calibration():
    X, y, _, _, Xu = open_world(3, shots=4)
    clf = calm.CALM(k=0.5).fit(X, y)
    assert clf.unknown is None and not hasattr(clf, "reject_threshold_")
    assert set(clf.predict(Xu).tolist()) <= set(range(C))
    with pytest.raises(ParameterError, match="calibration"):
        calm.CALM(unknown=0.9, calibration=None).fit(X, y)
    with pytest.raises(ValueError):
        calm.CALM(unknown=1.0).fit(X, y)


def test_one_shot_rejects_nothing_and_warns():
    X, y, Xq, _, Xu = open_world(4, shots=1)
    with pytest.warns(UserWarning, match="nothing will be rejected"):
        clf = calm.CALM(k=0.5, unknown=0.9).fit(X, y)
    assert clf.reject_threshold_ == cal.ACCEPT_ALL
    assert "unknown" not in clf.predict(np.concatenate([Xq, Xu])).tolist()


def test_reject_threshold_is_the_conformal_rank():
    scores = np.linspace(0.1, 1.0, 10)  # m = 10
    assert cal.reject_threshold(scores, 0.9) == pytest.approx(0.1)  # floor(11 * 0.1) = 1st
    assert cal.reject_threshold(scores, 0.7) == pytest.approx(0.3)  # floor(11 * 0.3) = 3rd
    assert cal.reject_threshold(scores, 0.95) == cal.ACCEPT_ALL  # rank 0: too few clips
    assert cal.reject_threshold(np.zeros(0), 0.5) == cal.ACCEPT_ALL


def test_top_log_odds_is_that_of_the_calibrated_top_probability():
    log_scores = np.log(np.array([[0.7, 0.2, 0.1], [0.3, 0.3, 0.4], [1.0, 1e-300, 1e-300]]))
    for T in (0.5, 1.0, 3.0):
        p = cal.calibrated_proba(log_scores, T)
        odds = cal.top_log_odds(log_scores, T)
        assert odds[:2] == pytest.approx(cal.proba_log_odds(p)[:2])
        assert np.isfinite(odds).all() and odds[2] > 100  # p rounds to 1, its log-odds do not


@pytest.mark.parametrize("index", range(4))
def test_saved_and_restored(tmp_path, index):
    X, y, _, _, Xu = open_world(5, shots=5)
    clf = estimators(unknown=0.8, unknown_label="other")[index].fit(X, y)
    clf.save(tmp_path / "m.safetensors")
    back = calm.load(tmp_path / "m.safetensors")
    assert back.unknown == 0.8 and back.unknown_label == "other"
    assert back.reject_threshold_ == pytest.approx(clf.reject_threshold_)
    assert back.predict(Xu).tolist() == clf.predict(Xu).tolist()
    assert "reject_threshold" in read_classifier(tmp_path / "m.safetensors").tensors


def test_files_without_the_option_load_with_it_off(tmp_path):
    X, y, _, _, Xu = open_world(6, shots=3)
    saved = calm.CALM(k=0.5).fit(X, y)._to_state()
    for name in ("unknown", "unknown_label", "unknown_score"):  # as written before the options existed
        del saved.params[name]
    for name in ("known_mean", "known_spread", "known_loc", "known_scale"):
        del saved.tensors[name]
    write_classifier(tmp_path / "old.safetensors", saved)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        old = calm.load(tmp_path / "old.safetensors")
    assert old.unknown is None and old.unknown_label == "unknown" and old.unknown_score == "top-proba"
    assert set(old.predict(Xu).tolist()) <= set(range(C))


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    seed=st.integers(0, 10_000),
    shots=st.integers(8, 16),
    accept=st.sampled_from([0.8, 0.9, 0.95]),
    index=st.integers(0, 2),
    score=st.sampled_from(["centroid-z+top", "centroid-z"]),
)
def test_centroid_z_threshold_accepts_the_requested_share_of_known_clips(seed, shots, accept, index, score):
    """The threshold set from the support clips' leave-one-out centroid-z (+top) scores accepts about
    `accept` of new clips of the known classes: the conformal rank holds over support sets (one
    support draw alone can miss it by 15 points: its threshold is one sample), so the share is
    averaged over 8 support sets. The leave-one-out scores keep the spreads fitted with the clip, a
    little optimistic: on these problems the mean share is 0-4 points under `accept`."""
    rates = []
    for draw in range(8):
        X, y, Xq, _, _ = open_world(seed + draw, shots=shots, queries=400)
        clf = estimators(unknown=accept, unknown_score=score)[index].fit(X, y)
        rates.append(float(np.mean(clf.known_score(Xq) >= clf.reject_threshold_)))
    assert accept - 0.1 <= np.mean(rates) <= min(1.0, accept + 0.1), rates


def test_far_unknowns_are_rejected_and_known_clips_kept():
    """A separable case: the unknown class is far from every known one (in every head)."""
    rng = np.random.default_rng(7)
    centres = rng.normal(size=(C, K, D))
    X = np.concatenate([c + 0.3 * rng.normal(size=(10, K, D)) for c in centres]).astype(np.float32)
    y = np.repeat(np.arange(C), 10)
    far = (-centres.mean(0) + 0.3 * rng.normal(size=(50, K, D))).astype(np.float32)
    known = np.concatenate([c + 0.3 * rng.normal(size=(25, K, D)) for c in centres]).astype(np.float32)
    for clf in estimators(unknown=0.9):
        clf.fit(X, y)
        assert (clf.predict(far) == "unknown").all()
        assert np.mean(clf.predict(known) != "unknown") >= 0.8
        assert clf.known_score(far).max() < clf.known_score(known).min()


@pytest.mark.parametrize("score", sorted(UNKNOWN_SCORES))
def test_saving_keeps_the_score(tmp_path, score):
    X, y, Xq, _, Xu = open_world(8, shots=6)
    queries = np.concatenate([Xq, Xu])
    clf = calm.CALM(k=0.5, unknown=0.9, unknown_score=score).fit(X, y)
    clf.save(tmp_path / "m.safetensors")
    back = calm.load(tmp_path / "m.safetensors")
    assert back.unknown_score == score
    assert back.known_score(queries) == pytest.approx(clf.known_score(queries))
    assert back.predict(queries).tolist() == clf.predict(queries).tolist()
    tensors = read_classifier(tmp_path / "m.safetensors").tensors
    assert ("known_mean" in tensors) == (score != "top-proba")
    assert ("known_loc" in tensors) == (score == "centroid-z+top")


def test_a_file_naming_an_unknown_score_is_refused_on_one_line(tmp_path):
    X, y, _, _, _ = open_world(9, shots=4)
    saved = calm.CALM(k=0.5, unknown=0.9).fit(X, y)._to_state()
    saved.params["unknown_score"] = "energy"
    write_classifier(tmp_path / "bad.safetensors", saved)
    with pytest.raises(ModelFileError) as err:
        calm.load(tmp_path / "bad.safetensors")
    message = str(err.value)
    assert "\n" not in message and "bad.safetensors" in message and "unknown_score" in message


def test_centroid_z_without_calibration_is_refused():
    X, y, Xq, _, _ = open_world(10, shots=4)
    clf = calm.CALM(k=0.5, calibration=None).fit(X, y)
    with pytest.raises(ParameterError, match="centroid-z"):
        clf.known_score(Xq)
    assert clf.set_params(unknown_score="top-proba").known_score(Xq).shape == (len(Xq),)


def _weights_without(clf, X, y, i, pred):
    """Head weights (K,) of class ``pred`` refitted without support clip i, from the primitives:
    the fitted temperature and pooling, in-sample margins (Eq. 6) of the other clips."""
    from calm import _heads as H

    x = torch.from_numpy(X.astype(np.float64))
    yt = torch.from_numpy(y)
    cents = torch.stack([x[yt == c].mean(0) for c in range(C)])  # Eq. 1, of the raw features
    cos = torch.einsum("nkd,ckd->nkc", H.l2_normalize(x), H.l2_normalize(cents))
    m = H.clamped_margins(H.head_posteriors(cos, clf.tau_p_), yt)
    rest = torch.arange(len(y)) != i
    rc = H.class_reliability(m[rest], yt[rest], C)
    rg = H.global_reliability(m[rest])
    r = H.shrunk_reliability(rc, rg, torch.bincount(yt[rest], minlength=C), clf.pooling_)
    return H.head_weights(r, clf.k_, clf.tau_w, clf.normalization)[pred].numpy()


def test_centroid_z_leave_one_out_weights_follow_the_chosen_temperature_and_pooling():
    """CALM(scores="loo") sets its reject threshold from head weights refitted without each support
    clip with the tau_p and pooling it chose (it used the tau_p parameter and class pooling)."""
    X, y, *_ = open_world(3, shots=6, noise=3.0)
    clf = calm.CALM(k=0.5, tau_p=0.1, unknown=0.9).fit(X, y)
    assert (clf.tau_p_, clf.pooling_) != (0.1, 0.0)  # the case where the old weights were wrong
    x = torch.from_numpy(X.astype(np.float64))
    yt = torch.from_numpy(y)
    cents = torch.stack([x[yt == c].mean(0) for c in range(C)])
    cos_in, cos_loo = cal.loo_cosines(x, yt, cents, torch.bincount(yt, minlength=C))
    pred = (np.arange(len(y)) + np.arange(len(y)) % 2) % C  # own class and another one
    got = clf._loo_weights(cos_in, cos_loo, yt, pred)
    for i in range(len(y)):
        np.testing.assert_allclose(got[i], _weights_without(clf, X, y, i, pred[i]), atol=1e-9)


def test_the_sum_score_is_the_standardised_sum_of_its_two_parts():
    """ "centroid-z+top": centroid-z and the top log-odds, each minus the mean over the support
    clips' leave-one-out scores and over their standard deviation, summed; on queries and on the
    support clips left out (what the threshold is set from)."""
    from calm.classifiers import calibration
    from calm.classifiers.features import Features

    X, y, Xq, _, Xu = open_world(11, shots=8)
    queries = np.concatenate([Xq, Xu])
    for index in range(3):
        fits = {s: estimators(unknown=0.9, unknown_score=s)[index].fit(X, y) for s in UNKNOWN_SCORES}
        both, z, top = fits["centroid-z+top"], fits["centroid-z"], fits["top-proba"]
        loo = calibration.leave_one_out(both, Features(X), y)
        parts = np.stack([calibration.loo_known_scores(z, loo), calibration.loo_known_scores(top, loo)], 1)
        np.testing.assert_allclose(both.known_loc_, parts.mean(0), atol=1e-12)
        np.testing.assert_allclose(both.known_scale_, parts.std(0), atol=1e-12)
        standard = (parts - parts.mean(0)) / parts.std(0)
        np.testing.assert_allclose(calibration.loo_known_scores(both, loo), standard.sum(1), atol=1e-9)
        q = np.stack([z.known_score(queries), top.known_score(queries)], 1)
        want = ((q - parts.mean(0)) / parts.std(0)).sum(1)
        np.testing.assert_allclose(both.known_score(queries), want, atol=1e-9)
        assert both.reject_threshold_ == cal.reject_threshold(standard.sum(1), 0.9)


def test_the_leave_one_out_score_equals_scoring_the_clip_against_the_support_set_without_it():
    """SAV (fixed kept heads): each support clip's leave-one-out "centroid-z+top" score (closed
    forms) equals its score as a query of the fitted classifier with its class's centroid refitted
    without it and its class's mean cosine taken over the other clips of the class only (their
    fitted leave-one-out cosines: each to the class centroid without that clip), computed directly
    here. The support-wide statistics (head spreads, temperature, the two scales) stay the fitted
    ones, as the leave-one-out scores keep them."""
    from calm.classifiers import calibration
    from calm.classifiers.features import Features
    from calm.classifiers.kernels import unit_layout

    X, y, _, _, _ = open_world(12, shots=6, noise=2.0)
    clf = calm.SAV(k=0.5, unknown=0.9).fit(X, y)
    got = calibration.loo_known_scores(clf, calibration.leave_one_out(clf, Features(X), y))
    x = X.astype(np.float64)

    def unit(a):
        return a / np.linalg.norm(a, axis=-1, keepdims=True)

    for i in range(len(y)):
        rest = np.arange(len(y)) != i
        c = y[i]
        refit = copy.deepcopy(clf)
        refit.centroids_ = np.stack([x[rest & (y == k)].mean(0) for k in range(C)]).astype(
            clf.centroids_.dtype
        )
        refit._prepare(unit_layout(torch.from_numpy(refit.centroids_)))
        others = np.flatnonzero(rest & (y == c))
        members = np.flatnonzero(y == c)
        own = [(unit(x[j]) * unit(x[members[members != j]].mean(0))).sum(-1) for j in others]
        refit.known_mean_ = clf.known_mean_.copy()
        refit.known_mean_[c] = np.mean(own, axis=0)
        assert refit.known_score(X[i : i + 1])[0] == pytest.approx(got[i], abs=1e-4)


def test_one_shot_sum_score_is_centroid_z_alone_and_rejects_nothing(tmp_path):
    """With one clip per class there are no leave-one-out scores to put the two parts on one scale:
    the score is centroid-z alone (the top log-odds ignored), as before "centroid-z+top" existed;
    every score is finite and nothing is rejected (a warning)."""
    X, y, Xq, _, Xu = open_world(13, shots=1)
    queries = np.concatenate([Xq, Xu])
    with pytest.warns(UserWarning, match="nothing will be rejected"):
        clf = calm.CALM(k=0.5, unknown=0.9).fit(X, y)
    assert clf.unknown_score == "centroid-z+top"
    assert clf.known_loc_.tolist() == [0.0, 0.0] and clf.known_scale_.tolist() == [1.0, cal.IGNORED]
    z = calm.CALM(k=0.5, unknown_score="centroid-z").fit(X, y).known_score(queries)
    np.testing.assert_allclose(clf.known_score(queries), z, atol=1e-12)
    assert "unknown" not in clf.predict(Xu).tolist()
    clf.save(tmp_path / "m.safetensors")  # the ignored part's scale is finite: it saves and loads
    np.testing.assert_allclose(calm.load(tmp_path / "m.safetensors").known_score(queries), z, atol=1e-12)


@pytest.mark.parametrize("cls", [calm.SAV, calm.CALM, calm.LinearProbe])
def test_a_refit_drops_the_known_statistics_its_score_does_not_use(cls):
    """Every known score's fitted state (``known_mean_``, ``known_spread_``, ``known_loc_``,
    ``known_scale_``: the attributes of the saved known-score tensors) goes with a refit that does
    not set it, so a file saved after it holds only its own score's tensors."""
    X, y, *_ = open_world(5, shots=4)
    clf = cls(unknown=0.9).fit(X, y)
    assert all(hasattr(clf, a) for a in ("known_mean_", "known_spread_", "known_loc_", "known_scale_"))
    clf.set_params(unknown_score="centroid-z").fit(X, y)
    assert hasattr(clf, "known_mean_") and not hasattr(clf, "known_loc_") and not hasattr(clf, "known_scale_")
    clf.set_params(unknown_score="top-proba").fit(X, y)
    assert not any(hasattr(clf, a) for a in ("known_mean_", "known_spread_", "known_loc_", "known_scale_"))
