"""The classifier file format: safetensors tensors plus a JSON header. Never pickle.

This module reads and writes files and checks them against a layout the estimator declares; it
knows no estimator class. A file holds the string metadata key ``"calm"``, a JSON object::

    {"format": "calm-classifier", "format_version": 1, "estimator": "CALM" | "SAV",
     "calm_version": "...", "params": {...get_params()...},
     "classes": [...], "classes_type": "str" | "int" | "float" | "bool",
     "n_classes": C, "n_heads": K, "head_dim": d, "k": k_, "metadata": {...}}

plus ``"n_support": n`` in a file that keeps its support set (``keep_support=True``: the support
features and labels as tensors of shape (n, K, d) and (n,); files without it have no such key),

the metadata key ``"calm_sha256"`` (:func:`content_digest` of the header text and the tensors;
files written before it existed lack it and still load), and the estimator's fitted arrays as
tensors, each named after its attribute without the trailing underscore (``centroids_`` ->
``centroids``). The estimator lists them as :class:`TensorSpec` (shape in the symbols C, K, d, k
and n of the header, dtype kind, value bounds, index range).

Reading is bounded: the safetensors header is parsed and checked first (:mod:`calm._safetensors`:
size, JSON depth, offsets inside the file and tiling it), then the tensor names, dtypes and shapes
against the estimator's layout, and only then are the tensor bytes read, checksummed and checked
(finite, within bounds). Every refusal is a :class:`ModelFileError` (a ValueError) whose one-line
message names the file and the problem; a missing file is a FileNotFoundError.

Writers: :func:`write_classifier` (atomically). Readers: :func:`read_classifier` (with the
estimator's layout), :func:`check_tensors` (a state against a layout, also used before saving).
"""

from __future__ import annotations

import hashlib
import io
import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.numpy import save

from calm._files import atomic_write_bytes, json_default
from calm._safetensors import (
    SafetensorsError,
    TensorEntry,
    dtype_code,
    loads_bounded,
    read_header,
    read_tensor,
)
from calm._version import __version__
from calm.errors import CalmError

FORMAT = "calm-classifier"
FORMAT_VERSION = 1
#: The metadata key holding the sha256 of the header text and the tensors.
CHECKSUM_KEY = "calm_sha256"
_SLACK = 1e-5  # relative tolerance on upper bounds (float rounding of probabilities)

__all__ = [
    "CHECKSUM_KEY",
    "FORMAT",
    "FORMAT_VERSION",
    "Layout",
    "ModelFileError",
    "SavedClassifier",
    "TensorSpec",
    "check_tensors",
    "content_digest",
    "read_classifier",
    "write_classifier",
]

_HEADER_KEYS = ("estimator", "params", "classes", "classes_type", "n_classes", "n_heads", "head_dim", "k")


class ModelFileError(CalmError, ValueError):
    """A classifier file (or a state about to be saved) that breaks the format or the estimator's
    layout; the message names the file and the problem."""


@dataclass(frozen=True)
class TensorSpec:
    """One saved array: tensor ``name`` (attribute ``name + "_"``), ``shape`` in header symbols
        ("C" classes, "K" heads, "d" head dim, "k" kept heads), ints or None (any length: bounded by
    the file's size, which the reader checks first), dtype ``kind`` ("f": float32 or
        float64, checked finite; "i" integer), for index arrays ``index_of``, the symbol bounding the
        values (each in [0, dims[index_of])), closed value ``bounds`` (low, high), ``rows_sum_to_one``
        (each row along the last axis sums to 1) and ``same_dtype_as`` (a tensor whose dtype it shares)."""

    name: str
    shape: tuple[str | int | None, ...]
    kind: str = "f"
    index_of: str | None = None
    bounds: tuple[float, float] | None = None
    rows_sum_to_one: bool = False
    same_dtype_as: str | None = None

    @property
    def attr(self) -> str:
        """The estimator attribute holding this array."""
        return self.name + "_"


@dataclass
class SavedClassifier:
    """The contents of a classifier file: estimator name, its ``get_params`` dict, ``classes``
    (C,), the header dims, raw tensors by name, the user ``metadata`` and the writing calm version."""

    estimator: str
    params: dict[str, Any]
    classes: np.ndarray
    n_heads: int
    head_dim: int
    k: int
    tensors: dict[str, np.ndarray]
    metadata: dict[str, Any] = field(default_factory=dict)
    calm_version: str = __version__
    n_support: int | None = None

    @property
    def dims(self) -> dict[str, int]:
        """Values of the shape symbols C, K, d, k (and n, the kept support clips, when stated)."""
        dims = {"C": len(self.classes), "K": self.n_heads, "d": self.head_dim, "k": self.k}
        return dims if self.n_support is None else {**dims, "n": self.n_support}


