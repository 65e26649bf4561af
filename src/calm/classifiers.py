"""Head classifiers on per-head features: SAV, CALM-global and CALM (METHOD.md; paper Eq. 1-13).

Both estimators follow scikit-learn conventions (``fit`` / ``predict`` / ``predict_proba`` /
``decision_function`` / ``score``, ``get_params`` / ``set_params`` / ``sklearn.base.clone``) on
features X of shape (n_samples, n_heads, head_dim), given as a NumPy array, a ``np.memmap``, a torch
tensor (float16 / bfloat16 / float32 / float64) or any array-like with ``shape``, ``dtype`` and row
slicing. Labels y may be any mutually comparable hashables (strings, ints, ...); ``classes_`` is
their sorted set unless ``classes=`` fixes the order.

Flattened input (the adapter for scikit-learn tools such as ``cross_val_score``): 2-D X of shape
(n_samples, n_heads * head_dim) is split into heads when the estimator is given ``n_heads=K``;
after ``fit`` every method also accepts (n, n_heads_ * head_dim_) input.

Tie rules (documented contract):

- ranking heads (SAV accuracy, CALM reliability): equal scores keep the lower head index; SAV with
  ``tie_break="margin"`` first orders heads of equal support accuracy by their mean clamped margin
  (Eq. 5-7 with ``tau_p``), then by the lower head index;
- a head's nearest centroid (Eq. 3), SAV vote ties (Eq. 4) and CALM score ties (Eq. 10): the lower
  class index, i.e. the earlier entry of ``classes_``.

Validation: ``fit`` rejects NaN or infinite values anywhere in X; ``predict`` and friends check
the heads they read (all heads CALM weights, SAV's kept heads), chunk by chunk.

Memory: queries (and support clips) are processed in chunks of ``chunk_size`` rows (None: chosen so
one chunk's working set is about 512 MiB), so memory stays flat however many queries are passed;
every sum runs in float32, or float64 when the features are float64.

The math lives in :mod:`calm._heads` as small pure functions, re-exported here for analyses
(e.g. ``head_posteriors(cosine_similarities(X, clf.centroids_), clf.tau_p)`` gives the (n, K, C)
head posteriors of Eq. 5, ``head_weights(clf.reliability_, k, clf.tau_w)`` the weights another k
would give without refitting); this module adds validation, chunking, and saving
(:mod:`calm.serialization`, safetensors plus a JSON header, never pickle).
"""

from __future__ import annotations

import numbers
import warnings
from collections.abc import Iterator, Sequence

import numpy as np
import torch
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.exceptions import NotFittedError  # a ValueError

from calm import _heads as H
from calm._heads import (
    clamped_margins,
    class_centroids,
    class_reliability,
    cosine_similarities,
    global_reliability,
    head_posteriors,
    head_predictions,
    head_weights,
    rank_heads,
    resolve_k,
    top_k_mask,
    vote_counts,
    weighted_scores,
)

__all__ = [
    "SAV",
    "CALM",
    "load",
    # the pure head math (calm._heads), re-exported for analyses
    "class_centroids",
    "cosine_similarities",
    "head_predictions",
    "head_posteriors",
    "clamped_margins",
    "global_reliability",
    "class_reliability",
    "resolve_k",
    "top_k_mask",
    "head_weights",
    "weighted_scores",
    "vote_counts",
    "rank_heads",
]

#: Target size in bytes of one chunk's working set (features, similarities, posteriors).
CHUNK_BYTES = 512 * 2**20


# ----------------------------------------------------------------------------------------------
# input handling


