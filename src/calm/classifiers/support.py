"""Kept support sets: what ``keep_support=True`` stores and ``partial_fit`` refits on.

A head classifier fitted with ``keep_support=True`` keeps the support features it was fitted on
(``support_features_`` (n, K, d), in the query dtype: float32, or float64 for float64 features;
float16 / bfloat16 input is widened exactly) and their class indices (``support_labels_`` (n,),
into ``classes_``), and ``save`` writes them as two more tensors of the same file (the header
states ``n_support``; :mod:`calm.serialization` checks their shapes before reading them).

``partial_fit(X, y)`` is ``fit`` on the union: the kept clips first, then the new ones, so the
result equals ``fit(concatenate([X_kept, X]), concatenate([y_kept, y]))`` to float rounding, with
the calibration, the head choice and the reject threshold recomputed. Classes are ordered as
``fit`` orders them (sorted, or the ``classes=`` order): a new class may take an index before
existing ones; predictions are labels, so they do not depend on it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np
from sklearn.base import clone

from calm.classifiers.features import labels_array
from calm.errors import FeatureError
from calm.serialization import ModelFileError, SavedClassifier, TensorSpec

if TYPE_CHECKING:
    from calm.classifiers.features import Features

__all__ = ["SUPPORT_SPECS", "check_loaded", "keep", "partial_fit", "require", "union"]

#: The saved support set (``keep_support=True``): features in the query dtype and class indices.
SUPPORT_SPECS = (
    TensorSpec("support_features", ("n", "K", "d"), same_dtype_as="centroids"),
    TensorSpec("support_labels", ("n",), "i", index_of="C"),
)
_H = TypeVar("_H")  # a HeadClassifier (not imported: calm.classifiers.base imports this module)
_ATTRS = tuple(s.attr for s in SUPPORT_SPECS)


def as_array(feats: Features, rows: int, check: bool) -> np.ndarray:
    """All rows of ``feats`` as one (n, K, d) array in its compute dtype (float32 / float64),
    converted ``rows`` at a time (``check``: refuse NaN or infinite values)."""
    out: np.ndarray | None = None
    for start, t in feats.chunks(rows, feats.dtype, check=check):
        a = t.numpy()
        if out is None:
            out = np.empty(feats.shape, dtype=a.dtype)
        out[start : start + len(a)] = a
    assert out is not None  # Features refuses empty input
    return out


def keep(clf: Any, feats: Features, y_idx: np.ndarray, rows: int) -> None:
    """Set (``keep_support``) or drop (from an earlier fit) the kept support of a fitted ``clf``."""
    if not clf.keep_support:
        for attr in _ATTRS:
            clf.__dict__.pop(attr, None)
        return
    clf.support_features_ = as_array(feats, rows, check=False)  # fit checked them
    clf.support_labels_ = np.asarray(y_idx, dtype=np.int64).copy()


def require(clf: Any, what: str) -> np.ndarray:
    """The kept support features of ``clf``; FeatureError naming ``what`` (the estimator or its
    file) when it keeps none."""
    kept = getattr(clf, "support_features_", None)
    if kept is None:
        raise FeatureError(
            f"{what} keeps no support set: fit with keep_support=True (`calm fit --keep-support`) "
            "to add clips or classes later"
        )
    return np.asarray(kept)


def union(clf: Any, X: Any, y: Any) -> tuple[np.ndarray, np.ndarray]:
    """The kept support of ``clf`` followed by the new clips ``X`` (checked against the fitted
    heads) and labels ``y``: (features (n + m, K, d), labels (n + m,)). FeatureError without kept
    support or for unusable input."""
    feats = clf._query(X)  # the fitted heads x dims, 2-D input split into heads
    kept = require(clf, f"this {type(clf).__name__}")
    new = as_array(feats, clf._view_rows(feats), check=True)
    labels = labels_array(y)
    if labels.ndim != 1 or len(labels) != feats.n:
        raise FeatureError(f"X has {feats.n} samples but y has shape {labels.shape}")
    old = clf.classes_[clf.support_labels_]
    y_all = labels_array([*old.tolist(), *labels.tolist()])  # one kind of label: as fit reads them
    return np.concatenate([kept, new]), y_all


def partial_fit(clf: _H, X: Any, y: Any, classes: Any = None) -> _H:
    """``clf.partial_fit(X, y)``: ``fit`` of a clone on :func:`union`, its state then moved into
    ``clf`` with ``metadata_`` kept (so a failing refit leaves ``clf`` unchanged); an unfitted
    ``clf`` is fitted on X (scikit-learn's convention). ``classes`` (scikit-learn's convention:
    every class the calls may bring) is only checked: each label must be one of them."""
    est: Any = clf
    fitted = hasattr(est, "classes_")
    X_all, y_all = union(est, X, y) if fitted else (X, labels_array(y))
    if classes is not None:
        allowed = labels_array(classes).tolist()
        outside = sorted(set(np.unique(y_all).tolist()) - set(allowed))
        if outside:
            raise FeatureError(f"labels {outside[:5]} are not in classes={allowed[:10]}")
    if not fitted:
        est.fit(X_all, y_all)
        return clf
    new = clone(est).fit(X_all, y_all)
    new.metadata_ = dict(est.metadata_)
    est.__dict__.clear()
    est.__dict__.update(new.__dict__)
    return clf


def check_loaded(saved: SavedClassifier, counts: np.ndarray, path: Any) -> None:
    """Refuse a loaded support set whose labels do not give the saved class counts."""
    labels = saved.tensors.get("support_labels")
    if labels is None:
        return
    found = np.bincount(np.asarray(labels, dtype=np.int64), minlength=len(counts))
    if not np.array_equal(found, counts):
        raise ModelFileError(
            f"{path}: tensor 'support_labels' gives class counts {found[:10].tolist()} "
            f"but 'class_counts' holds {np.asarray(counts)[:10].tolist()}"
        )
