"""`calm.AudioClassifier`: a few-shot classifier over audio, from clips to labels in one object.

    clf = calm.AudioClassifier("whisper-tiny.en", method="calm", cache="features/")
    clf.fit(["dog1.wav", "dog2.wav", "rain1.wav", "rain2.wav"], ["dog", "dog", "rain", "rain"])
    clf.predict(["unknown.wav", (waveform, 16000), {"array": a, "sampling_rate": 48000}])
    clf.save("dog-rain.safetensors")   # `calm predict dog-rain.safetensors FILES...` reads it too

X is a list of clips: paths, `(waveform, sample_rate)` tuples, bare waveforms with `sample_rate=`,
or Hugging Face audio dicts, decoded and checked like `calm predict` and `calm serve` do
(`calm.audio_inputs`; the same pipeline, `calm.inference.Predictor`, labels them). `fit` extracts
per-head features with the frozen model (`calm.models.spec.LoadSpec.from_options(model,
model_options, device=...)`) and fits SAV, CALM-global, CALM or the linear probe (`method`, with
`**method_params` for `calm.SAV` / `calm.CALM` / `calm.LinearProbe`); a method with the suffix
`+st` (`calm.methods.SELF_TRAINED`) also self-trains on unlabelled clips, `fit(X, y, X_unlabelled=[...])`,
with `self_training={...}` for `calm.selftraining.SelfTraining`. With `cache=FOLDER` files go
through the feature store there, so a second fit or predict on the same files extracts nothing;
waveforms are never cached (the store keys features by file path and content hash). The cache
stores no labels (a clip's features do not depend on them): it is not a training set for `calm fit`.
With `keep_support=True` (a method parameter), `partial_fit(X, y)` adds clips or classes later,
extracting only X (`calm.classifiers.support`).

Bad clips: `fit` refuses any, with a `ClipError` naming each clip and its reason. `predict` and
`predict_proba` take `errors="raise"` (default, the same `ClipError`) or `errors="skip"`: the other
clips are classified, a failed clip gets the label None (the labels are then an object array) and a
row of NaN probabilities, and a `ClipWarning` lists each failed clip with its reason.

`save(path)` writes the fitted `calm.SAV` / `calm.CALM` in the `calm fit` format (safetensors + JSON
header; the metadata is the model's `LoadSpec.to_metadata()` plus the extraction key), so `calm
predict` takes the file and `calm.load(path)` returns that feature-level estimator.
`AudioClassifier.load(path)` rebuilds the audio classifier (also from files `calm fit` wrote) with
the same model, checked against the stored key (`calm.models.spec.check_key`).
"""

from __future__ import annotations

import json
import warnings
from numbers import Integral
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.utils._param_validation import Interval, StrOptions
from sklearn.utils.validation import check_is_fitted

from calm.audio_classifier_files import auto_device, metadata_of, read
from calm.audio_inputs import ClipError
from calm.classifiers import rejection
from calm.clip_features import ClipFeatures, FeaturePipeline
from calm.detection import DEFAULT_HOP, DEFAULT_WINDOW, Detection, detect
from calm.errors import CalmWarning, ParameterError
from calm.inference import Predictor
from calm.methods import DEFAULT_METHOD, EXPLAIN_HEADS, SELF_TRAINED, audio_methods, build
from calm.models import DEFAULT_MODEL
from calm.models.base import FeatureExtractor
from calm.models.spec import LoadSpec, check_key

#: few-shot methods; `+st`: self-trained on unlabelled clips given to `fit` (calm.selftraining)
METHODS = audio_methods()
ERRORS = ("raise", "skip")
__all__ = ["AudioClassifier", "ClipError", "ClipWarning", "head_classifier"]


class ClipWarning(CalmWarning):
    """Clips skipped by `predict(..., errors="skip")`, each with its reason."""


def head_classifier(method: str, params: dict[str, Any]):
    """An unfitted `calm.SAV` / `calm.CALM` for `method` with `params` (ValueError names bad ones)."""
    if method not in METHODS:
        raise ValueError(f"method={method!r}: use one of {METHODS}")
    return build(method.removesuffix(SELF_TRAINED), params)


