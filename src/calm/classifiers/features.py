"""Input handling of the head classifiers: feature arrays checked and streamed as torch chunks,
labels encoded as class indices, chunk sizes chosen for a memory target.

Features X have shape (n_samples, n_heads, head_dim) and may be a NumPy array, a ``np.memmap``, a
torch tensor (float16 / bfloat16 / float32 / float64) or any array-like with ``shape``, ``dtype``
and row slicing; 2-D (n, n_heads * head_dim) input is split into heads when the number of heads is
known. Chunks are fresh CPU tensors in float32, or float64 when the features are float64.
"""

from __future__ import annotations

import numbers
import warnings
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from calm import _heads as H
from calm.errors import FeatureError

__all__ = ["CHUNK_BYTES", "Features", "chunk_rows", "encode_labels", "labels_array", "ndim"]

#: Target size in bytes of one chunk's working set (features, similarities, posteriors).
CHUNK_BYTES = 512 * 2**20


class Features:
    """Validated view of (n, K, d) features that yields float32/float64 torch chunks.

    ``n_heads`` (or ``head_dim``) splits 2-D (n, K * d) input into heads; ``name`` names the
    argument in error messages. Attributes: ``X`` (the possibly reshaped input), ``shape``, ``n``,
    ``K``, ``d``, ``dtype`` (the torch accumulation dtype) and ``storage_dtype`` (the input's own
    floating dtype: chunks in it are plain copies, converted later block by block)."""

    def __init__(self, X: Any, *, n_heads: int | None = None, head_dim: int | None = None, name: str = "X"):
        if not isinstance(X, torch.Tensor) and ndim(X) < 3:  # the 2-D adapter: scikit-learn's checks
            from sklearn.utils.validation import check_array

            X = check_array(X, dtype=[np.float64, np.float32, np.float16], input_name=name)
        X = _as_array(X, name)
        shape = tuple(int(s) for s in X.shape)
        if len(shape) == 2 and (n_heads is not None or head_dim is not None):
            X, shape = _split_heads(X, shape, n_heads, head_dim, name)
        elif len(shape) == 2:
            raise FeatureError(
                f"{name} is 2-D {shape}; pass features of shape (n_samples, n_heads, head_dim), or "
                "flattened (n_samples, n_heads * head_dim) with n_heads=K given to the estimator"
            )
        elif len(shape) != 3:
            raise FeatureError(
                f"{name} must have shape (n_samples, n_heads, head_dim), got {len(shape)}-D {shape}"
            )
        if shape[0] == 0:
            raise FeatureError(f"{name} is empty (0 samples)")
        if shape[1] == 0 or shape[2] == 0:
            raise FeatureError(f"{name} has no features: shape {shape}")
        self.X, self.shape, self.name = X, shape, name
        self.n, self.K, self.d = shape
        self.dtype = H.compute_dtype(X.dtype if isinstance(X, torch.Tensor) else _np_dtype(X.dtype))
        self.storage_dtype = _storage_dtype(X)

    def chunks(
        self, rows: int, dtype: torch.dtype, heads: np.ndarray | None = None, check: bool = True
    ) -> Iterator[tuple[int, torch.Tensor]]:
        """(start, chunk) pairs of at most ``rows`` rows, only ``heads`` (sorted indices) if given,
        selected before conversion so that unused heads are never copied; ``check`` refuses NaN or
        infinite values."""
        index: np.ndarray | torch.Tensor | None = heads
        if heads is not None and isinstance(self.X, torch.Tensor):
            index = torch.from_numpy(np.asarray(heads, dtype=np.int64))
        for start in range(0, self.n, rows):
            stop = min(start + rows, self.n)
            raw = self.X[start:stop]
            if index is not None:
                raw = raw[:, index]
            t = _chunk_tensor(raw, dtype)
            if check and not bool(torch.isfinite(torch.stack(torch.aminmax(t))).all()):  # NaN propagates
                raise FeatureError(f"{self.name} contains NaN or infinite values (rows {start}..{stop - 1})")
            yield start, t

    def views(self, rows: int) -> Iterator[tuple[int, torch.Tensor]]:
        """(start, rows start:start + rows) as torch tensors without a copy where the input allows
        it (NumPy arrays, memory maps, tensors): read-only views in the stored dtype, which the
        caller converts block by block into its own buffers; no finiteness check."""
        for start in range(0, self.n, rows):
            yield start, _view_tensor(self.X[start : min(start + rows, self.n)])


