"""Calibrated probabilities, conformal prediction sets and explain() of SAV / CALM / CALM-global /
the linear probe (calm._calibration, calm.classifiers.calibration) and the ECE metric."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import calm
from calm import _calibration as cal
from calm.errors import ParameterError
from calm.evaluate.metrics import expected_calibration_error, prediction_metrics
from calm.serialization import ModelFileError, read_classifier, write_classifier

torch.set_num_threads(1)

C, K, D = 4, 12, 8


def gaussian(seed: int, shots: int, queries: int = 200, noise: float = 2.0):
    """Support (shots per class) and query clips of C Gaussian classes, K heads of D dims."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(C, K, D))

    def draw(per_class: int):
        y = np.repeat(np.arange(C), per_class)
        return (centres[y] + noise * rng.normal(size=(len(y), K, D))).astype(np.float32), y

    return (*draw(shots), *draw(queries // C))


def estimators(**kw):
    return [
        calm.SAV(k=0.5, **kw),
        calm.CALM(k=0.5, **kw),
        calm.CALM(k=0.5, weighting="global", **kw),
        calm.LinearProbe(**kw),
    ]


@pytest.mark.parametrize("index", range(4))
def test_calibration_keeps_argmax_and_decision_function(index):
    X, y, Xq, _ = gaussian(0, shots=6)
    plain = estimators(calibration=None)[index].fit(X, y)
    fitted = estimators()[index].fit(X, y)
    assert fitted.calibration == "loo-temperature" and fitted.calibrated_
    assert fitted.temperature_ != 1.0
    p, p0 = fitted.predict_proba(Xq), plain.predict_proba(Xq)
    np.testing.assert_array_equal(fitted.decision_function(Xq), plain.decision_function(Xq))
    np.testing.assert_array_equal(p.argmax(axis=1), p0.argmax(axis=1))
    np.testing.assert_array_equal(fitted.classes_[p.argmax(axis=1)], fitted.predict(Xq))
    np.testing.assert_allclose(p.sum(axis=1), 1.0)
    assert not np.allclose(p, p0)


def test_calibration_lowers_the_ece_of_calm():
    before, after = [], []
    for seed in range(10):
        X, y, Xq, yq = gaussian(seed, shots=5, queries=400)
        for cal_, out in ((None, before), ("loo-temperature", after)):
            clf = calm.CALM(k=0.5, calibration=cal_).fit(X, y)
            p = clf.predict_proba(Xq)
            out.append(expected_calibration_error(p.max(axis=1), clf.classes_[p.argmax(axis=1)] == yq))
    # under-confident CALM scores (ECE ~0.28) sharpened to ~0.05 (~0.035 is the sampling floor of
    # 400 queries in 15 bins); a support set can mislead its own leave-one-out estimate
    assert np.median(after) < 0.07 and np.mean(after) < 0.25 * np.mean(before)


def test_one_shot_is_left_uncalibrated():
    X, y, Xq, _ = gaussian(1, shots=1)
    for clf, plain in zip(estimators(), estimators(calibration=None), strict=True):
        clf.fit(X, y), plain.fit(X, y)
        assert clf.temperature_ == 1.0 and not clf.calibrated_ and len(clf.nonconformity_) == 0
        np.testing.assert_array_equal(clf.predict_proba(Xq), plain.predict_proba(Xq))
        assert all(s == list(clf.classes_) for s in clf.predict_set(Xq, alpha=0.1))


def test_temperature_is_recovered():
    rng = np.random.default_rng(0)
    z = rng.normal(scale=3.0, size=(4000, 5))
    for t in (0.3, 1.0, 4.0):
        p = cal.calibrated_proba(z, t)
        y = np.array([rng.choice(5, p=row) for row in p])
        assert abs(np.log(cal.fit_temperature(z, y) / t)) < 0.15
    assert cal.fit_temperature(np.zeros((0, 5)), np.zeros(0, dtype=int)) == 1.0


def test_loo_cosines_match_centroids_refitted_without_the_clip():
    X, y, _, _ = gaussian(2, shots=3)
    x, yt = torch.from_numpy(X.astype(np.float64)), torch.from_numpy(y)
    centroids = torch.stack([x[yt == c].mean(dim=0) for c in range(C)])
    cos_in, cos_loo = cal.loo_cosines(x, yt, centroids, torch.bincount(yt))
    for i in (0, 5, 11):
        keep = torch.arange(len(y)) != i
        mu = torch.stack([x[keep & (yt == c)].mean(dim=0) for c in range(C)])
        want = torch.nn.functional.cosine_similarity(x[i][None], mu, dim=-1).T  # (K, C)
        torch.testing.assert_close(cos_loo[i], want)
        torch.testing.assert_close(
            cos_in[i], torch.nn.functional.cosine_similarity(x[i][None], centroids, dim=-1).T
        )


def test_conformal_threshold_is_the_finite_sample_quantile():
    scores = np.arange(1, 20) / 20.0  # 19 scores: rank ceil(20 * 0.9) = 18
    assert cal.conformal_threshold(scores, 0.1) == pytest.approx(0.9)
    assert cal.conformal_threshold(scores[:5], 0.1) == np.inf  # too few for alpha = 0.1
    sets = cal.prediction_sets(np.array([[0.7, 0.2, 0.1], [0.05, 0.05, 0.9]]), 0.8)
    assert sets.tolist() == [[True, True, False], [False, False, True]]


@pytest.mark.parametrize("index", range(4))
def test_prediction_sets_cover_at_the_nominal_level(index):
    coverage, sizes = [], []
    for seed in range(15):
        X, y, Xq, yq = gaussian(seed, shots=8)
        clf = estimators()[index].fit(X, y)
        sets = clf.predict_set(Xq, alpha=0.1)
        coverage.append(np.mean([t in s for t, s in zip(yq, sets, strict=True)]))
        sizes.append(np.mean([len(s) for s in sets]))
    if index == 3:  # the probe's held-out scores come from probes fitted on 4/5 of the support set,
        # less sure than the full probe: its sets err on the safe side
        assert 0.9 - 0.04 < np.mean(coverage) < 0.98
    else:
        assert abs(np.mean(coverage) - 0.9) < 0.04
    assert np.mean(sizes) < C  # the sets exclude classes
    loose = clf.predict_set(Xq, alpha=0.5)
    assert np.mean([len(s) for s in loose]) <= np.mean([len(s) for s in sets])


def test_predict_set_refuses_a_bad_alpha():
    X, y, Xq, _ = gaussian(0, shots=3)
    clf = calm.CALM(k=0.5).fit(X, y)
    for alpha in (0.0, 1.0, -0.1):
        with pytest.raises(ParameterError, match="alpha"):
            clf.predict_set(Xq, alpha=alpha)


@pytest.mark.parametrize("index", range(4))
def test_calibration_is_saved_and_restored(tmp_path, index):
    X, y, Xq, _ = gaussian(3, shots=5)
    clf = estimators()[index].fit(X, y)
    clf.save(tmp_path / "m.safetensors")
    back = calm.load(tmp_path / "m.safetensors")
    assert back.temperature_ == clf.temperature_ and back.calibrated_
    np.testing.assert_array_equal(back.nonconformity_, clf.nonconformity_)
    np.testing.assert_array_equal(back.predict_proba(Xq), clf.predict_proba(Xq))
    assert back.predict_set(Xq, 0.2) == clf.predict_set(Xq, 0.2)
    plain = estimators(calibration=None)[index].fit(X, y)
    plain.save(tmp_path / "p.safetensors")
    assert not hasattr(calm.load(tmp_path / "p.safetensors"), "temperature_")


def test_a_file_with_bad_calibration_is_refused(tmp_path):
    X, y, _, _ = gaussian(3, shots=5)
    clf = calm.CALM(k=0.5).fit(X, y)
    clf.save(tmp_path / "m.safetensors")
    saved = read_classifier(tmp_path / "m.safetensors")
    saved.tensors["nonconformity"] = saved.tensors["nonconformity"] + 2.0
    write_classifier(tmp_path / "bad.safetensors", saved)
    with pytest.raises(ModelFileError, match="bad.safetensors.*nonconformity"):
        calm.load(tmp_path / "bad.safetensors")


def test_explain_lists_the_heads_behind_each_score():
    X, y, Xq, _ = gaussian(4, shots=4)
    clf = calm.CALM(k=0.5).fit(X, y)
    out = clf.explain(Xq[:3], top=K)
    assert json.loads(json.dumps(out)) == out  # plain JSON
    scores = clf.class_scores(Xq[:3])
    for row, s, pred in zip(out, scores, clf.predict(Xq[:3]), strict=True):
        assert row["prediction"] == pred
        for c, name in enumerate(clf.classes_):
            heads = row["heads"][str(name)]
            assert sum(h["contribution"] for h in heads) == pytest.approx(float(s[c]), rel=1e-4, abs=1e-6)
            assert all(set(h) == {"head", "weight", "similarity", "contribution"} for h in heads)
            assert all(h["weight"] > 0 and -1 <= h["similarity"] <= 1 for h in heads)
    assert all(len(hs) <= 2 for hs in clf.explain(Xq[:1], top=2)[0]["heads"].values())
    # head names from the model file's metadata when it carries them
    clf.metadata_ = {"head_names": [[j // 4, j % 4, "decoder"] for j in range(K)]}
    head = clf.explain(Xq[:1])[0]["heads"][str(clf.classes_[0])][0]
    assert head["layer"] == head["head"] // 4 and head["index"] == head["head"] % 4
    assert head["source"] == "decoder"


def test_explain_sav_counts_votes():
    X, y, Xq, _ = gaussian(5, shots=4)
    clf = calm.SAV(k=4).fit(X, y)
    row = clf.explain(Xq[:1], top=K)[0]
    votes = {c: len(h) for c, h in row["heads"].items()}
    assert sum(votes.values()) == 4
    assert votes == {str(c): int(v) for c, v in zip(clf.classes_, clf.class_scores(Xq[:1])[0], strict=True)}
    assert all(h["weight"] == pytest.approx(0.25) for hs in row["heads"].values() for h in hs)


def test_expected_calibration_error():
    assert expected_calibration_error([0.9] * 10, [True] * 9 + [False]) == pytest.approx(0.0)
    assert expected_calibration_error([1.0, 1.0], [True, False]) == pytest.approx(0.5)
    # two bins: (0.5, 0.533] all right (gap 0.49), (0.933, 1] all wrong (gap 0.99)
    assert expected_calibration_error([0.51, 0.99], [True, False]) == pytest.approx(0.74)
    truth = [("a",), ("b",)]
    proba = np.array([[0.8, 0.2], [0.6, 0.4]])
    m = prediction_metrics(["a", "a"], proba, truth, ["a", "b"], "single")
    assert m["ece"] == pytest.approx(100 * (0.2 + 0.6) / 2)
    assert "ece" not in prediction_metrics(["a", "a"], np.log(proba), truth, ["a", "b"], "single")
    assert "ece" not in prediction_metrics(["a", "b"], None, truth, ["a", "b"], "single")


def test_a_large_support_set_is_calibrated_on_a_round_robin_subset(monkeypatch):
    from calm.classifiers import calibration

    y = np.array([0, 0, 0, 1, 1, 2, 2, 2, 2, 3])  # class 3 has one clip: never left out
    usable = np.bincount(y)[y] >= 2
    mask = calibration.calibration_rows(usable, y, 5)
    assert mask.sum() == 5 and not mask[9]
    assert list(np.flatnonzero(mask)) == [0, 1, 3, 4, 5]  # first clip of each class, then the second ones
    assert calibration.calibration_rows(usable, y, 50).tolist() == usable.tolist()
    rng = np.random.default_rng(0)
    X = (np.repeat(rng.normal(size=(4, 3, 8)), 10, axis=0) + rng.normal(size=(40, 3, 8))).astype(np.float32)
    labels = np.repeat(np.arange(4), 10)
    monkeypatch.setattr(calibration, "MAX_CALIBRATION_CLIPS", 12)
    clf = calm.CALM(k=2).fit(X, labels)
    assert clf.calibrated_ and len(clf.nonconformity_) == 12


def test_class_ranks_order_each_class_s_clips_and_give_the_probe_its_folds():
    """`class_ranks`, the one per-class order of the clips left out: the calibration's round-robin
    subset and the linear probe's held-out folds (rank mod the fold count) both read it."""
    from calm.classifiers.calibration import class_ranks
    from calm.classifiers.probe import held_out_folds

    y = np.array([2, 0, 2, 1, 0, 2, 1, 2, 2, 2, 2, 2, 0])
    mask = np.array([1, 1, 1, 1, 0, 1, 1, 1, 1, 1, 1, 1, 1], dtype=bool)
    want = np.array([0, 0, 1, 0, -1, 2, 1, 3, 4, 5, 6, 7, 1])
    np.testing.assert_array_equal(class_ranks(y, mask), want)
    np.testing.assert_array_equal(held_out_folds(y, mask, n_folds=5), np.where(want >= 0, want % 5, -1))


def test_at_class_reads_each_rows_own_class():
    cos = torch.arange(2 * 3 * 4, dtype=torch.float64).reshape(2, 3, 4)  # (n, K, C)
    out = cal.at_class(cos, np.array([1, 3]))
    np.testing.assert_array_equal(out, np.stack([cos[0, :, 1].numpy(), cos[1, :, 3].numpy()]))


def test_score_scales_put_each_part_on_the_support_clips_scale():
    parts = np.array([[1.0, 10.0, 7.0], [3.0, 30.0, 7.0]])  # (m, P); the last part is constant
    loc, scale = cal.score_scales(parts)
    np.testing.assert_allclose(loc, [2.0, 20.0, 7.0])
    np.testing.assert_allclose(scale, [1.0, 10.0, cal.SPREAD_FLOOR])  # floored, never 0
    np.testing.assert_allclose(cal.standardised_sum(parts, loc, scale), [-2.0, 2.0])
    # no support rows (one clip per class): the first part as it is, the others count for nothing
    loc, scale = cal.score_scales(np.zeros((0, 2)))
    assert loc.tolist() == [0.0, 0.0] and scale.tolist() == [1.0, cal.IGNORED]
    np.testing.assert_allclose(cal.standardised_sum(np.array([[5.0, 1e6]]), loc, scale), [5.0])
