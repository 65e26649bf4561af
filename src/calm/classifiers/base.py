"""What SAV and CALM share: parameter declarations, fitting the class centroids (Eq. 1), checked and
chunked queries, labels, and their fitted state as a file (save, load, the estimator registry).

A head classifier subclass declares its extra parameters in ``_parameter_constraints`` (checked by
scikit-learn in ``fit``), fits its heads in ``_fit_heads``, builds its predict-time tensors from
the fitted state in ``_prepare`` (called at the end of ``fit`` and of loading, never by predict),
and lists the fitted arrays it saves in ``_state_specs``. Saving turns the state into a
:class:`calm.serialization.SavedClassifier`; loading reads one, looks the estimator up in
:data:`ESTIMATORS` (filled by :func:`register`) and calls its ``_from_state``.
"""

from __future__ import annotations

from numbers import Integral, Real
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import numpy as np
import torch
from sklearn.base import BaseEstimator, ClassifierMixin, _fit_context
from sklearn.utils._param_validation import Interval, RealNotInt
from sklearn.utils.validation import check_is_fitted

from calm import _heads as H
from calm.classifiers.features import Features, chunk_rows, encode_labels, labels_array, ndim
from calm.classifiers.kernels import unit_layout
from calm.serialization import SavedClassifier, TensorSpec, check_tensors, read_classifier, write_classifier

__all__ = ["ESTIMATORS", "HeadClassifier", "load", "register"]

#: Estimator classes by the name written into files.
ESTIMATORS: dict[str, type[HeadClassifier]] = {}

_C = TypeVar("_C", bound="type[HeadClassifier]")
_Self = TypeVar("_Self", bound="HeadClassifier")

_POSITIVE_INT = Interval(Integral, 1, None, closed="left")


def register(cls: _C) -> _C:
    """Class decorator: files naming ``cls.__name__`` load as ``cls``."""
    ESTIMATORS[cls.__name__] = cls
    return cls