def _view_tensor(chunk: Any) -> torch.Tensor:
    """``chunk`` as a torch tensor sharing its memory when possible (never written through)."""
    if isinstance(chunk, torch.Tensor):
        return chunk.detach()
    a = np.asarray(chunk)
    if a.dtype not in (np.float16, np.float32, np.float64):
        a = a.astype(np.float64 if a.dtype.kind in "iu" else np.float32)
    elif not a.dtype.isnative:
        a = a.astype(a.dtype.newbyteorder("="))
    if not a.flags.writeable:  # e.g. a read-only memory map: the view is only read
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            return torch.from_numpy(a)
    return torch.from_numpy(a)


def _as_array(X: Any, name: str) -> Any:
    """X as a real-valued torch tensor or array-like (``shape``, ``dtype``, slicing); ValueError else."""
    if isinstance(X, torch.Tensor):
        X = X.detach()
        if X.is_complex() or X.dtype == torch.bool:
            raise FeatureError(f"{name} must hold real numbers, got dtype {X.dtype}")
        return X
    if not isinstance(X, np.ndarray) and not (
        hasattr(X, "shape") and hasattr(X, "dtype") and hasattr(X, "__getitem__")
    ):
        try:
            X = np.asarray(X, dtype=np.float64)
        except (TypeError, ValueError) as e:
            raise FeatureError(f"{name} must be a numeric array of shape (n, n_heads, head_dim): {e}") from e
    kind = np.dtype(X.dtype).kind if not str(X.dtype).startswith("bfloat") else "f"
    if kind not in "fiu":
        raise FeatureError(f"{name} must hold real numbers, got dtype {X.dtype}")
    return X


