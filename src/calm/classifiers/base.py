"""What SAV and CALM share: parameter declarations, fitting the class centroids (Eq. 1), checked and
chunked queries, labels, and their fitted state as a file (save, load; the estimator registry and
older files' parameters: `calm.classifiers.files`).

A head classifier subclass declares its extra parameters in ``_parameter_constraints`` (checked by
scikit-learn in ``fit``), fits its heads in ``_fit_heads``, builds its predict-time tensors from
the fitted state in ``_prepare`` (called at the end of ``fit`` and of loading, never by predict),
and lists the fitted arrays it saves in ``_state_specs``. Saving turns the state into a
:class:`calm.serialization.SavedClassifier`; :func:`load` reads one, looks the estimator up in
:data:`calm.classifiers.files.ESTIMATORS` and calls its ``_from_state``.
"""

from __future__ import annotations

import os
from numbers import Integral, Real
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import numpy as np
import torch
from sklearn.base import BaseEstimator, ClassifierMixin, _fit_context
from sklearn.utils._param_validation import Interval, RealNotInt, StrOptions
from sklearn.utils.validation import check_is_fitted

from calm import _heads as H
from calm.classifiers import calibration, support
from calm.classifiers.explain import explain as explain_clips
from calm.classifiers.features import (
    CHUNK_BYTES,
    Features,
    chunk_rows,
    encode_labels,
    labels_array,
    ndim,
    shaped,
)
from calm.classifiers.files import ESTIMATORS, old_file_params
from calm.classifiers.kernels import READ_BYTES, check_finite, unit_layout
from calm.classifiers.threads import Workspace
from calm.errors import FeatureError
from calm.methods import EXPLAIN_HEADS, UNKNOWN_SCORES
from calm.serialization import (
    ModelFileError,
    SavedClassifier,
    TensorSpec,
    check_tensors,
    read_classifier,
    write_classifier,
)

__all__ = ["HeadClassifier", "load"]


def _one_line(e: BaseException) -> str:
    """An exception's message on one line (scikit-learn's parameter errors span several)."""
    return " ".join(str(e).split())


_Self = TypeVar("_Self", bound="HeadClassifier")

_POSITIVE_INT = Interval(Integral, 1, None, closed="left")

#: Smallest temperature accepted: 1 / tau must stay far inside float32's range on the query path.
MIN_TEMPERATURE = 1e-30