def _classes_to_json(classes: np.ndarray) -> tuple[list[Any], str]:
    values = classes.tolist()
    for name, types in (("bool", (bool,)), ("int", (int,)), ("float", (float,)), ("str", (str,))):
        if all(isinstance(v, types) and (name == "bool" or not isinstance(v, bool)) for v in values):
            return values, name
    raise ModelFileError("only str, int, float or bool class labels can be saved; got " + repr(values[:3]))


def _classes_from_json(values: Any, kind: Any) -> np.ndarray:
    types: dict[str, tuple[type, ...]] = {
        "str": (str,),
        "int": (int,),
        "float": (float, int),
        "bool": (bool,),
    }
    if not isinstance(kind, str) or kind not in types or not isinstance(values, list):
        raise ValueError(f"bad class names in header (type {_short(kind)})")
    if not all(isinstance(v, types[kind]) and (kind == "bool" or not isinstance(v, bool)) for v in values):
        raise ValueError(f"bad class names in header: not all of type {_short(kind)}")
    if kind == "str":
        return np.asarray(values, dtype=str)
    return np.asarray(values, dtype={"int": np.int64, "float": np.float64, "bool": np.bool_}[kind])


def content_digest(calm_text: str, tensors: Mapping[str, np.ndarray]) -> str:
    """sha256 of the 'calm' header text and every tensor (name, dtype, shape, little-endian bytes,
    in name order): stored as the metadata value :data:`CHECKSUM_KEY` and checked on loading."""
    h = hashlib.sha256(b"calm-classifier\0" + calm_text.encode("utf-8"))
    for name in sorted(tensors):
        a = tensors[name]
        _digest_tensor(h, name, dtype_code(a.dtype), a.shape, _le_bytes(a))
    return h.hexdigest()


def _le_bytes(a: np.ndarray) -> memoryview:
    le = a.dtype.newbyteorder("<") if a.dtype.itemsize > 1 else a.dtype
    return memoryview(np.ascontiguousarray(a, dtype=le)).cast("B")  # type: ignore[arg-type]


def _digest_tensor(h: Any, name: str, code: str, shape: tuple[int, ...], data: Any) -> None:
    h.update(f"\0{name}\0{code}\0{list(shape)}\0".encode())
    h.update(data)


