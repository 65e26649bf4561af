"""`calm.AudioClassifier`: a few-shot classifier over audio, from clips to labels in one object.

    clf = calm.AudioClassifier("whisper-tiny.en", method="calm", cache="features/")
    clf.fit(["dog1.wav", "dog2.wav", "rain1.wav", "rain2.wav"], ["dog", "dog", "rain", "rain"])
    clf.predict(["unknown.wav", (waveform, 16000), {"array": a, "sampling_rate": 48000}])
    clf.save("dog-rain.safetensors")   # `calm predict dog-rain.safetensors FILES...` reads it too

X is a list of clips: paths, `(waveform, sample_rate)` tuples, bare waveforms with `sample_rate=`,
or Hugging Face audio dicts (`calm.audio_inputs`). `fit` extracts per-head features with the frozen
model (`calm.load_extractor(model, device=..., **model_options)`) and fits SAV, CALM-global or
CALM (`method`, with `**method_params` for `calm.SAV` / `calm.CALM`); `method="calm+st"` (or
`sav+st`, `calm-global+st`) also self-trains on unlabelled clips, `fit(X, y, X_unlabelled=[...])`,
with `self_training={...}` for `calm.selftraining.SelfTraining`. With `cache=FOLDER` files go
through the feature store there, so a second fit or predict on the same files extracts nothing;
waveforms are never cached (the store keys features by file path and content hash). The cache
stores no labels (a clip's features do not depend on them): it is not a training set for `calm fit`.

Bad clips: `fit` refuses any, with a `ClipError` naming each clip and its reason. `predict` and
`predict_proba` take `errors="raise"` (default, the same `ClipError`) or `errors="skip"`: the other
clips are classified, a failed clip gets the label None (the labels are then an object array) and a
row of NaN probabilities, and a `ClipWarning` lists each failed clip with its reason.

`save(path)` writes the fitted `calm.SAV` / `calm.CALM` in the `calm fit` format (safetensors + JSON
header; the metadata names the model, prompt, heads, layers, backend options and extraction key),
so `calm predict` takes the file and `calm.load(path)` returns that feature-level estimator.
`AudioClassifier.load(path)` rebuilds the audio classifier (also from files `calm fit` wrote).
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

from calm.audio_inputs import as_inputs
from calm.clip_features import CACHE_DTYPE, clip_features
from calm.methods import DEFAULT_METHOD, SELF_TRAINED, audio_methods, build, method_of

DEFAULT_MODEL = "whisper-tiny.en"
#: few-shot methods; `+st`: self-trained on unlabelled clips given to `fit` (calm.selftraining)
METHODS = audio_methods()
ERRORS = ("raise", "skip")


class ClipError(ValueError):
    """Clips that could not be used; `failures` lists "name: reason" strings."""

    def __init__(self, failures: list[str]):
        self.failures = list(failures)
        head = (
            failures[0]
            if len(failures) == 1
            else f"{len(failures)} clips failed:\n  " + "\n  ".join(failures)
        )
        super().__init__(head)


class ClipWarning(UserWarning):
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
    method : "sav", "calm-global", "calm", or the same with "+st" (self-training on the unlabelled
        clips given to ``fit(..., X_unlabelled=...)``; `calm.selftraining.SelfTraining`).
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
        Parameters of `calm.SAV` / `calm.CALM` (`k`, `tau_p`, `tau_w`, ...).

    Attributes
    ----------
    classifier_ : the fitted `calm.SAV` / `calm.CALM` (for "+st", the one fitted in the last round,
    on the support and pseudo-labelled clips); self_training_ : the fitted `SelfTraining` ("+st" only:
    `pseudo_labels_`, `added_per_class_`, ...); classes_ ; head_names_ ; extraction_key_.

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
        if self.device:
            return self.device
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"

    def _get_extractor(self):
        """The frozen model, loaded on first use and kept (not a parameter, not fitted state)."""
        wanted = (
            self.model,
            json.dumps(self.model_options or {}, sort_keys=True, default=str),
            self._device(),
        )
        cached = self.__dict__.get("_extractor")
        if cached is None or cached[0] != wanted:
            from calm.models import load_extractor

            extractor = load_extractor(self.model, device=self._device(), **(self.model_options or {}))
            self.__dict__["_extractor"] = (wanted, extractor)
        return self.__dict__["_extractor"][1]

    def __getstate__(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k != "_extractor"}

    # -- features --------------------------------------------------------------------------------

    def _features(
        self, X: Any, sample_rate: int | None, errors: str
    ) -> tuple[np.ndarray, list[int], list[str]]:
        """(features of the usable clips (m, K, d), their indices in X, "name: reason" failures)."""
        if errors not in ERRORS:
            raise ValueError(f"errors={errors!r}: use one of {ERRORS}")
        clips = as_inputs(X, sample_rate)
        extractor = self._get_extractor()
        if hasattr(self, "extraction_key_"):
            _check_key(self.extraction_key_, extractor.key, self.model)
        rows, failures = clip_features(extractor, clips, cache=self.cache, batch_size=self.batch_size)
        messages = [failures[i] for i in sorted(failures)]
        if messages and errors == "raise":
            raise ClipError(messages)
        ok = sorted(rows)
        shape = (0, len(extractor.head_names), 0)
        feats = np.stack([rows[i] for i in ok]) if ok else np.zeros(shape, dtype=np.float32)
        return feats, ok, messages

    # -- scikit-learn API ------------------------------------------------------------------------

    def fit(
        self, X: Any, y: Any, *, X_unlabelled: Any = None, sample_rate: int | None = None
    ) -> AudioClassifier:
        """Extract the features of the support clips X and fit the head classifier on labels y;
        the "+st" methods also pseudo-label the clips `X_unlabelled` (never their labels: they
        have none) and refit on them (`calm.selftraining.SelfTraining`)."""
        self._validate_params()
        y = np.asarray(y)
        if y.ndim != 1 or len(y) != len(X):
            raise ValueError(f"y must be 1-D with one label per clip: {len(X)} clips, y of shape {y.shape}")
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
        feats, _, _ = self._features(X, sample_rate, "raise")
        base = head_classifier(self.method, self.method_params)
        if self_trained:
            from calm.selftraining import SelfTraining

            pool, _, _ = self._features(X_unlabelled, sample_rate, "raise")
            st = SelfTraining(base, **(self.self_training or {})).fit(feats, y, X_unlabelled=pool)
            self.self_training_, self.classifier_ = st, st.estimator_
        else:
            self.classifier_ = base.fit(feats, y)
        extractor = self._get_extractor()
        self.classes_ = self.classifier_.classes_
        self.head_names_ = [tuple(h) for h in extractor.head_names]
        self.extraction_key_ = json.loads(json.dumps(extractor.key))
        self.n_support_ = len(y)
        return self

    def predict_proba(self, X: Any, *, sample_rate: int | None = None, errors: str = "raise") -> np.ndarray:
        """Class probabilities (n, C); with errors="skip" a failed clip's row is NaN."""
        check_is_fitted(self, "classifier_")
        feats, ok, failures = self._features(X, sample_rate, errors)
        proba = np.full((len(X), len(self.classes_)), np.nan)
        if ok:
            proba[ok] = self.classifier_.predict_proba(feats)
        _warn(failures)
        return proba

    def predict(self, X: Any, *, sample_rate: int | None = None, errors: str = "raise") -> np.ndarray:
        """Labels (n,); with errors="skip" an object array holding None for each failed clip."""
        check_is_fitted(self, "classifier_")
        feats, ok, failures = self._features(X, sample_rate, errors)
        labels = self.classifier_.predict(feats) if ok else np.asarray([], dtype=self.classes_.dtype)
        _warn(failures)
        if errors == "raise":
            return labels
        out = np.full(len(X), None, dtype=object)
        out[ok] = labels.tolist()
        return out

    def score(self, X: Any, y: Any, sample_weight: Any = None, *, sample_rate: int | None = None) -> float:
        """Accuracy on clips X with labels y (every clip must be usable)."""
        pred = self.predict(X, sample_rate=sample_rate)
        hits = (pred == np.asarray(y)).astype(np.float64)
        return float(np.average(hits, weights=sample_weight))

    # -- files -----------------------------------------------------------------------------------

    def metadata(self) -> dict[str, Any]:
        """What `calm predict` and `AudioClassifier.load` need, in `calm fit`'s layout."""
        check_is_fitted(self, "classifier_")
        key = self.extraction_key_
        return {
            "model": self.model,
            "prompt": key.get("prompt"),
            "heads": key.get("heads"),
            "layers": key.get("layers"),
            "options": key.get("options") or {},
            "extraction_key": {"extractor": key, "dtype": CACHE_DTYPE},
            "head_names": [list(h) for h in self.head_names_],
            "method": self.method,
            "params": self.classifier_.get_params(),
            "method_params": dict(self.method_params),
            "self_training": dict(self.self_training or {}) or None,
            "model_options": dict(self.model_options or {}),
            "shots": None,
            "seed": None,
            "holdout": False,
            "n_support": int(self.n_support_),
            "store": str(Path(self.cache).absolute()) if self.cache else None,
            "fitted_by": "calm.AudioClassifier",
        }

    def save(self, path: str | Path) -> None:
        """Write the fitted classifier to `path` (one safetensors file, `calm fit`'s format)."""
        self.classifier_.save(path, metadata=self.metadata())

    @classmethod
    def load(cls, path: str | Path, *, cache: str | Path | None = None, device: str | None = None):
        """An `AudioClassifier` from a file written by `save` or by `calm fit`."""
        from calm.classifiers import load

        inner = load(path)
        meta = dict(inner.metadata_)
        if not meta.get("model"):
            raise ValueError(f"{path}: the classifier's metadata names no model (fit it with calm fit)")
        options = meta.get("model_options")
        if options is None:  # written by `calm fit`: rebuild the load options from its fields
            options = {k: meta[k] for k in ("prompt", "heads", "layers") if meta.get(k) is not None}
            options.update(meta.get("options") or {})
        method = meta.get("method") or method_of(inner)
        params = meta.get("method_params", meta.get("params") or {})
        est = cls(meta["model"], method, model_options=options, cache=cache, device=device, **params)
        est.self_training = meta.get("self_training")
        est.classifier_ = inner
        est.classes_ = inner.classes_
        est.head_names_ = [tuple(h) for h in meta.get("head_names") or []]
        key = meta.get("extraction_key") or {}
        est.extraction_key_ = key.get("extractor", key)
        est.n_support_ = int(meta.get("n_support") or int(np.sum(inner.class_counts_)))
        return est


def _check_key(stored: dict[str, Any], now: dict[str, Any], model: str) -> None:
    now = json.loads(json.dumps(now))
    diff = sorted(k for k in set(stored) | set(now) if k != "dtype" and stored.get(k) != now.get(k))
    if diff:
        raise ValueError(
            f"{model}: the extractor differs from the one the classifier was fitted on in {diff}"
        )


def _warn(failures: list[str]) -> None:
    if failures:
        warnings.warn(
            f"{len(failures)} clip(s) skipped:\n  " + "\n  ".join(failures), ClipWarning, stacklevel=3
        )