# scikit-learn ships no type information: its bases and `_fit_context` are Any to mypy
class HeadClassifier(ClassifierMixin, BaseEstimator):  # type: ignore[misc]
    """Shared fit/predict plumbing: centroids (Eq. 1), chunked queries, labels, saving.

    Subclasses set the parameters k, tau_p, n_heads, classes, chunk_size and device in ``__init__``.

    Precision: the support side (centroids, margins, reliabilities, head ranking, weights) is
    computed in float64, so the kept heads are those of the equations even where float32 would
    round margins to ties; the query side runs in float32 (float64 for float64 features), and
    ``centroids_`` are stored in that query dtype."""

    k: Any
    tau_p: float
    n_heads: int | None
    classes: Any
    chunk_size: int | None
    device: Any
    calibration: str | None
    unknown: float | None
    unknown_score: str
    unknown_label: Any

    #: whether the fit ranks / weights heads (a head map to draw, `calm.evaluate.head_maps`); the
    #: linear probe keeps every head alike
    selects_heads: ClassVar[bool] = True

    _parameter_constraints: ClassVar[dict[str, list[Any]]] = {
        "k": [_POSITIVE_INT, Interval(RealNotInt, 0, 1, closed="right"), None],
        "tau_p": [Interval(Real, MIN_TEMPERATURE, np.inf, closed="left")],
        "n_heads": [_POSITIVE_INT, None],
        "classes": ["array-like", None],
        "chunk_size": [_POSITIVE_INT, None],
        "device": [str, torch.device],
        "calibration": [StrOptions({"loo-temperature"}), None],
        "unknown": [Interval(Real, 0, 1, closed="neither"), None],
        "unknown_score": [StrOptions(set(UNKNOWN_SCORES))],
        "unknown_label": [str, Integral],
        "keep_support": ["boolean"],
    }

    # -- fitting --------------------------------------------------------------------------------

    @_fit_context(prefer_skip_nested_validation=True)  # type: ignore[untyped-decorator]
    def fit(self: _Self, X: Any, y: Any) -> _Self:
        """Fit on support features X (n, K, d) (or flattened with ``n_heads``) and labels y."""
        feats = Features(shaped(X), n_heads=self.n_heads)
        classes, y_idx = encode_labels(y, self.classes, feats.n)
        C, K, d = len(classes), feats.K, feats.d
        k = H.resolve_k(self.k, K)
        dev, dtype = torch.device(self.device), torch.float64  # the support side in float64
        rows = chunk_rows(self.chunk_size, K, d, C, 8)
        y_t = torch.from_numpy(y_idx).to(dev)
        counts = torch.bincount(y_t, minlength=C)
        sums = torch.zeros((C, K, d), dtype=dtype, device=dev)
        ws, step = Workspace(dev), max(1, READ_BYTES // (K * d * 8))
        for start, xv in feats.views(self._view_rows(feats)):  # Eq. 1, accumulated chunk by chunk
            for i in range(start, start + len(xv), step):  # converted into one small reused buffer
                xb = ws.get("x", (min(step, start + len(xv) - i), K, d), dtype).copy_(
                    xv[i - start : i - start + step]
                )
                check_finite(xb, f"{feats.name} (rows {i}..{i + len(xb) - 1})")
                sums.index_add_(0, y_t[i : i + len(xb)], xb)
        centroids = sums.div_(counts.to(dtype)[:, None, None])  # in place: one (C, K, d) float64 array
        self.classes_ = classes
        self.class_counts_ = counts.cpu().numpy()
        self.n_heads_, self.head_dim_, self.n_features_in_ = K, d, K * d
        self.k_ = k
        self.centroids_ = (
            centroids.to(feats.dtype, copy=True).cpu().numpy()
        )  # the query dtype; _fit_heads may overwrite centroids
        self.metadata_: dict[str, Any] = {}
        self._fit_heads(feats, y_t, counts, rows, centroids)  # float64
        calibration.fit_calibration(self, feats, y_idx)
        support.keep(self, feats, y_idx, self._view_rows(feats))  # keep_support: for partial_fit
        self._prepare(unit_layout(torch.from_numpy(self.centroids_)))  # as after loading
        return self

    def partial_fit(self: _Self, X: Any, y: Any, classes: Any = None) -> _Self:
        """Add clips X of known or new classes y: ``fit`` on the kept support set, then X (needs
        ``keep_support=True``; :func:`calm.classifiers.support.partial_fit`); returns self."""
        return support.partial_fit(self, X, y, classes)

    def _fit_heads(
        self,
        feats: Features,
        y_t: torch.Tensor,
        counts: torch.Tensor,
        rows: int,
        centroids: torch.Tensor,
    ) -> None:
        """Fit the head ranking / weights from the support chunks and ``centroids`` (C, K, d),
        float64 on the estimator's device (``centroids_`` holds a copy: they may be overwritten)."""
        raise NotImplementedError

    def _prepare(self, unit: torch.Tensor) -> None:
        """Build the predict-time tensors from the fitted state (``unit``: (K, d, C) centroids)."""
        raise NotImplementedError

    # -- predict paths --------------------------------------------------------------------------

    def _query(self, X: Any) -> Features:
        check_is_fitted(self)
        X = shaped(X)
        if ndim(X) == 2 and X.shape[1] != self.n_features_in_:
            raise FeatureError(
                f"X has {X.shape[1]} features, but {type(self).__name__} is expecting "
                f"{self.n_features_in_} features as input."
            )
        feats = Features(X, n_heads=self.n_heads_ if ndim(X) == 2 else None)
        if (feats.K, feats.d) != (self.n_heads_, self.head_dim_):
            raise FeatureError(
                f"X has {feats.K} heads x {feats.d} dims but the classifier was fitted on "
                f"{self.n_heads_} heads x {self.head_dim_} dims"
            )
        return feats

    def _dtype(self) -> torch.dtype:
        return H.compute_dtype(self.centroids_.dtype)

    def _device(self) -> torch.device:
        return torch.device(self.device)

    def _view_rows(self, feats: Features) -> int:
        """Rows per view of the features (:meth:`Features.views`: read without a copy where the
        input allows it, converted block by block into reused buffers): ``chunk_size``, or as many
        as keep a chunk in the stored dtype near a quarter of CHUNK_BYTES."""
        if self.chunk_size is not None:
            return int(self.chunk_size)
        itemsize = torch.finfo(feats.storage_dtype).bits // 8
        return max(1, CHUNK_BYTES // 4 // (feats.K * feats.d * itemsize))

    def _rows(self, K: int) -> int:
        itemsize = torch.finfo(self._dtype()).bits // 8
        return chunk_rows(self.chunk_size, K, self.head_dim_, len(self.classes_), itemsize)

    def class_scores(self, X: Any) -> np.ndarray:
        """Class scores (n, C)."""
        raise NotImplementedError

    def decision_function(self, X: Any) -> np.ndarray:
        """``class_scores`` (n, C); with two classes, as scikit-learn expects, shape (n,): the score of
        ``classes_[1]`` minus that of ``classes_[0]`` (> 0 predicts ``classes_[1]``)."""
        s = self.class_scores(X)
        return s[:, 1] - s[:, 0] if s.shape[1] == 2 else s

    def _proba(self, scores: np.ndarray) -> np.ndarray:
        """Uncalibrated probabilities (n, C) of class scores."""
        raise NotImplementedError

    def _log_scores(self, scores: np.ndarray) -> np.ndarray:
        """Log-scores (n, C) of class scores, a strictly increasing map (calibrated: / T, softmax)."""
        raise NotImplementedError

    def _contributions(self, cos: torch.Tensor) -> torch.Tensor:
        """Per-head parts (n, K, C) of the class scores of cosines ``cos`` (n, K, C) to the centroids."""
        raise NotImplementedError

    def _loo_scores(self, cos_in: torch.Tensor, cos_loo: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Leave-one-out class scores (n, C) of support clips of classes ``y`` from their cosines
        to the fitted centroids and to those without them (:func:`calm._calibration.loo_cosines`);
        here the fitted heads scoring the latter."""
        return self._contributions(cos_loo).sum(dim=1)

    def _held_out_log_scores(
        self, feats: Features, y_idx: np.ndarray, usable: np.ndarray
    ) -> np.ndarray | None:
        """Log-scores (n, C) of the support clips, each scored without it where ``usable`` (n,)
        (the other rows are not read), for a classifier whose held-out scores are not a function of
        the leave-one-out cosines (the linear probe refits per fold); None (here): the calibration
        takes :meth:`_loo_scores` of the cosines."""
        return None

    def _head_parts(self, x: torch.Tensor, cos: torch.Tensor) -> torch.Tensor:
        """Per-head parts (n, K, C) of the class scores of clips ``x`` (n, K, d) with cosines ``cos``
        (n, K, C) to the centroids (``explain``); here :meth:`_contributions` of the cosines."""
        return self._contributions(cos)

    def _head_weights(self) -> np.ndarray:
        """The weight (C, K) of each head in each class's score."""
        raise NotImplementedError

    def predict_proba(self, X: Any) -> np.ndarray:
        """Class probabilities (n, C): with ``calibration="loo-temperature"`` (and two or more
        support clips in some class) softmax(log score / ``temperature_``), else the uncalibrated
        ones (:mod:`calm.classifiers.calibration`); the argmax is ``predict``'s either way."""
        return calibration.proba(self, self.class_scores(X))

    def predict_set(self, X: Any, alpha: float = 0.1) -> list[list[Any]]:
        """Conformal prediction sets: per clip, the classes that cannot be excluded at level
        ``alpha`` (the true class is in the set with probability about 1 - alpha for clips
        exchangeable with the support set); an empty set means none fits (unknown)."""
        check_is_fitted(self)
        return calibration.predict_set(self, X, alpha)

    def explain(self, X: Any, top: int = EXPLAIN_HEADS) -> list[dict[str, Any]]:
        """Per clip, the class scores and probabilities and, per class, the ``top`` heads that
        carried its score (layer / head when ``metadata_["head_names"]`` has them, weight,
        similarity, contribution), as plain JSON-ready dicts."""
        check_is_fitted(self)
        return explain_clips(self, X, top)

    def known_score(self, X: Any) -> np.ndarray:
        """Each clip's known score (n,) by ``unknown_score`` (higher: more like the predicted class's
        support clips), what the reject option compares with ``reject_threshold_``."""
        check_is_fitted(self)
        return calibration.known_scores(self, X)

    def predict(self, X: Any) -> np.ndarray:
        """Predicted labels (entries of ``classes_``); ties go to the lower class index. With
        ``unknown`` set, ``unknown_label`` for clips whose known score (:meth:`known_score`) is
        below ``reject_threshold_`` (:func:`calm.classifiers.calibration.with_unknown`)."""
        scores = self.class_scores(X)
        labels: np.ndarray = self.classes_[np.argmax(scores, axis=1)]
        if self.unknown is None:
            return labels
        return calibration.with_unknown(self, labels, calibration.known_scores(self, X, scores))

    def score(self, X: Any, y: Any, sample_weight: Any = None) -> float:
        """Accuracy of ``predict(X)`` against y."""
        y = labels_array(y)
        pred = self.predict(X)
        if len(y) != len(pred):
            raise FeatureError(f"X has {len(pred)} samples but y has {len(y)} labels")
        hits = (pred == y).astype(np.float64)
        if sample_weight is None:
            return float(hits.mean())
        w = np.asarray(sample_weight, dtype=np.float64)
        return float((hits * w).sum() / w.sum())

    # -- state and files ------------------------------------------------------------------------

    @classmethod
    def _state_specs(cls, params: dict[str, Any]) -> tuple[TensorSpec, ...]:
        """The fitted arrays saved for an estimator with ``params`` (attribute = name + "_")."""
        return (
            (
                TensorSpec("centroids", ("C", "K", "d")),
                TensorSpec("class_counts", ("C",), "i", bounds=(1, np.inf)),
            )
            + calibration.state_specs(params)
            + (support.SUPPORT_SPECS if params.get("keep_support") else ())
        )

    def _to_state(self, metadata: dict[str, Any] | None = None) -> SavedClassifier:
        """The fitted state as a file's contents (``metadata`` default: ``metadata_``)."""
        check_is_fitted(self)
        params = self.get_params(deep=False)
        params.pop("device", None)  # where it runs, not what it is: loaded classifiers run on "cpu"
        arrays = {s.name: getattr(self, s.attr) for s in self._state_specs(params) if hasattr(self, s.attr)}
        return SavedClassifier(
            estimator=type(self).__name__,
            params=params,
            classes=self.classes_,
            n_heads=int(self.n_heads_),
            head_dim=int(self.head_dim_),
            k=int(self.k_),
            n_support=len(self.support_labels_) if hasattr(self, "support_labels_") else None,
            tensors={name: np.ascontiguousarray(a) for name, a in arrays.items()},
            metadata=dict(self.metadata_ if metadata is None else metadata),
        )

    @classmethod
    def _checked(cls: type[_Self], params: dict[str, Any], path: str | Path) -> _Self:
        """An unfitted estimator with ``params``; ModelFileError naming ``path`` if they are invalid."""
        try:
            clf = cls(**params)
            clf._validate_params()
        except (TypeError, ValueError) as e:
            raise ModelFileError(f"{path}: bad parameters {str(params)[:200]}: {_one_line(e)}") from None
        return clf

    @classmethod
    def _from_state(cls: type[_Self], saved: SavedClassifier, path: str | Path = "<state>") -> _Self:
        """A fitted estimator restored from ``saved``; ValueError naming ``path`` if it does not fit
        this class (bad parameters, or tensors unlike ``_state_specs``)."""
        clf = cls._checked(old_file_params(saved.params, cls), path)
        specs = cls._state_specs(saved.params)
        check_tensors(saved, specs, path)
        support.check_loaded(saved, saved.tensors["class_counts"], path)
        clf.classes_ = saved.classes
        for s in specs:
            a = saved.tensors[s.name]
            setattr(
                clf, s.attr, a.astype(np.int64) if s.kind == "i" else float(a[0]) if s.shape == (1,) else a
            )
        clf.n_heads_, clf.head_dim_, clf.k_ = saved.n_heads, saved.head_dim, saved.k
        clf.n_features_in_ = clf.n_heads_ * clf.head_dim_
        clf.metadata_ = dict(saved.metadata)
        if clf.calibration is not None:
            clf.calibrated_ = len(clf.nonconformity_) > 0
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
                "cannot save: the fitted arrays do not match the parameters "
                f"or hold invalid values ({e}); refit"
            ) from e
        write_classifier(path, saved)


def _estimator(name: str, path: str | Path) -> type[HeadClassifier]:
    cls: type[HeadClassifier] | None = ESTIMATORS.get(name)
    if cls is None:
        raise ModelFileError(f"{path}: unknown estimator {name[:40]!r} (known: {sorted(ESTIMATORS)})")
    return cls


def load(path: str | os.PathLike[str]) -> HeadClassifier:
    """Read a classifier written by ``save``; ``metadata_`` holds the stored metadata dict.

    Raises :class:`calm.serialization.ModelFileError` (a ValueError naming the file and the problem)
    for a malformed, damaged or inconsistent file, before reading any tensor the estimator does not
    declare; FileNotFoundError when there is no file."""
    path = Path(path)

    def layout(name: str, params: dict[str, Any]) -> tuple[TensorSpec, ...]:
        cls = _estimator(name, path)
        # bad parameters are refused before any tensor is read
        cls._checked(old_file_params(params, cls), path)
        return cls._state_specs(params)

    saved = read_classifier(path, layout)
    return _estimator(saved.estimator, path)._from_state(saved, path)