def _split_heads(
    X: Any, shape: tuple[int, ...], n_heads: int | None, head_dim: int | None, name: str
) -> tuple[Any, tuple[int, int, int]]:
    """2-D (n, K * d) input reshaped to (n, K, d)."""
    n, f = shape
    K = int(n_heads) if n_heads is not None else f // int(head_dim)  # type: ignore[arg-type]
    if K <= 0 or f % K:
        raise FeatureError(f"{name} has {f} features per row, which does not split into {K} heads")
    if not hasattr(X, "reshape"):
        raise FeatureError(f"{name} is 2-D and cannot be reshaped into heads; pass (n, n_heads, head_dim)")
    return X.reshape(n, K, f // K), (n, K, f // K)


def _storage_dtype(X: Any) -> torch.dtype:
    """The floating torch dtype the features are stored in (chunks in it need no conversion), or
    float32 for integer and other input."""
    if isinstance(X, torch.Tensor):
        return X.dtype if X.is_floating_point() else torch.float32
    names = {"float16": torch.float16, "float32": torch.float32, "float64": torch.float64}
    return names.get(str(X.dtype), torch.float32)


def _np_dtype(dtype: Any) -> np.dtype:
    try:
        return np.dtype(dtype)  # type: ignore[no-any-return]
    except TypeError:
        return np.dtype(np.float32)


def _chunk_tensor(chunk: Any, dtype: torch.dtype) -> torch.Tensor:
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


def ndim(X: Any) -> int:
    """Number of dimensions of an array-like without converting it."""
    return len(X.shape) if hasattr(X, "shape") else int(np.ndim(X))


def shaped(X: Any, name: str = "X") -> Any:
    """X itself when it has a shape (arrays, memory maps, tensors), else ``np.asarray(X)`` (lists,
    array-likes with only ``__array__``); ragged nested lists are a ValueError."""
    if hasattr(X, "shape"):
        return X
    try:
        return np.asarray(X)
    except ValueError as e:
        raise FeatureError(f"{name} must be a numeric array of shape (n, n_heads, head_dim): {e}") from e


def labels_array(y: Any) -> np.ndarray:
    """Labels as an array scikit-learn's metrics accept: lists and object arrays of one kind of
    value become str, int or float arrays; mixed kinds stay object (and cannot be sorted, in fit)."""
    if isinstance(y, torch.Tensor):
        return y.detach().cpu().numpy()
    if not isinstance(y, np.ndarray) and hasattr(y, "__array__"):  # pandas, array-likes
        y = np.asarray(y)
    if isinstance(y, np.ndarray) and y.dtype != object:
        return y
    items = list(y.ravel()) if isinstance(y, np.ndarray) else list(y)
    shape = y.shape if isinstance(y, np.ndarray) else (len(items),)
    arr = np.empty(len(items), dtype=object)
    arr[:] = items
    kinds = {type(v) for v in items}
    if kinds and all(issubclass(t, str) for t in kinds):
        arr = arr.astype(str)
    elif kinds and all(issubclass(t, numbers.Integral) for t in kinds):
        arr = arr.astype(np.int64)
    elif kinds and all(issubclass(t, numbers.Real) for t in kinds):
        arr = arr.astype(np.float64)
    return arr.reshape(shape)


def _as_1d(y: np.ndarray) -> np.ndarray:
    """(n, 1) labels raveled with scikit-learn's DataConversionWarning; continuous targets refused."""
    if y.ndim == 2 and y.shape[1] == 1:
        from sklearn.exceptions import DataConversionWarning

        warnings.warn(
            "A column-vector y was passed when a 1d array was expected. Please change the shape of y "
            "to (n_samples,), for example using ravel().",
            DataConversionWarning,
            stacklevel=4,
        )
        y = y.ravel()
    if y.ndim != 1:
        raise FeatureError(f"y must be 1-D with one label per sample, got shape {y.shape}")
    if y.dtype.kind == "f" and not np.all(np.isfinite(y) & (y == np.round(y))):
        raise FeatureError("Unknown label type: continuous (class labels are strings or integers)")
    return y


def encode_labels(y: Any, classes: Any, n: int) -> tuple[np.ndarray, np.ndarray]:
    """classes_ and the (n,) class index of every label; ValueError for anything unusable.

    ``classes`` None: the sorted distinct labels; otherwise that order, every class with a clip."""
    if y is None:
        raise FeatureError("this classifier requires y to be passed, but the target y is None")
    y = _as_1d(labels_array(y))
    if len(y) != n:
        raise FeatureError(f"X has {n} samples but y has {len(y)} labels")
    try:
        uniq, inverse = np.unique(y, return_inverse=True)
    except TypeError as e:
        raise FeatureError(
            f"labels must be mutually comparable (e.g. all strings or all numbers): {e}"
        ) from e
    if classes is None:
        cls, idx = uniq, inverse.reshape(-1)
    else:
        cls, idx = _fixed_order(labels_array(classes), uniq, inverse.reshape(-1))
    if len(cls) < 2:
        raise FeatureError(f"need at least two classes, got {len(cls)} class: {cls.tolist()}")
    return cls, idx.astype(np.int64)


def _fixed_order(cls: np.ndarray, uniq: np.ndarray, inverse: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Class indices into a given class order ``cls`` for labels ``uniq[inverse]``."""
    if cls.ndim != 1 or len(np.unique(cls)) != len(cls):
        raise FeatureError("classes must be a 1-D sequence of distinct labels")
    sorter = np.argsort(cls, kind="stable")
    pos = np.clip(np.searchsorted(cls, uniq, sorter=sorter), 0, len(cls) - 1)
    found = cls[sorter[pos]] == uniq
    if not np.all(found):
        raise FeatureError(f"labels not in classes: {uniq[~found][:10].tolist()}")
    idx = sorter[pos][inverse]
    present = np.bincount(idx, minlength=len(cls)) > 0
    if not present.all():
        raise FeatureError(f"class with zero clips: {cls[~present][:10].tolist()}")
    return cls, idx


def chunk_rows(chunk_size: int | None, K: int, d: int, C: int, itemsize: int) -> int:
    """Rows per chunk: ``chunk_size``, or as many as keep one chunk's working set (features,
    similarities, posteriors of K heads, d dims, C classes) near :data:`CHUNK_BYTES`."""
    if chunk_size is not None:
        return int(chunk_size)
    per_row = K * (3 * d + 2 * C) * itemsize
    return max(1, CHUNK_BYTES // per_row)
