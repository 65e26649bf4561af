"""The classifier file format: safetensors tensors plus a JSON header. Never pickle.

This module reads and writes files and checks them against a layout the estimator declares; it
knows no estimator class. A file holds the string metadata key ``"calm"``, a JSON object::

    {"format": "calm-classifier", "format_version": 1, "estimator": "CALM" | "SAV",
     "calm_version": "...", "params": {...get_params()...},
     "classes": [...], "classes_type": "str" | "int" | "float" | "bool",
     "n_classes": C, "n_heads": K, "head_dim": d, "k": k_, "metadata": {...}}

and the estimator's fitted arrays as tensors, each named after its attribute without the trailing
underscore (``centroids_`` -> ``centroids``). The estimator lists them as :class:`TensorSpec` (shape
in the symbols C, K, d, k of the header, dtype kind, index range); :func:`check_tensors` refuses a
missing tensor, a wrong shape or dtype kind, a NaN or infinite float, or an index out of range. A
file with a missing header key or an unknown format version is refused with a ValueError naming the
file and the problem.

Writers: :func:`write_classifier` (atomically). Readers: :func:`read_classifier` (header and raw
tensors, format checks only), then :func:`check_tensors` with the estimator's layout.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from safetensors import safe_open
from safetensors.numpy import save

from calm import __version__
from calm._files import atomic_write_bytes, json_default

FORMAT = "calm-classifier"
FORMAT_VERSION = 1

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "SavedClassifier",
    "TensorSpec",
    "check_tensors",
    "read_classifier",
    "write_classifier",
]

_HEADER_KEYS = ("estimator", "params", "classes", "classes_type", "n_classes", "n_heads", "head_dim", "k")


@dataclass(frozen=True)
class TensorSpec:
    """One saved array: tensor ``name`` (attribute ``name + "_"``), ``shape`` in header symbols
    ("C" classes, "K" heads, "d" head dim, "k" kept heads) or ints, dtype ``kind`` ("f" floating,
    checked finite; "i" integer), and for index arrays ``index_of``, the symbol bounding the values
    (each in [0, dims[index_of]))."""

    name: str
    shape: tuple[str | int, ...]
    kind: str = "f"
    index_of: str | None = None

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

    @property
    def dims(self) -> dict[str, int]:
        """Values of the shape symbols C, K, d, k."""
        return {"C": len(self.classes), "K": self.n_heads, "d": self.head_dim, "k": self.k}


def _classes_to_json(classes: np.ndarray) -> tuple[list[Any], str]:
    values = classes.tolist()
    for name, types in (("bool", (bool,)), ("int", (int,)), ("float", (float,)), ("str", (str,))):
        if all(isinstance(v, types) and (name == "bool" or not isinstance(v, bool)) for v in values):
            return values, name
    raise ValueError("only str, int, float or bool class labels can be saved; got " + repr(values[:3]))


def _classes_from_json(values: Any, kind: Any) -> np.ndarray:
    types: dict[str, tuple[type, ...]] = {
        "str": (str,),
        "int": (int,),
        "float": (float, int),
        "bool": (bool,),
    }
    if kind not in types or not isinstance(values, list):
        raise ValueError(f"bad class names in header (type {kind!r})")
    if not all(isinstance(v, types[kind]) and (kind == "bool" or not isinstance(v, bool)) for v in values):
        raise ValueError(f"bad class names in header: not all of type {kind!r}")
    if kind == "str":
        return np.asarray(values, dtype=str)
    return np.asarray(values, dtype={"int": np.int64, "float": np.float64, "bool": np.bool_}[kind])


def write_classifier(path: str | Path, saved: SavedClassifier) -> None:
    """Write ``saved`` to ``path`` atomically; ValueError for labels or parameters / metadata that
    cannot be stored as JSON."""
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
    }
    try:
        text = json.dumps(header, default=json_default, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise ValueError(f"parameters and metadata must be JSON-serialisable: {e}") from e
    tensors = {name: np.ascontiguousarray(a) for name, a in saved.tensors.items()}
    atomic_write_bytes(Path(path), save(tensors, metadata={"calm": text}))


def _read_raw(path: Path) -> tuple[dict[str, str], dict[str, np.ndarray]]:
    if not path.is_file():
        raise FileNotFoundError(f"no classifier file at {path}")
    try:
        with safe_open(str(path), framework="numpy") as f:
            meta = f.metadata() or {}
            tensors = {key: np.array(f.get_tensor(key)) for key in f.keys()}  # noqa: SIM118
    except Exception as e:  # safetensors raises its own error types for corrupt files
        raise ValueError(f"{path} is not a readable safetensors file: {e}") from e
    return meta, tensors


def _read_header(path: Path, meta: dict[str, str]) -> dict[str, Any]:
    if "calm" not in meta:
        raise ValueError(f"{path} is not a calm classifier (no 'calm' header)")
    try:
        h = json.loads(meta["calm"])
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: the 'calm' header is not valid JSON: {e}") from e
    if not isinstance(h, dict) or h.get("format") != FORMAT:
        raise ValueError(
            f"{path} is not a calm classifier file (format {h.get('format') if isinstance(h, dict) else h!r})"
        )
    if h.get("format_version") != FORMAT_VERSION:
        raise ValueError(
            f"{path} has unknown format version {h.get('format_version')!r}; "
            f"this calm reads version {FORMAT_VERSION}"
        )
    missing = [key for key in _HEADER_KEYS if key not in h]
    if missing:
        raise ValueError(f"{path}: header is missing {missing}")
    if not isinstance(h["estimator"], str):
        raise ValueError(f"{path}: header 'estimator' must be a string, got {h['estimator']!r}")
    for key in ("n_classes", "n_heads", "head_dim", "k"):
        if not isinstance(h[key], int) or isinstance(h[key], bool) or h[key] < 1:
            raise ValueError(f"{path}: header field {key!r} must be a positive int, got {h[key]!r}")
    if not isinstance(h["params"], dict):
        raise ValueError(f"{path}: header 'params' must be an object")
    return h


def read_classifier(path: str | Path) -> SavedClassifier:
    """Header and raw tensors of the classifier file at ``path``, format checks only (tensors are
    checked against the estimator's layout by :func:`check_tensors`)."""
    path = Path(path)
    meta, tensors = _read_raw(path)
    h = _read_header(path, meta)
    try:
        classes = _classes_from_json(h["classes"], h["classes_type"])
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from e
    if len(classes) != h["n_classes"]:
        raise ValueError(f"{path}: {len(classes)} class names for n_classes={h['n_classes']}")
    md = h.get("metadata", {})
    return SavedClassifier(
        estimator=h["estimator"],
        params=h["params"],
        classes=classes,
        n_heads=h["n_heads"],
        head_dim=h["head_dim"],
        k=h["k"],
        tensors=tensors,
        metadata=md if isinstance(md, dict) else {},
        calm_version=str(h.get("calm_version", "")),
    )


def check_tensors(saved: SavedClassifier, specs: Sequence[TensorSpec], path: str | Path) -> None:
    """Refuse (ValueError naming ``path``) tensors of ``saved`` that do not match ``specs``: missing,
    wrong shape or dtype kind, NaN or infinite floats, indices out of range. Extra tensors pass."""
    dims = saved.dims
    missing = sorted(s.name for s in specs if s.name not in saved.tensors)
    if missing:
        raise ValueError(f"{path}: missing tensors {missing}")
    for s in specs:
        a = saved.tensors[s.name]
        shape = tuple(dims[x] if isinstance(x, str) else x for x in s.shape)
        if tuple(a.shape) != shape:
            raise ValueError(f"{path}: tensor {s.name!r} has shape {tuple(a.shape)}, expected {shape}")
        kinds = "iu" if s.kind == "i" else s.kind
        if a.dtype.kind not in kinds:
            raise ValueError(f"{path}: tensor {s.name!r} has dtype {a.dtype}, expected kind {s.kind!r}")
        if s.kind == "f" and not np.isfinite(a).all():
            raise ValueError(f"{path}: tensor {s.name!r} holds NaN or infinite values")
        if s.index_of is not None and a.size and (a.min() < 0 or a.max() >= dims[s.index_of]):
            n = dims[s.index_of]
            raise ValueError(f"{path}: tensor {s.name!r} must hold indices in [0, {n}) ({s.index_of})")
