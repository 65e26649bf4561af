"""Method ``auto`` (`calm.classifiers.auto.AutoHead`): the best of SAV / CALM-global / CALM by
cross-validation on the support set only, through every front end (`run_evaluation`, `calm evaluate`,
`calm fit`, `calm.AudioClassifier`) and saved as the chosen classifier."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from sklearn.base import clone
from sklearn.model_selection import StratifiedKFold

import calm
from calm import methods
from calm.audio_classifier import AudioClassifier
from calm.classifiers.auto import FINAL_FIT_PARAMS, AutoHead
from calm.errors import ParameterError
from calm.evaluate import EvalConfig, run_evaluation
from calm.evaluate.episodes import episodes, make_parts
from calm.evaluate.estimators import FEWSHOT_METHODS
from tests.test_methods import store  # noqa: F401  (the fixture: a small store of a fake extractor)

torch.set_num_threads(1)


def support(n_per_class: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(3, 6, 8))
    X = np.concatenate([c + 1.5 * rng.normal(size=(n_per_class, 6, 8)) for c in centres]).astype(np.float32)
    return X, np.repeat(["dog", "rain", "siren"], n_per_class)


def by_hand(name: str, X: np.ndarray, y: np.ndarray, folds: int, seed: int = 0) -> float:
    right = 0
    for tr, te in StratifiedKFold(folds, shuffle=True, random_state=seed).split(X[:, 0, 0], y):
        clf = methods.build(name, methods.info(name).defaults()).fit(X[tr], y[tr])
        right += int((clf.predict(X[te]) == y[te]).sum())
    return 100 * right / len(y)


def test_chooses_the_best_cross_validated_candidate_and_refits_it_on_all_clips():
    X, y = support(6)
    clf = AutoHead(cv=3).fit(X, y)
    assert clf.cv_folds_ == 3 and set(clf.cv_scores_) == set(methods.AUTO_CANDIDATES)
    assert clf.n_repeats == methods.AUTO_CV_REPEATS > 1 and clf.selection_["cv_repeats"] == clf.n_repeats
    for name, score in clf.cv_scores_.items():  # the mean over the shuffles seeded 0, 1, ...
        by_seed = [by_hand(name, X, y, 3, seed=r) for r in range(clf.n_repeats)]
        assert score == pytest.approx(np.mean(by_seed), abs=1e-4)
    best = max(clf.cv_scores_.values())
    assert clf.cv_scores_[clf.chosen_] == best
    if clf.cv_scores_[methods.AUTO_FALLBACK] == best:
        assert clf.chosen_ == methods.AUTO_FALLBACK  # the fallback wins ties
    direct = methods.build(clf.chosen_, methods.info(clf.chosen_).defaults()).fit(X, y)
    Xq, _ = support(2, seed=5)
    np.testing.assert_array_equal(clf.predict_proba(Xq), direct.predict_proba(Xq))
    assert list(clf.classes_) == ["dog", "rain", "siren"] and clf.score(X, y) > 0.5
    assert clf.selection_["chosen"] == clf.chosen_ and "cross-validated" in clf.reason_


def test_one_repeat_is_one_shuffle_of_the_folds_seeded_by_random_state():
    X, y = support(5, seed=3)
    one = AutoHead(cv=5, n_repeats=1, random_state=2).fit(X, y)
    for name, score in one.cv_scores_.items():
        assert score == pytest.approx(by_hand(name, X, y, 5, seed=2), abs=1e-4)
    assert "shuffles" not in one.reason_ and "mean of 3 shuffles" in AutoHead(n_repeats=3).fit(X, y).reason_
    again = AutoHead(cv=5, n_repeats=4).fit(X, y)
    assert again.cv_scores_ == AutoHead(cv=5, n_repeats=4).fit(X, y).cv_scores_  # deterministic
    with pytest.raises(ValueError, match="n_repeats"):
        AutoHead(n_repeats=0).fit(X, y)


def test_folds_are_capped_by_the_smallest_class_and_one_candidate_is_chosen():
    X, y = support(4)
    clf = AutoHead(candidates=["sav"], cv=10).fit(X, y)
    assert clf.cv_folds_ == 4 and clf.chosen_ == "sav" and isinstance(clf.estimator_, calm.SAV)


def test_one_clip_per_class_falls_back_without_cross_validation():
    X, y = support(1)
    clf = AutoHead().fit(X, y)
    assert clf.chosen_ == "calm-global" and clf.cv_scores_ == {} and clf.cv_folds_ == 0
    assert "single support clip" in clf.reason_ and clf.estimator_.weighting == "global"
    assert AutoHead(fallback="sav").fit(X, y).chosen_ == "sav"


def test_ties_go_to_the_fallback_then_to_the_earlier_candidate():
    rng = np.random.default_rng(1)
    centres = rng.normal(size=(3, 6, 8))
    X = np.concatenate([c + 0.01 * rng.normal(size=(4, 6, 8)) for c in centres]).astype(np.float32)
    y = np.repeat(["dog", "rain", "siren"], 4)  # separable: every candidate scores 100 %
    clf = AutoHead(cv=4).fit(X, y)
    assert set(clf.cv_scores_.values()) == {100.0} and clf.chosen_ == "calm-global"
    assert AutoHead(cv=4, candidates=("calm", "sav")).fit(X, y).chosen_ == "calm"


@pytest.mark.parametrize(
    "params, match",
    [
        ({"candidates": ("zero-shot",)}, "candidates and fallback must be among"),
        ({"candidates": ("auto",)}, "candidates and fallback must be among"),
        ({"candidates": ()}, "candidates and fallback must be among"),
        ({"fallback": "knn"}, "knn"),
    ],
)
def test_bad_candidates_are_refused(params, match):
    X, y = support(2)
    with pytest.raises(ParameterError, match=match):
        AutoHead(**params).fit(X, y)


def test_scikit_learn_conventions():
    from sklearn.exceptions import NotFittedError
    from sklearn.utils._param_validation import InvalidParameterError

    est = AutoHead(cv=4)
    assert clone(est).get_params() == {
        "candidates": methods.AUTO_CANDIDATES,
        "cv": 4,
        "fallback": "calm-global",
        "random_state": 0,
        "n_repeats": methods.AUTO_CV_REPEATS,
        **{p: methods.DEFAULTS[p] for p in FINAL_FIT_PARAMS},
    }
    with pytest.raises(NotFittedError):
        est.predict(support(1)[0])
    with pytest.raises(InvalidParameterError):
        AutoHead(cv=1).fit(*support(2))


def test_saved_file_is_the_chosen_classifier_with_the_choice(tmp_path):
    X, y = support(5)
    clf = AutoHead().fit(X, y)
    clf.save(tmp_path / "auto.safetensors", {"method": "auto"})
    back = calm.load(tmp_path / "auto.safetensors")
    assert type(back) is type(clf.estimator_)
    assert back.metadata_["method"] == "auto" and back.metadata_["selection"] == json.loads(
        json.dumps(clf.selection_)
    )
    np.testing.assert_allclose(back.predict_proba(X), clf.predict_proba(X), rtol=0, atol=1e-6)


def test_the_chosen_classifier_is_fitted_with_the_reject_option_and_calibration(tmp_path):
    rng = np.random.default_rng(7)
    centres = rng.normal(size=(3, 6, 8))
    X = np.concatenate([c + 0.3 * rng.normal(size=(6, 6, 8)) for c in centres]).astype(np.float32)
    y = np.repeat(["dog", "rain", "siren"], 6)
    far = (-centres.mean(0) + 0.3 * rng.normal(size=(3, 6, 8))).astype(np.float32)  # no class's
    clf = AutoHead(unknown=0.9, unknown_label="none", keep_support=True).fit(X, y)
    params = {"unknown": 0.9, "unknown_label": "none", "keep_support": True}
    direct = methods.build(clf.chosen_, {**methods.info(clf.chosen_).defaults(), **params}).fit(X, y)
    Xq = np.concatenate([centres + 0.3 * rng.normal(size=(3, 6, 8)), far]).astype(np.float32)
    np.testing.assert_array_equal(clf.predict(Xq), direct.predict(Xq))
    np.testing.assert_array_equal(clf.known_score(Xq), direct.known_score(Xq))
    assert clf.predict_set(Xq, 0.2) == direct.predict_set(Xq, 0.2)
    assert list(clf.predict(far)) == ["none"] * 3
    clf.save(tmp_path / "auto.safetensors")
    back = calm.load(tmp_path / "auto.safetensors")
    assert back.unknown == 0.9 and back.keep_support and list(back.predict(far)) == ["none"] * 3
    bare = AutoHead(calibration=None).fit(X, y)
    assert bare.estimator_.calibration is None and not hasattr(bare.estimator_, "temperature_")


def test_auto_is_registered_and_not_run_by_default():
    assert "auto" in methods.fit_methods() and "auto" in methods.audio_methods()
    assert "auto" not in FEWSHOT_METHODS and "auto" not in EvalConfig.methods
    assert isinstance(methods.build("auto"), AutoHead)


def test_run_evaluation_records_the_choice_of_each_episode(store, tmp_path):  # noqa: F811
    from calm.store import load_features

    folder, _, _ = store
    config = EvalConfig(out=tmp_path / "run", features=folder, shots=[1, 3], seeds=[0, 1], methods=["auto"])
    doc = json.loads(run_evaluation(config).results_json.read_text())
    X, y, meta = load_features(folder)
    eps = episodes(np.asarray(y), make_parts(meta, config.test_fold)[0], [1, 3], [0, 1])
    assert len(doc["runs"]) == len(eps) == 4
    for run in doc["runs"]:
        (ep,) = [e for e in eps if (e.shots, e.seed) == (run["shots"], run["seed"])]
        expected = AutoHead().fit(np.asarray(X[ep.support], dtype=np.float32), ep.support_y)
        assert run["tuning"]["selection"] == json.loads(json.dumps(expected.selection_))
        assert (run["tuning"]["selection"]["cv_folds"] == 0) == (run["shots"] == 1)


def test_cli_fit_evaluate_and_audio_classifier_take_auto(store, tmp_path):  # noqa: F811
    from calm.cli import main
    from calm.store import load_features

    folder, fake, queries = store
    X, y, meta = load_features(folder)
    direct = AutoHead().fit(np.asarray(X, dtype=np.float32), y)
    Xq = fake.extract([fake.load_input(p) for p in queries])
    out = tmp_path / "fit.safetensors"
    result = CliRunner().invoke(main, ["fit", str(folder), "--method", "auto", "--out", str(out)])
    assert result.exit_code == 0, result.output
    saved = calm.load(out)
    assert saved.metadata_["method"] == "auto" and saved.metadata_["selection"]["chosen"] == direct.chosen_
    np.testing.assert_allclose(saved.predict_proba(Xq), direct.predict_proba(Xq), rtol=0, atol=1e-6)

    run = tmp_path / "eval"
    args = ["evaluate", "--features", str(folder), "--shots", "2", "--seeds", "1", "--methods", "auto,sav"]
    result = CliRunner().invoke(main, [*args, "--no-figures", "--out", str(run)])
    assert result.exit_code == 0, result.output
    doc = json.loads((run / "results.json").read_text())
    assert {r["method"] for r in doc["runs"]} == {"auto", "sav"}
    assert all("selection" in r["tuning"] for r in doc["runs"] if r["method"] == "auto")

    reject = tmp_path / "reject.safetensors"
    result = CliRunner().invoke(
        main, ["fit", str(folder), "--method", "auto", "--unknown", "0.9", "--out", str(reject)]
    )
    assert result.exit_code == 0 and "reject option" in result.output, result.output
    assert calm.load(reject).unknown == 0.9

    # last: the classifier's cache adds the unlabelled query clips to the store
    audio = AudioClassifier("npy-test", "auto", cache=folder).fit(list(meta["path"]), list(y))
    assert audio.selection_ == direct.selection_ and type(audio.classifier_) is type(direct.estimator_)
    np.testing.assert_allclose(audio.predict_proba(queries), direct.predict_proba(Xq), rtol=0, atol=1e-6)
    audio.save(tmp_path / "audio.safetensors")
    back = AudioClassifier.load(tmp_path / "audio.safetensors", cache=folder)
    assert back.method == "auto" and back.classifier_.metadata_["selection"] == json.loads(
        json.dumps(direct.selection_)
    )
    np.testing.assert_allclose(back.predict_proba(queries), direct.predict_proba(Xq), rtol=0, atol=1e-6)