def write_classifier(path: str | Path, saved: SavedClassifier) -> None:
    """Write ``saved`` to ``path`` atomically, with its :func:`content_digest`; ValueError for labels
    or parameters / metadata that cannot be stored as JSON."""
    classes, kind = _classes_to_json(saved.classes)
    header = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "estimator": saved.estimator,
        "calm_version": saved.calm_version,
        "params": saved.params,
        "classes": classes,
        "classes_type": kind,
        "n_classes": len(classes),
        "n_heads": int(saved.n_heads),
        "head_dim": int(saved.head_dim),
        "k": int(saved.k),
        "metadata": dict(saved.metadata or {}),
        **({} if saved.n_support is None else {"n_support": int(saved.n_support)}),
    }
    try:
        text = json.dumps(header, default=json_default, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise ModelFileError(f"parameters and metadata must be JSON-serialisable: {e}") from e
    tensors = {name: np.ascontiguousarray(a) for name, a in saved.tensors.items()}
    meta = {"calm": text, CHECKSUM_KEY: content_digest(text, tensors)}
    atomic_write_bytes(Path(path), save(tensors, metadata=meta))


def _open_checked(path: Path) -> io.BufferedReader:
    if not path.is_file():
        raise FileNotFoundError(f"no classifier file at {path}")
    return open(path, "rb")


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _read_header(path: Path, meta: dict[str, str]) -> dict[str, Any]:
    if "calm" not in meta:
        raise ModelFileError(f"{path} is not a calm classifier (no 'calm' header)")
    try:
        h = loads_bounded(meta["calm"], "the 'calm' header")
    except SafetensorsError as e:
        raise ModelFileError(f"{path}: {e}") from None
    if not isinstance(h, dict) or h.get("format") != FORMAT:
        got = h.get("format") if isinstance(h, dict) else h
        raise ModelFileError(f"{path} is not a calm classifier file (format {_short(got)})")
    if h.get("format_version") != FORMAT_VERSION:
        raise ModelFileError(
            f"{path} has unknown format version {_short(h.get('format_version'))}; "
            f"this calm reads version {FORMAT_VERSION}"
        )
    missing = [key for key in _HEADER_KEYS if key not in h]
    if missing:
        raise ModelFileError(f"{path}: header is missing {missing}")
    if not isinstance(h["estimator"], str):
        raise ModelFileError(f"{path}: header 'estimator' must be a string, got {_short(h['estimator'])}")
    for key in ("n_classes", "n_heads", "head_dim", "k", *(["n_support"] if "n_support" in h else [])):
        if not isinstance(h[key], int) or isinstance(h[key], bool) or h[key] < 1:
            raise ModelFileError(f"{path}: header field {key!r} must be a positive int, got {_short(h[key])}")
    if not isinstance(h["params"], dict):
        raise ModelFileError(f"{path}: header 'params' must be an object")
    return h


#: ``layout(estimator, params)``: the tensors a file of that estimator must hold (ModelFileError for
#: an estimator it does not know).
Layout = Callable[[str, dict[str, Any]], Sequence[TensorSpec]]


def read_classifier(path: str | Path, layout: Layout | None = None) -> SavedClassifier:
    """Header and tensors of the classifier file at ``path``; :class:`ModelFileError` naming the
    file for anything malformed. With ``layout``, the tensors are checked against it before any
    tensor byte is read (names, dtypes, shapes) and after (values, :func:`check_tensors`); without,
    every tensor is read and only the format is checked. The stored checksum, when present, must
    match (files written before it existed have none)."""
    path = Path(path)
    with _open_checked(path) as fh:
        try:
            meta, entries = read_header(fh)
        except SafetensorsError as e:
            raise ModelFileError(f"{path} is not a readable safetensors file: {e}") from None
        saved = _saved_from_header(path, meta)
        specs = None if layout is None else layout(saved.estimator, saved.params)
        if specs is not None:
            _check_symbols(path, specs, saved.dims)
            _check_entries(path, entries, specs, saved.dims)
        digest = hashlib.sha256(b"calm-classifier\0" + meta["calm"].encode("utf-8"))
        for name in sorted(entries):
            entry = entries[name]
            try:
                a = read_tensor(fh, entry)
            except SafetensorsError as exc:
                raise ModelFileError(f"{path}: {exc}") from None
            except MemoryError:
                raise ModelFileError(
                    f"{path}: tensor {name!r} ({entry.nbytes} bytes) does not fit in memory"
                ) from None
            _digest_tensor(digest, name, entry.code, entry.shape, _le_bytes(a))
            saved.tensors[name] = a
    stored = meta.get(CHECKSUM_KEY)
    if stored is not None and stored != digest.hexdigest():
        raise ModelFileError(f"{path}: checksum mismatch: the file was changed or damaged after it was saved")
    if specs is not None:
        check_tensors(saved, specs, path)
    return saved


def _saved_from_header(path: Path, meta: dict[str, str]) -> SavedClassifier:
    h = _read_header(path, meta)
    unknown = sorted(set(meta) - {"calm", CHECKSUM_KEY})
    if unknown:
        raise ModelFileError(f"{path}: unknown metadata keys {[k[:40] for k in unknown[:5]]}")
    try:
        classes = _classes_from_json(h["classes"], h["classes_type"])
    except ValueError as e:
        raise ModelFileError(f"{path}: {e}") from None
    if len(classes) != h["n_classes"]:
        raise ModelFileError(f"{path}: {len(classes)} class names for n_classes={h['n_classes']}")
    md = h.get("metadata", {})
    return SavedClassifier(
        estimator=h["estimator"],
        params=h["params"],
        classes=classes,
        n_heads=h["n_heads"],
        head_dim=h["head_dim"],
        k=h["k"],
        tensors={},
        metadata=md if isinstance(md, dict) else {},
        calm_version=str(h.get("calm_version", "")),
        n_support=h.get("n_support"),
    )


def _expected_shape(spec: TensorSpec, dims: dict[str, int], actual: Sequence[int] = ()) -> tuple[int, ...]:
    """The shape ``spec`` requires; a free (None) axis takes its length from ``actual``."""
    free = list(actual) if len(actual) == len(spec.shape) else [-1] * len(spec.shape)
    return tuple(
        dims[x] if isinstance(x, str) else free[i] if x is None else x for i, x in enumerate(spec.shape)
    )


def _check_symbols(path: Any, specs: Sequence[TensorSpec], dims: dict[str, int]) -> None:
    """The header states every shape symbol the layout uses, and ``n_support`` only when the
    layout keeps a support set (it is stated by the file, not inferred from its tensors)."""
    used = {x for s in specs for x in s.shape if isinstance(x, str)}
    if "n" in used and "n" not in dims:
        raise ModelFileError(f"{path}: the parameters keep the support set but the header has no 'n_support'")
    if "n" in dims and "n" not in used:
        raise ModelFileError(f"{path}: the header states n_support but the parameters keep no support set")


def _check_entries(
    path: Path, entries: dict[str, TensorEntry], specs: Sequence[TensorSpec], dims: dict[str, int]
) -> None:
    """Names, dtypes and shapes of the header's tensors against ``specs``, before reading data."""
    by_name = {s.name: s for s in specs}
    unknown, missing = sorted(set(entries) - set(by_name)), sorted(set(by_name) - set(entries))
    if unknown:
        raise ModelFileError(
            f"{path}: unknown tensors {unknown[:5]} (this estimator saves {sorted(by_name)})"
        )
    if missing:
        raise ModelFileError(f"{path}: missing tensors {missing}")
    for s in specs:
        e = entries[s.name]
        if tuple(e.shape) != _expected_shape(s, dims, e.shape):
            raise ModelFileError(
                f"{path}: tensor {s.name!r} has shape {e.shape}, expected {_expected_shape(s, dims)}"
            )
        _check_dtype(path, s, e.dtype, entries[s.same_dtype_as].dtype if s.same_dtype_as else None)


def _check_dtype(path: Any, s: TensorSpec, dtype: np.dtype, other: np.dtype | None) -> None:
    ok = dtype in (np.float32, np.float64) if s.kind == "f" else dtype.kind in "iu"
    if not ok:
        want = "float32 or float64" if s.kind == "f" else "integer"
        raise ModelFileError(f"{path}: tensor {s.name!r} has dtype {dtype}, expected {want}")
    if other is not None and dtype != other:
        raise ModelFileError(
            f"{path}: tensor {s.name!r} has dtype {dtype} but {s.same_dtype_as!r} has {other}"
        )


def check_tensors(saved: SavedClassifier, specs: Sequence[TensorSpec], path: str | Path) -> None:
    """Refuse (:class:`ModelFileError` naming ``path``) tensors of ``saved`` that do not match
    ``specs``: missing or unknown, wrong shape or dtype, NaN or infinite floats, values outside the
    declared bounds (negative weights, class counts below 1, ...), weight rows not summing to 1,
    indices out of range."""
    dims = saved.dims
    by_name = {s.name: s for s in specs}
    _check_symbols(path, specs, dims)
    missing = sorted(set(by_name) - set(saved.tensors))
    if missing:
        raise ModelFileError(f"{path}: missing tensors {missing}")
    unknown = sorted(set(saved.tensors) - set(by_name))
    if unknown:
        raise ModelFileError(f"{path}: unknown tensors {unknown[:5]} (expected {sorted(by_name)})")
    for s in specs:
        a = np.asarray(saved.tensors[s.name])
        if tuple(a.shape) != _expected_shape(s, dims, a.shape):
            shape = _expected_shape(s, dims)
            raise ModelFileError(f"{path}: tensor {s.name!r} has shape {tuple(a.shape)}, expected {shape}")
        other = np.asarray(saved.tensors[s.same_dtype_as]).dtype if s.same_dtype_as else None
        _check_dtype(path, s, a.dtype, other)
        _check_values(path, s, a, dims)


def _check_values(path: Any, s: TensorSpec, a: np.ndarray, dims: dict[str, int]) -> None:
    if s.kind == "f" and not np.isfinite(a).all():
        raise ModelFileError(f"{path}: tensor {s.name!r} holds NaN or infinite values")
    if s.bounds is not None and a.size:
        low, high = s.bounds
        if a.min() < low or a.max() > high + _SLACK * abs(high):
            raise ModelFileError(f"{path}: tensor {s.name!r} must hold values in [{low}, {high}]")
    if s.rows_sum_to_one and a.size and not np.allclose(a.sum(axis=-1, dtype=np.float64), 1.0, atol=1e-3):
        raise ModelFileError(f"{path}: each row of tensor {s.name!r} must sum to 1")
    if s.index_of is not None and a.size and (a.min() < 0 or a.max() >= dims[s.index_of]):
        n = dims[s.index_of]
        raise ModelFileError(f"{path}: tensor {s.name!r} must hold indices in [0, {n}) ({s.index_of})")