class AudioClassifier(ClassifierMixin, BaseEstimator):
    """Few-shot audio classifier: a frozen model's per-head features + SAV / CALM-global / CALM.

    Parameters
    ----------
    model : str
        Registered name (`whisper-tiny.en`, `clap-htsat`, `ast-audioset`, ...), hub id or local
        checkpoint directory (`calm.load_extractor`).
    method : one of `calm.methods.audio_methods()`: a saveable method, or the same with "+st"
        (self-training on the unlabelled clips given to ``fit(..., X_unlabelled=...)``;
        `calm.selftraining.SelfTraining`).
    model_options : dict or None
        Keyword arguments of `calm.load_extractor` (`prompt`, `heads`, `layers`, `dtype`, `long`,
        backend options such as Whisper's `encoder_length`).
    cache : str, Path or None
        Feature store folder for files (None: no cache).
    device : str or None
        torch device (None: "cuda" when available, else "cpu").
    batch_size : int
        Clips per forward pass.
    self_training : dict or None
        Parameters of `calm.selftraining.SelfTraining` for the "+st" methods (`rounds`,
        `per_round`, ...; None: its defaults).
    **method_params
        Parameters of `calm.SAV` / `calm.CALM` (`k`, `tau_p`, `tau_w`, ...) or `calm.LinearProbe`
        (`C`, `max_iter`, ...); `keep_support=True`
        keeps the support clips' features in the classifier (and in the file `save` writes), so
        that `partial_fit` can add clips or classes later without extracting the earlier ones.

    Attributes
    ----------
    classifier_ : the fitted `calm.SAV` / `calm.CALM` / `calm.LinearProbe` (for "+st", the one
    fitted in the last round, on the support and pseudo-labelled clips; for "auto", the one it
    chose, as a saved file loads); self_training_ : the fitted `SelfTraining` ("+st" only:
    `pseudo_labels_`, `added_per_class_`, ...); selection_ : what "auto" chose and why
    (`AutoHead.selection_`, also in the saved file's metadata); classes_ ; head_names_ ;
    extraction_key_.

    Examples
    --------
    Nothing is loaded until ``fit``; the method's parameters are the estimator's own:

    >>> from calm import AudioClassifier
    >>> clf = AudioClassifier("whisper-tiny.en", method="calm", k=0.25)
    >>> clf.get_params()["k"], clf.get_params()["method"]
    (0.25, 'calm')
    >>> clf.fit(["dog1.wav", "rain1.wav"], ["dog", "rain"])  # doctest: +SKIP
    >>> clf.predict(["query.wav"])  # doctest: +SKIP
    array(['dog'], dtype=object)

    More clips or classes later, extracting only the new clips (the result equals ``fit`` on all
    of them; classes stay sorted as ``fit`` sorts them):

    >>> clf = AudioClassifier("whisper-tiny.en", method="calm", keep_support=True)
    >>> clf.get_params()["keep_support"]
    True
    >>> clf.fit(["dog1.wav", "rain1.wav"], ["dog", "rain"])  # doctest: +SKIP
    >>> clf.partial_fit(["bird1.wav", "dog2.wav"], ["bird", "dog"]).classes_  # doctest: +SKIP
    array(['bird', 'dog', 'rain'], dtype='<U4')
    """

    _parameter_constraints: ClassVar[dict[str, list[Any]]] = {
        "model": [str],
        "method": [StrOptions(set(METHODS))],
        "model_options": [dict, None],
        "cache": [str, Path, None],
        "device": [str, None],
        "batch_size": [Interval(Integral, 1, None, closed="left")],
        "self_training": [dict, None],
    }

    def __init__(
        self,
        model: str = DEFAULT_MODEL,
        method: str = DEFAULT_METHOD,
        *,
        model_options: dict[str, Any] | None = None,
        cache: str | Path | None = None,
        device: str | None = None,
        batch_size: int = 8,
        self_training: dict[str, Any] | None = None,
        **method_params: Any,
    ):
        self.model = model
        self.method = method
        self.model_options = model_options
        self.cache = cache
        self.device = device
        self.batch_size = batch_size
        self.self_training = self_training
        self.method_params = method_params

    # -- parameters: the method's parameters are estimator parameters too ------------------------

    def get_params(self, deep: bool = True) -> dict[str, Any]:
        return {**super().get_params(deep), **self.method_params}

    def set_params(self, **params: Any) -> AudioClassifier:
        own = set(super().get_params(deep=False))
        super().set_params(**{k: v for k, v in params.items() if k in own})
        self.method_params = {**self.method_params, **{k: v for k, v in params.items() if k not in own}}
        return self

    # -- the frozen model ------------------------------------------------------------------------

    def _device(self) -> str:
        return self.device or auto_device()

    def model_spec(self) -> LoadSpec:
        """The frozen model as the one description (`model` + `model_options` on `device`)."""
        return LoadSpec.from_options(self.model, self.model_options, device=self._device())

    def _get_extractor(self) -> FeatureExtractor:
        """The frozen model, loaded on first use and kept (not a parameter, not fitted state)."""
        spec = self.model_spec()
        cached = self.__dict__.get("_extractor")
        if cached is None or cached[0] != spec:
            from calm.models import load_extractor

            self.__dict__["_extractor"] = (spec, load_extractor(spec))
        return self.__dict__["_extractor"][1]

    def __getstate__(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k != "_extractor"}

    # -- features and the inference pipeline -----------------------------------------------------

    def _checked_extractor(self) -> FeatureExtractor:
        extractor = self._get_extractor()
        if hasattr(self, "extraction_key_"):
            check_key(self.extraction_key_, extractor.key, model=self.model)
        return extractor

    def _features(self, X: Any, sample_rate: Any) -> np.ndarray:
        """Features (n, K, d) of clips that must all be usable (ClipError names every bad one)."""
        extractor = self._checked_extractor()
        feats = FeaturePipeline(extractor).features(
            X, sample_rate=sample_rate, batch_size=self.batch_size, cache=self.cache
        )
        error = feats.error()
        if error is not None:
            raise error
        return feats.stacked(len(extractor.head_names))[0]

    def _run(
        self, X: Any, sample_rate: Any, errors: str
    ) -> tuple[Predictor, np.ndarray, np.ndarray | None, ClipFeatures]:
        """The inference pipeline of `calm predict` over X: (predictor, probabilities, known scores
        (None without a reject option), features)."""
        check_is_fitted(self, "classifier_")
        if errors not in ERRORS:
            raise ValueError(f"errors={errors!r}: use one of {ERRORS}")
        predictor = Predictor(self.classifier_, self._checked_extractor())
        proba, known, feats = predictor.scored(
            X, sample_rate=sample_rate, batch_size=self.batch_size, cache=self.cache
        )
        error = feats.error()
        if error is not None:
            if errors == "raise":
                raise error
            warnings.warn(
                f"{len(error.failures)} clip(s) skipped:\n  " + "\n  ".join(error.failures),
                ClipWarning,
                stacklevel=3,
            )
        return predictor, proba, known, feats

    # -- scikit-learn API ------------------------------------------------------------------------

    def fit(self, X: Any, y: Any, *, X_unlabelled: Any = None, sample_rate: Any = None) -> AudioClassifier:
        """Extract the features of the support clips X and fit the head classifier on labels y;
        the "+st" methods also pseudo-label the clips `X_unlabelled` (never their labels: they
        have none) and refit on them (`calm.selftraining.SelfTraining`)."""
        self._validate_params()
        y = _labels(X, y)
        for name in [k for k in vars(self) if k.endswith("_") and not k.startswith("_")]:
            delattr(self, name)  # refit from scratch: no key check against a previous model
        self_trained = self.method.endswith("+st")
        if self_trained != (X_unlabelled is not None):
            raise ValueError(
                f"method={self.method!r}: "
                + (
                    "give the unlabelled clips with X_unlabelled="
                    if self_trained
                    else "X_unlabelled is only for '+st' methods"
                )
            )
        feats = self._features(X, sample_rate)
        base = head_classifier(self.method, self.method_params)
        if self_trained:
            from calm.selftraining import SelfTraining

            pool = self._features(X_unlabelled, sample_rate)
            st = SelfTraining(base, **(self.self_training or {})).fit(feats, y, X_unlabelled=pool)
            self.self_training_, self.classifier_ = st, st.estimator_
        else:
            fitted = base.fit(feats, y)
            self.classifier_ = getattr(fitted, "estimator_", fitted)  # "auto": the one it chose
            if fitted is not self.classifier_:
                self.selection_ = fitted.selection_
        extractor = self._get_extractor()
        self.classes_ = self.classifier_.classes_
        self.head_names_ = [tuple(h) for h in extractor.head_names]
        self.extraction_key_ = json.loads(json.dumps(extractor.key, default=str))
        self.n_support_ = len(y)
        return self

    def partial_fit(self, X: Any, y: Any, *, sample_rate: Any = None) -> AudioClassifier:
        """Add labelled clips X of known or new classes y without extracting the earlier ones
        again: their features go to ``classifier_.partial_fit`` (fitted, or loaded, with
        ``keep_support=True``; else its one-line error); the result equals ``fit`` on all the
        clips (`calm.classifiers.support`). Not for the "+st" methods."""
        check_is_fitted(self, "classifier_")
        if self.method.endswith(SELF_TRAINED):
            raise ParameterError(
                f"method={self.method!r}: partial_fit is not available for self-trained methods"
            )
        y = _labels(X, y)
        self.classifier_.partial_fit(self._features(X, sample_rate), y)
        self.classes_ = self.classifier_.classes_
        self.n_support_ = int(np.sum(self.classifier_.class_counts_))
        return self

    @property
    def reject_option_(self) -> dict[str, Any] | None:
        """How the fitted classifier rejects (`unknown=`; None without it): the accept rate, the
        label, the known score (`unknown_score=`) and its threshold, as `calm serve`'s /info
        gives them (`calm.classifiers.rejection.reject_info`)."""
        check_is_fitted(self, "classifier_")
        return rejection.reject_info(self.classifier_)

    def predict_proba(self, X: Any, *, sample_rate: Any = None, errors: str = "raise") -> np.ndarray:
        """Class probabilities (n, C); with errors="skip" a failed clip's row is NaN."""
        return self._run(X, sample_rate, errors)[1]

    def predict(self, X: Any, *, sample_rate: Any = None, errors: str = "raise") -> np.ndarray:
        """Labels (n,), as `calm predict` gives them (the classifier's `unknown_label` for clips its
        reject option, `unknown=`, rejects); with errors="skip" an object array holding None for
        each failed clip."""
        predictor, proba, known, feats = self._run(X, sample_rate, errors)
        ok = [i for i in range(len(feats.sources)) if i not in feats.errors]
        rows = predictor.labels(proba[ok], None if known is None else known[ok])  # "unknown" where rejected
        found = dict(zip(ok, rows, strict=True))
        labels = [found.get(i) for i in range(len(feats.sources))]
        if errors == "raise":
            unknown = getattr(self.classifier_, "unknown_label", None)
            return np.asarray(labels, dtype=None if unknown in labels else self.classes_.dtype)
        out = np.full(len(labels), None, dtype=object)
        out[:] = [None if lab is None else np.asarray(lab).item() for lab in labels]
        return out

    def explain(self, X: Any, *, top: int = EXPLAIN_HEADS, sample_rate: Any = None) -> list[dict[str, Any]]:
        """Why each clip got its label (`calm.inference.Predictor.explanation`, as `calm predict
        --explain` gives it): every class, most probable first, with its `top` heads."""
        predictor, proba, _, feats = self._run(X, sample_rate, "raise")
        order = np.argsort(-proba, axis=1, kind="stable")
        return [
            predictor.explanation(feats.rows[i], [predictor.classes[j] for j in order[i]], top)
            for i in range(len(proba))
        ]

    def score(self, X: Any, y: Any, sample_weight: Any = None, *, sample_rate: Any = None) -> float:
        """Accuracy on clips X with labels y (every clip must be usable)."""
        pred = self.predict(X, sample_rate=sample_rate)
        hits = (pred == np.asarray(y)).astype(np.float64)
        return float(np.average(hits, weights=sample_weight))

    def detect(
        self, source: Any, *, window: float = DEFAULT_WINDOW, hop: float = DEFAULT_HOP, **options: Any
    ) -> Detection:
        """Events `(onset, offset, label, score)` of the classes in one long recording (a path,
        streamed from disk, or a waveform): sliding windows of `window` s every `hop` s through the
        same inference path as `predict`; `options` of `calm.detection.detect` (`threshold`,
        `thresholds`, `median`, `background`, `sample_rate`, `progress`). Returns a
        `calm.detection.Detection` (`.events`, per-window `.probabilities`)."""
        check_is_fitted(self, "classifier_")
        predictor = Predictor(self.classifier_, self._checked_extractor())
        options.setdefault("batch_size", self.batch_size)
        return detect(predictor, source, window=window, hop=hop, **options)

    # -- files -----------------------------------------------------------------------------------

    def metadata(self) -> dict[str, Any]:
        """What `calm predict` and `AudioClassifier.load` need (`calm.audio_classifier_files`)."""
        check_is_fitted(self, "classifier_")
        return metadata_of(self)

    def save(self, path: str | Path) -> None:
        """Write the fitted classifier to `path` (one safetensors file, `calm fit`'s format)."""
        self.classifier_.save(path, metadata=self.metadata())

    @classmethod
    def load(
        cls, path: str | Path, *, cache: str | Path | None = None, device: str | None = None
    ) -> AudioClassifier:
        """An `AudioClassifier` from a file written by `save` or by `calm fit`: the model the file
        describes (`LoadSpec.from_metadata`, as `calm predict` loads it), checked against its key
        when first used (`calm.audio_classifier_files.read`)."""
        saved = read(path, device=device)
        options = saved.model_options
        est = cls(
            saved.model, saved.method, model_options=options, cache=cache, device=device, **saved.params
        )
        est.self_training = saved.self_training
        est.classifier_ = saved.classifier
        est.classes_ = saved.classifier.classes_
        est.head_names_ = saved.head_names
        est.extraction_key_ = saved.extraction_key
        est.n_support_ = saved.n_support
        return est


def _labels(X: Any, y: Any) -> np.ndarray:
    y = np.asarray(y)
    if y.ndim != 1 or len(y) != len(X):
        raise ValueError(f"y must be 1-D with one label per clip: {len(X)} clips, y of shape {y.shape}")
    return y
