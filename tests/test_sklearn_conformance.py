"""scikit-learn conformance of SAV and CALM through the 2-D adapter (`n_heads`), and the
scikit-learn tools (cross_val_score, GridSearchCV, Pipeline) on features read from a feature store.

With `n_heads=1` and `keep_support=True` every check of `parametrize_with_checks` applies and
passes; without a kept support set, the check calling `partial_fit` on a fitted estimator gets
its one-line error (an expected failure). With `n_heads=2` the
checks whose data has an odd number of features cannot be split into heads, and two-feature data
gives heads of one dimension, where a cosine similarity only sees a sign: those checks are marked as
expected failures with that reason; the others must pass.
"""

import warnings

import numpy as np
import pytest
from sklearn.exceptions import DataConversionWarning
from sklearn.metrics import accuracy_score, f1_score
from sklearn.model_selection import GridSearchCV, StratifiedKFold, cross_val_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import FunctionTransformer
from sklearn.utils.estimator_checks import parametrize_with_checks

from calm import CALM, SAV, LinearProbe

ODD = "the check's X has an odd number of features, which cannot be split into 2 heads"
ONE_DIM = "2 features make heads of 1 dimension, where a cosine similarity only sees the sign"
TWO_HEAD_FAILURES = {
    **dict.fromkeys(
        [
            "check_fit_score_takes_y",
            "check_dont_overwrite_parameters",
            "check_estimators_dtypes",
            "check_pipeline_consistency",
            "check_estimators_nan_inf",
            "check_estimators_pickle",
            "check_f_contiguous_array_estimator",
            "check_supervised_y_2d",
            "check_methods_sample_order_invariance",
            "check_methods_subset_invariance",
            "check_dict_unchanged",
            "check_fit2d_predict1d",
            "check_fit2d_1feature",
            "check_classifiers_one_label",
        ],
        ODD,
    ),
    "check_classifiers_train": ONE_DIM,
}
NO_SUPPORT = "a fitted estimator's partial_fit needs keep_support=True, off by default (a one-line error)"
#: The check calling partial_fit on a fitted estimator (it passes with keep_support=True).
PARTIAL_FIT_CHECKS = {"check_fit_score_takes_y": NO_SUPPORT}


def expected_failed_checks(estimator) -> dict[str, str]:
    without = {} if estimator.keep_support else PARTIAL_FIT_CHECKS
    return {**without, **TWO_HEAD_FAILURES} if estimator.n_heads == 2 else without


@parametrize_with_checks(
    [
        SAV(k=1, n_heads=1),
        SAV(k=1, n_heads=1, keep_support=True),
        CALM(k=1, n_heads=1, keep_support=True),
        CALM(k=2, n_heads=2),
        CALM(k=1, n_heads=1, scores="loo"),
        LinearProbe(n_heads=1),
    ],
    expected_failed_checks=expected_failed_checks,
)
def test_scikit_learn_checks(estimator, check):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        check(estimator)


def blobs(n_per: int = 6, classes=("a", "b"), heads: int = 4, dim: int = 3, seed: int = 0):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(len(classes), heads, dim))
    X = np.concatenate([c + 0.3 * rng.normal(size=(n_per, heads, dim)) for c in centres])
    y = np.repeat(np.array(classes, dtype=object), n_per)
    return X.reshape(len(X), -1), y


@pytest.mark.parametrize(
    "make",
    [lambda: SAV(k=2, n_heads=4), lambda: CALM(k=2, n_heads=4), lambda: LinearProbe(n_heads=4)],
    ids=["sav", "calm", "linear-probe"],
)
def test_the_named_gaps(make):
    X, y = blobs()  # object-dtype labels, two classes
    clf = make().fit(X, y)
    state = {k: (v.copy() if isinstance(v, np.ndarray) else v) for k, v in vars(clf).items()}
    decision = clf.decision_function(X)
    assert decision.shape == (len(X),)  # binary: one column, > 0 means classes_[1]
    np.testing.assert_array_equal(clf.classes_[(decision > 0).astype(int)], clf.predict(X))
    pred = clf.predict(X)
    assert accuracy_score(y, pred) == 1.0 and f1_score(y, pred, pos_label="b") == 1.0
    assert vars(clf).keys() == state.keys()  # predict changes nothing
    for k, v in vars(clf).items():
        np.testing.assert_array_equal(v, state[k]) if isinstance(v, np.ndarray) else None
    y3 = np.repeat(np.array([1, 2, 3], dtype=object), 4)  # object-dtype integers
    X3, _ = blobs(n_per=4, classes=(1, 2, 3))
    pred3 = make().fit(X3, y3).predict(X3)
    assert pred3.dtype.kind == "i" and accuracy_score(y3.astype(int), pred3) == 1.0
    with pytest.warns(DataConversionWarning, match="column-vector y"):
        make().fit(X, y.reshape(-1, 1))
    with pytest.raises(ValueError, match="Unknown label type"):
        make().fit(X, np.linspace(0, 1, len(X)))


@pytest.fixture
def stored(tmp_path):
    """(X, y) from a real feature store (the fake extractor of test_store over WAV files)."""
    from calm.store import extract_to_store, load_features
    from tests.test_store import FakeExtractor, make_clips

    clips = make_clips(tmp_path / "audio", n=18)
    extract_to_store(FakeExtractor(), clips, tmp_path / "store", batch_size=4, progress=False)
    X, y, _ = load_features(tmp_path / "store")
    return X, np.asarray(y)


def test_scikit_learn_tools_on_stored_features(stored):
    X3, y = stored
    n, K, d = X3.shape
    X = np.asarray(X3).reshape(n, K * d)  # the 2-D adapter: n_heads splits the rows again
    cv = StratifiedKFold(n_splits=3, shuffle=True, random_state=0)
    for est in (SAV(k=0.5, n_heads=K), CALM(k=0.5, n_heads=K)):
        scores = cross_val_score(est, X, y, cv=cv)
        assert scores.shape == (3,) and np.all((scores >= 0) & (scores <= 1))
    grid = {"k": [0.25, 0.5], "tau_p": [0.03, 0.1], "tau_w": [0.5, 2.0]}
    search = GridSearchCV(CALM(n_heads=K), grid, cv=cv).fit(X, y)
    assert len(search.cv_results_["params"]) == 8 and search.best_params_["k"] in grid["k"]
    assert set(search.predict(X)) <= set(y)
    scale = FunctionTransformer(lambda Z: Z * 3.0)  # per-head cosines do not change with scale
    pipe = make_pipeline(scale, CALM(k=0.5, n_heads=K)).fit(X, y)
    plain = CALM(k=0.5, n_heads=K).fit(X, y)
    np.testing.assert_array_equal(pipe.predict(X), plain.predict(X))
    assert pipe[-1].temperature_ == plain.temperature_
    # calibrated: score^(1 / T), so float32 rounding of the scores grows by 1 / T
    rtol = 1e-5 / min(1.0, plain.temperature_)
    np.testing.assert_allclose(pipe.predict_proba(X), plain.predict_proba(X), rtol=rtol, atol=1e-6)