# scikit-learn ships no type information: its bases and `_fit_context` are Any to mypy
class HeadClassifier(ClassifierMixin, BaseEstimator):  # type: ignore[misc]
    """Shared fit/predict plumbing: centroids (Eq. 1), chunked queries, labels, saving.

    Subclasses set the parameters k, tau_p, n_heads, classes and chunk_size in ``__init__``."""

    k: Any
    tau_p: float
    n_heads: int | None
    classes: Any
    chunk_size: int | None

    _parameter_constraints: ClassVar[dict[str, list[Any]]] = {
        "k": [_POSITIVE_INT, Interval(RealNotInt, 0, 1, closed="right"), None],
        "tau_p": [Interval(Real, 0, np.inf, closed="neither")],
        "n_heads": [_POSITIVE_INT, None],
        "classes": ["array-like", None],
        "chunk_size": [_POSITIVE_INT, None],
    }

    # -- fitting --------------------------------------------------------------------------------

    @_fit_context(prefer_skip_nested_validation=True)  # type: ignore[untyped-decorator]
    def fit(self: _Self, X: Any, y: Any) -> _Self:
        """Fit on support features X (n, K, d) (or flattened with ``n_heads``) and labels y."""
        feats = Features(X, n_heads=self.n_heads)
        classes, y_idx = encode_labels(y, self.classes, feats.n)
        C, K, d = len(classes), feats.K, feats.d
        k = H.resolve_k(self.k, K)
        dtype = feats.dtype
        rows = chunk_rows(self.chunk_size, K, d, C, torch.finfo(dtype).bits // 8)
        y_t = torch.from_numpy(y_idx)
        counts = torch.bincount(y_t, minlength=C)
        sums = torch.zeros((C, K, d), dtype=dtype)
        for start, xb in feats.chunks(rows, dtype):  # Eq. 1, accumulated chunk by chunk
            sums.index_add_(0, y_t[start : start + len(xb)], xb)
        centroids = sums / counts.to(dtype)[:, None, None]
        del sums
        self.classes_ = classes
        self.class_counts_ = counts.numpy()
        self.n_heads_, self.head_dim_, self.n_features_in_ = K, d, K * d
        self.k_ = k
        self.centroids_ = centroids.numpy()
        self.metadata_: dict[str, Any] = {}
        unit = unit_layout(centroids)  # (K, d, C)
        self._fit_heads(feats, y_t, counts, rows, dtype, unit)
        self._prepare(unit)
        return self

    def _fit_heads(
        self,
        feats: Features,
        y_t: torch.Tensor,
        counts: torch.Tensor,
        rows: int,
        dtype: torch.dtype,
        unit: torch.Tensor,
    ) -> None:
        """Fit the head ranking / weights from the support chunks (``unit``: (K, d, C) centroids)."""
        raise NotImplementedError

    def _prepare(self, unit: torch.Tensor) -> None:
        """Build the predict-time tensors from the fitted state (``unit``: (K, d, C) centroids)."""
        raise NotImplementedError

    # -- predict paths --------------------------------------------------------------------------

    def _query(self, X: Any) -> Features:
        check_is_fitted(self)
        feats = Features(X, n_heads=self.n_heads_ if ndim(X) == 2 else None)
        if (feats.K, feats.d) != (self.n_heads_, self.head_dim_):
            raise ValueError(
                f"X has {feats.K} heads x {feats.d} dims but the classifier was fitted on "
                f"{self.n_heads_} heads x {self.head_dim_} dims"
            )
        return feats

    def _dtype(self) -> torch.dtype:
        return H.compute_dtype(self.centroids_.dtype)

    def _rows(self, K: int) -> int:
        itemsize = torch.finfo(self._dtype()).bits // 8
        return chunk_rows(self.chunk_size, K, self.head_dim_, len(self.classes_), itemsize)

    def decision_function(self, X: Any) -> np.ndarray:
        """Class scores (n, C)."""
        raise NotImplementedError

    def predict(self, X: Any) -> np.ndarray:
        """Predicted labels (entries of ``classes_``); ties go to the lower class index."""
        scores = self.decision_function(X)
        labels: np.ndarray = self.classes_[np.argmax(scores, axis=1)]
        return labels

    def score(self, X: Any, y: Any, sample_weight: Any = None) -> float:
        """Accuracy of ``predict(X)`` against y."""
        y = labels_array(y)
        pred = self.predict(X)
        if len(y) != len(pred):
            raise ValueError(f"X has {len(pred)} samples but y has {len(y)} labels")
        hits = (pred == y).astype(np.float64)
        if sample_weight is None:
            return float(hits.mean())
        w = np.asarray(sample_weight, dtype=np.float64)
        return float((hits * w).sum() / w.sum())

    # -- state and files ------------------------------------------------------------------------

    @classmethod
    def _state_specs(cls, params: dict[str, Any]) -> tuple[TensorSpec, ...]:
        """The fitted arrays saved for an estimator with ``params`` (attribute = name + "_")."""
        return (TensorSpec("centroids", ("C", "K", "d")), TensorSpec("class_counts", ("C",), "i"))

    def _to_state(self, metadata: dict[str, Any] | None = None) -> SavedClassifier:
        """The fitted state as a file's contents (``metadata`` default: ``metadata_``)."""
        check_is_fitted(self)
        params = self.get_params(deep=False)
        arrays = {s.name: getattr(self, s.attr) for s in self._state_specs(params) if hasattr(self, s.attr)}
        return SavedClassifier(
            estimator=type(self).__name__,
            params=params,
            classes=self.classes_,
            n_heads=int(self.n_heads_),
            head_dim=int(self.head_dim_),
            k=int(self.k_),
            tensors={name: np.ascontiguousarray(a) for name, a in arrays.items()},
            metadata=dict(self.metadata_ if metadata is None else metadata),
        )

    @classmethod
    def _from_state(cls: type[_Self], saved: SavedClassifier, path: str | Path = "<state>") -> _Self:
        """A fitted estimator restored from ``saved``; ValueError naming ``path`` if it does not fit
        this class (bad parameters, or tensors unlike ``_state_specs``)."""
        try:
            clf = cls(**saved.params)
            clf._validate_params()
        except (TypeError, ValueError) as e:
            raise ValueError(f"{path}: bad parameters {saved.params}: {e}") from e
        specs = cls._state_specs(saved.params)
        check_tensors(saved, specs, path)
        clf.classes_ = saved.classes
        for s in specs:
            a = saved.tensors[s.name]
            setattr(clf, s.attr, a.astype(np.int64) if s.kind == "i" else a)
        clf.n_heads_, clf.head_dim_, clf.k_ = saved.n_heads, saved.head_dim, saved.k
        clf.n_features_in_ = clf.n_heads_ * clf.head_dim_
        clf.metadata_ = dict(saved.metadata)
        clf._prepare(unit_layout(torch.from_numpy(clf.centroids_)))
        return clf

    def save(self, path: str | Path, metadata: dict[str, Any] | None = None) -> None:
        """Write the fitted classifier to ``path``: safetensors tensors plus a JSON header with the
        class names, parameters, package version, feature shape and format version. ``metadata``
        (a JSON-serialisable dict; default: ``metadata_``) is stored and restored as ``metadata_``."""
        saved = self._to_state(metadata)
        try:
            check_tensors(saved, self._state_specs(saved.params), type(self).__name__)
        except ValueError as e:  # e.g. parameters changed by set_params since fit
            raise ValueError(
                f"cannot save: the fitted arrays do not match the parameters ({e}); refit"
            ) from e
        write_classifier(path, saved)


def load(path: str | Path) -> HeadClassifier:
    """Read a classifier written by ``save``; ``metadata_`` holds the stored metadata dict."""
    saved = read_classifier(path)
    cls = ESTIMATORS.get(saved.estimator)
    if cls is None:
        raise ValueError(f"{path}: unknown estimator {saved.estimator!r} (known: {sorted(ESTIMATORS)})")
    return cls._from_state(saved, path)