class _Features:
    """Validated view of (n, K, d) features that yields float32/float64 torch chunks."""

    def __init__(self, X, *, n_heads: int | None = None, head_dim: int | None = None, name: str = "X"):
        if isinstance(X, torch.Tensor):
            X = X.detach()
            if X.is_complex() or X.dtype == torch.bool:
                raise ValueError(f"{name} must hold real numbers, got dtype {X.dtype}")
        elif not isinstance(X, np.ndarray) and not (
            hasattr(X, "shape") and hasattr(X, "dtype") and hasattr(X, "__getitem__")
        ):
            try:
                X = np.asarray(X, dtype=np.float64)
            except (TypeError, ValueError) as e:
                raise ValueError(
                    f"{name} must be a numeric array of shape (n, n_heads, head_dim): {e}"
                ) from e
        if not isinstance(X, torch.Tensor):
            kind = np.dtype(X.dtype).kind if not str(X.dtype).startswith("bfloat") else "f"
            if kind not in "fiu":
                raise ValueError(f"{name} must hold real numbers, got dtype {X.dtype}")
        shape = tuple(int(s) for s in X.shape)
        if len(shape) == 2 and (n_heads is not None or head_dim is not None):
            n, f = shape
            K = int(n_heads) if n_heads is not None else f // int(head_dim)
            if K <= 0 or f % K:
                raise ValueError(f"{name} has {f} features per row, which does not split into {K} heads")
            if not hasattr(X, "reshape"):
                raise ValueError(
                    f"{name} is 2-D and cannot be reshaped into heads; pass (n, n_heads, head_dim)"
                )
            X = X.reshape(n, K, f // K)
            shape = (n, K, f // K)
        elif len(shape) == 2:
            raise ValueError(
                f"{name} is 2-D {shape}; pass features of shape (n_samples, n_heads, head_dim), or "
                "flattened (n_samples, n_heads * head_dim) with n_heads=K given to the estimator"
            )
        elif len(shape) != 3:
            raise ValueError(
                f"{name} must have shape (n_samples, n_heads, head_dim), got {len(shape)}-D {shape}"
            )
        if shape[0] == 0:
            raise ValueError(f"{name} is empty (0 samples)")
        if shape[1] == 0 or shape[2] == 0:
            raise ValueError(f"{name} has no features: shape {shape}")
        self.X, self.shape, self.name = X, shape, name
        self.n, self.K, self.d = shape
        self.dtype = H.compute_dtype(X.dtype if isinstance(X, torch.Tensor) else _np_dtype(X.dtype))

    def chunks(
        self, rows: int, dtype: torch.dtype, heads: np.ndarray | None = None, check: bool = True
    ) -> Iterator[tuple[int, torch.Tensor]]:
        """(start, chunk) pairs of at most ``rows`` rows, only ``heads`` (sorted indices) if given,
        selected before conversion so that unused heads are never copied."""
        if heads is not None and isinstance(self.X, torch.Tensor):
            heads = torch.from_numpy(np.asarray(heads, dtype=np.int64))
        for start in range(0, self.n, rows):
            stop = min(start + rows, self.n)
            raw = self.X[start:stop]
            if heads is not None:
                raw = raw[:, heads]
            t = _chunk_tensor(raw, dtype)
            if check and not bool(torch.isfinite(torch.stack(torch.aminmax(t))).all()):  # NaN propagates
                raise ValueError(f"{self.name} contains NaN or infinite values (rows {start}..{stop - 1})")
            yield start, t


def _np_dtype(dtype) -> np.dtype:
    try:
        return np.dtype(dtype)
    except TypeError:
        return np.dtype(np.float32)


def _chunk_tensor(chunk, dtype: torch.dtype) -> torch.Tensor:
    """A fresh CPU tensor of ``dtype`` holding ``chunk`` (never a view of the caller's data)."""
    if isinstance(chunk, torch.Tensor):
        return chunk.detach().to(device="cpu", dtype=dtype, copy=True)
    a = np.asarray(chunk)
    if a.dtype not in (np.float16, np.float32, np.float64) and a.dtype.kind not in "iu":
        a = a.astype(np.float32)
    if a.dtype == np.dtype(str(dtype).removeprefix("torch.")) or not a.flags.c_contiguous:
        return torch.from_numpy(np.array(a, dtype=str(dtype).removeprefix("torch."), copy=True, order="C"))
    if not a.flags.writeable:  # e.g. a read-only memory map: only read, by the converting copy below
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            return torch.from_numpy(a).to(dtype)
    return torch.from_numpy(a).to(dtype)


def _labels_array(y) -> np.ndarray:
    if isinstance(y, torch.Tensor):
        return y.detach().cpu().numpy()
    if isinstance(y, np.ndarray):
        return y
    items = list(y)
    arr = np.empty(len(items), dtype=object)
    arr[:] = items
    kinds = {type(v) for v in items}
    if kinds and all(issubclass(t, str) for t in kinds):
        return arr.astype(str)
    return arr


def _encode_labels(y, classes, n: int) -> tuple[np.ndarray, np.ndarray]:
    """classes_ and the (n,) class index of every label; ValueError for anything unusable."""
    y = _labels_array(y)
    if y.ndim != 1:
        raise ValueError(f"y must be 1-D with one label per sample, got shape {y.shape}")
    if len(y) != n:
        raise ValueError(f"X has {n} samples but y has {len(y)} labels")
    try:
        uniq, inverse = np.unique(y, return_inverse=True)
    except TypeError as e:
        raise ValueError(f"labels must be mutually comparable (e.g. all strings or all numbers): {e}") from e
    if classes is None:
        cls, idx = uniq, inverse.reshape(-1)
    else:
        cls = _labels_array(classes)
        if cls.ndim != 1 or len(np.unique(cls)) != len(cls):
            raise ValueError("classes must be a 1-D sequence of distinct labels")
        sorter = np.argsort(cls, kind="stable")
        pos = np.clip(np.searchsorted(cls, uniq, sorter=sorter), 0, len(cls) - 1)
        found = cls[sorter[pos]] == uniq
        if not np.all(found):
            raise ValueError(f"labels not in classes: {uniq[~found][:10].tolist()}")
        idx = sorter[pos][inverse.reshape(-1)]
        present = np.bincount(idx, minlength=len(cls)) > 0
        if not present.all():
            raise ValueError(f"class with zero clips: {cls[~present][:10].tolist()}")
    if len(cls) < 2:
        raise ValueError(f"need at least two classes, got {len(cls)}: {cls.tolist()}")
    return cls, idx.astype(np.int64)


def _chunk_rows(chunk_size, K: int, d: int, C: int, itemsize: int) -> int:
    if chunk_size is not None:
        return int(chunk_size)
    per_row = K * (3 * d + 2 * C) * itemsize
    return max(1, CHUNK_BYTES // per_row)


def _check_positive(name: str, v) -> None:
    if isinstance(v, bool) or not isinstance(v, numbers.Real) or not np.isfinite(v) or not v > 0:
        raise ValueError(f"{name} must be a finite number > 0, got {v!r}")


def _check_choice(name: str, v, choices: Sequence[str]) -> None:
    if v not in choices:
        raise ValueError(f"{name} must be one of {list(choices)}, got {v!r}")


def _check_optional_int(name: str, v) -> None:
    if v is not None and (isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < 1):
        raise ValueError(f"{name} must be None or an int >= 1, got {v!r}")


# ----------------------------------------------------------------------------------------------
# estimators


class _HeadClassifier(ClassifierMixin, BaseEstimator):
    """Shared fit/predict plumbing: centroids (Eq. 1), chunked queries, labels, saving."""

    def _validate_params(self) -> None:
        _check_positive("tau_p", self.tau_p)
        _check_optional_int("n_heads", self.n_heads)
        _check_optional_int("chunk_size", self.chunk_size)
        k = self.k
        if k is not None and (isinstance(k, bool) or not isinstance(k, numbers.Real)):
            raise ValueError(f"k must be an int, a float in (0, 1] or None, got {k!r}")

    def fit(self, X, y):
        """Fit on support features X (n, K, d) (or flattened with ``n_heads``) and labels y."""
        self._validate_params()
        feats = _Features(X, n_heads=self.n_heads)
        classes, y_idx = _encode_labels(y, self.classes, feats.n)
        C, K, d = len(classes), feats.K, feats.d
        k = H.resolve_k(self.k, K)
        dtype = feats.dtype
        rows = _chunk_rows(self.chunk_size, K, d, C, torch.finfo(dtype).bits // 8)
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
        self.metadata_ = {}
        self._unit = H.l2_normalize(centroids).permute(1, 2, 0).contiguous()  # (K, d, C)
        self._fit_heads(feats, y_t, counts, rows, dtype)
        self._prepare()
        self._unit = None  # predict keeps only what it needs
        return self

    # -- helpers shared by predict paths --------------------------------------------------------

    def _check_fitted(self) -> None:
        if not hasattr(self, "centroids_"):
            raise NotFittedError(f"this {type(self).__name__} is not fitted yet; call fit(X, y) first")

    def _query(self, X) -> _Features:
        self._check_fitted()
        feats = _Features(X, n_heads=self.n_heads_ if _ndim(X) == 2 else None)
        if (feats.K, feats.d) != (self.n_heads_, self.head_dim_):
            raise ValueError(
                f"X has {feats.K} heads x {feats.d} dims but the classifier was fitted on "
                f"{self.n_heads_} heads x {self.head_dim_} dims"
            )
        return feats

    def _unit_centroids(self) -> torch.Tensor:
        """Unit-length centroids laid out (K, d, C) for batched matmuls (cached)."""
        if getattr(self, "_unit", None) is None:
            self._unit = H.l2_normalize(torch.from_numpy(self.centroids_)).permute(1, 2, 0).contiguous()
        return self._unit

    def _dtype(self) -> torch.dtype:
        return H.compute_dtype(self.centroids_.dtype)

    def _rows(self, K: int) -> int:
        return _chunk_rows(
            self.chunk_size, K, self.head_dim_, len(self.classes_), torch.finfo(self._dtype()).bits // 8
        )

    def predict(self, X) -> np.ndarray:
        """Predicted labels (entries of ``classes_``); ties go to the lower class index."""
        scores = self.decision_function(X)
        return self.classes_[np.argmax(scores, axis=1)]

    def score(self, X, y, sample_weight=None) -> float:
        """Accuracy of ``predict(X)`` against y."""
        y = _labels_array(y)
        pred = self.predict(X)
        if len(y) != len(pred):
            raise ValueError(f"X has {len(pred)} samples but y has {len(y)} labels")
        hits = (pred == y).astype(np.float64)
        if sample_weight is None:
            return float(hits.mean())
        w = np.asarray(sample_weight, dtype=np.float64)
        return float((hits * w).sum() / w.sum())

    # -- saving ---------------------------------------------------------------------------------

    def save(self, path, metadata: dict | None = None) -> None:
        """Write the fitted classifier to ``path``: safetensors tensors plus a JSON header with the
        class names, parameters, package version, feature shape and format version. ``metadata``
        (a JSON-serialisable dict; default: ``metadata_``) is stored and restored as ``metadata_``."""
        from calm.serialization import save_classifier

        self._check_fitted()
        save_classifier(self, path, getattr(self, "metadata_", {}) if metadata is None else metadata)


def _ndim(X) -> int:
    return len(X.shape) if hasattr(X, "shape") else np.ndim(X)


class SAV(_HeadClassifier):
    """Sparse attention vectors (Mitra et al.; paper Sec. 3.1, Eq. 1-4).

    Each head predicts its nearest centroid by cosine similarity (Eq. 2-3); heads are ranked by that
    prediction's accuracy on the support set and the top k vote with equal weights (Eq. 4).

    Parameters
    ----------
    k : int, float in (0, 1] or None
        Heads kept: a count, a fraction of all heads (``round(k * n_heads)``, at least 1), or all.
    tie_break : "index" or "margin"
        Order of heads with equal support accuracy: the lower head index first (``"index"``), or
        the larger mean clamped margin (Eq. 5-7 with ``tau_p``) first, then the lower index
        (``"margin"``; avoids keeping merely the first heads when many heads score 100 %, as with
        one shot per class).
    tau_p : float
        Posterior temperature of the margins used by ``tie_break="margin"``.
    n_heads : int or None
        Split 2-D (n, n_heads * head_dim) input into this many heads (the scikit-learn adapter).
    classes : sequence or None
        Fixed class order (every class needs a clip); None: the sorted labels of y.
    chunk_size : int or None
        Rows per chunk; None picks ~512 MiB working sets.

    Attributes
    ----------
    classes_ (C,), class_counts_ (C,), centroids_ (C, K, d), head_scores_ (K,) support accuracy of
    each head, heads_ (k,) kept heads in rank order, head_margins_ (K,) (``tie_break="margin"``
    only), k_, n_heads_, head_dim_, metadata_.
    """

    def __init__(self, k=20, *, tie_break="index", tau_p=0.03, n_heads=None, classes=None, chunk_size=None):
        self.k = k
        self.tie_break = tie_break
        self.tau_p = tau_p
        self.n_heads = n_heads
        self.classes = classes
        self.chunk_size = chunk_size

    def _validate_params(self) -> None:
        super()._validate_params()
        _check_choice("tie_break", self.tie_break, ("index", "margin"))

    def _fit_heads(self, feats, y_t, counts, rows, dtype) -> None:
        K = feats.K
        correct = torch.zeros(K, dtype=torch.int64)
        margin_sum = torch.zeros(K, dtype=dtype)
        for start, xb in feats.chunks(rows, dtype, check=False):  # checked by the centroid pass
            yb = y_t[start : start + len(xb)]
            s = _similarities(xb, self._unit, inplace=True)  # Eq. 2, (K, n, C)
            correct += (s.argmax(dim=-1) == yb[None, :]).sum(dim=1)  # Eq. 3 on the support set
            if self.tie_break == "margin":
                margin_sum += _support_margins(s, yb, self.tau_p).sum(dim=1)  # Eq. 5-6
        self.head_scores_ = (correct.to(torch.float64) / feats.n).numpy()
        margins = None
        if self.tie_break == "margin":
            self.head_margins_ = (margin_sum / feats.n).numpy()  # Eq. 7
            margins = self.head_margins_
        elif hasattr(self, "head_margins_"):
            del self.head_margins_
        self.heads_ = H.rank_heads(correct, margins)[: self.k_].numpy()

    def _prepare(self) -> None:
        self._unit_kept = self._unit_centroids()[torch.from_numpy(self.heads_)].contiguous()

    def decision_function(self, X) -> np.ndarray:
        """Vote counts (n, C) of the kept heads (Eq. 4), int64."""
        feats = self._query(X)
        C = len(self.classes_)
        # read each kept head once, in increasing index order (cheap strided reads of memory maps)
        heads, inverse = np.unique(self.heads_, return_inverse=True)
        inverse = torch.from_numpy(inverse.reshape(-1))
        out = np.empty((feats.n, C), dtype=np.int64)
        for start, xb in feats.chunks(self._rows(len(heads)), self._dtype(), heads=heads):
            s = H.cosine_similarities(xb[:, inverse], self._unit_kept, normalized=True)
            out[start : start + len(xb)] = H.vote_counts(H.head_predictions(s), C).numpy()
        return out

    def predict_proba(self, X) -> np.ndarray:
        """Vote shares (n, C): vote counts divided by k."""
        return self.decision_function(X) / float(self.k_)


class CALM(_HeadClassifier):
    """Class-conditional sparse attention vectors (paper Sec. 3.2, Eq. 5-13).

    Every head turns its cosine similarities into a posterior over classes (Eq. 5, ``tau_p``); a
    head's reliability is its mean clamped margin on the support set (Eq. 6), per class (Eq. 11,
    ``weighting="class"``, the paper's CALM) or over all clips (Eq. 7, ``weighting="global"``,
    CALM-global). The k most reliable heads (per class, or shared) get weights softmax(r / tau_w)
    (Eq. 12 / 8), all others 0, and the score of class c is the weighted sum of the head
    posteriors p_c^j (Eq. 13 / 9).

    Parameters
    ----------
    k : int, float in (0, 1] or None
        Heads kept (per class for ``weighting="class"``): a count, a fraction of all heads
        (``round(k * n_heads)``, at least 1) or all. Default 0.4 (the paper: accuracy peaks with
        about 30-50 % of heads kept).
    tau_p, tau_w : float
        Posterior and weight temperatures (paper defaults 0.03 and 0.5).
    weighting : "class" or "global"
        Class-conditional reliabilities and head sets (CALM) or one shared set (CALM-global).
    normalization : "softmax" or "power"
        Weights softmax(r / tau_w) over the kept heads (paper Eq. 8 / 12), or r^(1 / tau_w) divided
        by its sum (the authors' released code; uniform when every kept r is 0).
    reliability : "in-sample" or "leave-one-out"
        Margins of support clips against centroids that include them (paper), or against their own
        class centroid without that clip, mu^{-i} = (n_c mu_c - h_i) / (n_c - 1); classes with one
        clip fall back to in-sample with a warning.
    n_heads, classes, chunk_size : as for :class:`SAV`.

    Attributes
    ----------
    classes_ (C,), class_counts_ (C,), centroids_ (C, K, d), reliability_ (C, K) for "class" or
    (K,) for "global", weights_ (C, K) (rows identical for "global"; each row sums to 1 over its
    kept heads and is 0 elsewhere), heads_ (C, k) for "class" or (k,) for "global": kept heads by
    decreasing reliability, k_, n_heads_, head_dim_, metadata_.
    """

    def __init__(
        self,
        k=0.4,
        *,
        tau_p=0.03,
        tau_w=0.5,
        weighting="class",
        normalization="softmax",
        reliability="in-sample",
        n_heads=None,
        classes=None,
        chunk_size=None,
    ):
        self.k = k
        self.tau_p = tau_p
        self.tau_w = tau_w
        self.weighting = weighting
        self.normalization = normalization
        self.reliability = reliability
        self.n_heads = n_heads
        self.classes = classes
        self.chunk_size = chunk_size

    def _validate_params(self) -> None:
        super()._validate_params()
        _check_positive("tau_w", self.tau_w)
        _check_choice("weighting", self.weighting, ("class", "global"))
        _check_choice("normalization", self.normalization, ("softmax", "power"))
        _check_choice("reliability", self.reliability, ("in-sample", "leave-one-out"))

    def _fit_heads(self, feats, y_t, counts, rows, dtype) -> None:
        C, K = len(counts), feats.K
        loo = self.reliability == "leave-one-out"
        if loo and bool((counts == 1).any()):
            single = self.classes_[(counts == 1).numpy()][:10].tolist()
            warnings.warn(
                f"leave-one-out reliability: classes with one clip use in-sample margins: {single}",
                UserWarning,
                stacklevel=3,
            )
        centroids = torch.from_numpy(self.centroids_)
        margin_sum = torch.zeros((C, K), dtype=dtype)
        for start, xb in feats.chunks(rows, dtype, check=False):  # checked by the centroid pass
            yb = y_t[start : start + len(xb)]
            s = _similarities(xb, self._unit, inplace=not loo)  # Eq. 2, (K, n, C)
            if loo:
                _leave_one_out_(s, xb, yb, centroids, counts)
            m = _support_margins(s, yb, self.tau_p)  # Eq. 5-6, (K, n)
            margin_sum.index_add_(0, yb, m.T)
        if self.weighting == "class":
            r = margin_sum / counts.to(dtype)[:, None]  # Eq. 11
        else:
            r = margin_sum.sum(dim=0) / feats.n  # Eq. 7
        w = H.head_weights(r, self.k_, self.tau_w, self.normalization)  # Eq. 12 / 8
        self.reliability_ = r.numpy()
        self.weights_ = (w.expand(C, K) if w.ndim == 1 else w).contiguous().numpy()
        self.heads_ = torch.sort(r, dim=-1, descending=True, stable=True).indices[..., : self.k_].numpy()

    def _prepare(self) -> None:
        used = np.flatnonzero((self.weights_ > 0).any(axis=0))
        # with most heads in use, reading all of them (zero weights elsewhere) beats a gather
        self._used = None if len(used) > 0.75 * self.n_heads_ else torch.from_numpy(used)
        w = torch.from_numpy(self.weights_)
        unit = self._unit_centroids()
        if self._used is not None:
            w, unit = w[:, self._used], unit[self._used]
        self._unit_used = unit.contiguous()
        self._w_used = w.T.contiguous()  # (K_used, C)
        self._scaled = None

    def _scaled_centroids(self) -> torch.Tensor:
        """Unit centroids of the used heads divided by tau_p, (K_used, d, C) (cached per tau_p)."""
        if getattr(self, "_scaled", None) is None or self._scaled[0] != self.tau_p:
            self._scaled = (self.tau_p, self._unit_used / self.tau_p)
        return self._scaled[1]

    def decision_function(self, X) -> np.ndarray:
        """Raw scores (n, C) of Eq. 13 (Eq. 9 for ``weighting="global"``)."""
        feats = self._query(X)
        dtype = self._dtype()
        C = len(self.classes_)
        out = np.empty((feats.n, C), dtype=np.float64 if dtype == torch.float64 else np.float32)
        scaled = self._scaled_centroids()
        shift = _needs_shift(self.tau_p, C, dtype)
        used = None if self._used is None else self._used.numpy()
        for start, xb in feats.chunks(self._rows(len(self._w_used)), dtype, heads=used):
            out[start : start + len(xb)] = _calm_scores(xb, scaled, self._w_used, shift).numpy()
        return out

    def predict_proba(self, X) -> np.ndarray:
        """Scores normalised to sum to 1 over classes."""
        s = self.decision_function(X)
        total = s.sum(axis=1, keepdims=True)
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(total > 0, s / total, 1.0 / s.shape[1])


def _calm_scores(xb: torch.Tensor, scaled: torch.Tensor, w_t: torch.Tensor, shift: bool) -> torch.Tensor:
    """Eq. 2, 5 and 13 for one chunk, in place: ``scaled`` = unit centroids / tau_p (K, d, C),
    weights ``w_t`` (K, C)."""
    e = _similarities(xb, scaled, inplace=True)  # Eq. 2 over tau_p, (K, n, C)
    if shift:
        e.sub_(e.amax(dim=-1, keepdim=True))
    e.exp_()
    e.div_(e.sum(dim=-1, keepdim=True))  # Eq. 5
    e.mul_(w_t[:, None, :])  # w_c^j p_c^j
    return e.sum(dim=0)  # Eq. 13


def _needs_shift(tau_p: float, n_classes: int, dtype: torch.dtype) -> bool:
    """Whether softmax(s / tau_p) needs the usual max-shift: with |s| <= 1 (cosines),
    exp(s / tau_p) and its sum over classes can neither overflow nor underflow otherwise."""
    return 1.0 / tau_p + np.log(n_classes) + 1.0 > np.log(torch.finfo(dtype).max) - 1.0


def _similarities(xb: torch.Tensor, unit: torch.Tensor, inplace: bool = False) -> torch.Tensor:
    """Eq. 2 for a chunk (n, K, d) against unit centroids (K, d, C), laid out (K, n, C);
    ``inplace`` normalises ``xb`` itself (a chunk this module owns)."""
    if inplace:
        x = xb.div_(torch.linalg.vector_norm(xb, dim=-1, keepdim=True).clamp_min_(H.EPS))
    else:
        x = H.l2_normalize(xb)
    return torch.matmul(x.transpose(0, 1), unit)


def _support_margins(s: torch.Tensor, yb: torch.Tensor, tau_p: float) -> torch.Tensor:
    """Eq. 5-6 on support similarities ``s`` (K, n, C), overwriting them, -> (K, n): the same
    numbers as ``clamped_margins(head_posteriors(s, tau_p), yb)``, as
    p_c - max_{c' != c} p_c' = (e_c - max_{c' != c} e_c') / sum_c' e_c' with e = exp(s / tau_p)."""
    K, n, C = s.shape
    idx = yb.view(1, n, 1).expand(K, n, 1)
    s.mul_(1.0 / tau_p)
    if _needs_shift(tau_p, C, s.dtype):
        s.sub_(s.amax(dim=-1, keepdim=True))
    own = s.gather(-1, idx).squeeze(-1).exp_()
    s.exp_()
    total = s.sum(dim=-1)
    rivals = s.scatter_(-1, idx, 0.0).amax(dim=-1)
    return ((own - rivals) / total).clamp_min_(0)


def _leave_one_out_(s, xb, yb, centroids, counts) -> None:
    """In place on s (K, n, C): s_j(x_i, c_i) becomes the cosine to mu^{-i}_{c_i} =
    (n_c mu_c - h_i) / (n_c - 1) for clips whose class has more than one clip (the scale
    1 / (n_c - 1) does not change a cosine)."""
    K, n, _ = s.shape
    n_c = counts[yb].to(xb.dtype)  # (n,)
    rest = n_c[:, None, None] * centroids[yb].to(xb.dtype) - xb  # (n, K, d)
    loo = (H.l2_normalize(xb) * H.l2_normalize(rest)).sum(dim=-1)  # (n, K)
    idx = yb.view(1, n, 1).expand(K, n, 1)
    own = s.gather(-1, idx).squeeze(-1)  # (K, n)
    s.scatter_(-1, idx, torch.where((n_c > 1)[None, :], loo.T.to(s.dtype), own).unsqueeze(-1))


def load(path):
    """Read a classifier written by ``save``; ``metadata_`` holds the stored metadata dict."""
    from calm.serialization import load_classifier

    return load_classifier(path)
