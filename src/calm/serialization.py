"""Saving and loading fitted classifiers: safetensors tensors plus a JSON header. Never pickle.

File layout: a safetensors file whose string metadata holds one key, ``"calm"``, a JSON object::

    {"format": "calm-classifier", "format_version": 1, "estimator": "CALM" | "SAV",
     "calm_version": "...", "params": {...get_params()...},
     "classes": [...], "classes_type": "str" | "int" | "float" | "bool",
     "n_classes": C, "n_heads": K, "head_dim": d, "k": k_, "metadata": {...}}

and the tensors ``centroids`` (C, K, d) and ``class_counts`` (C,), plus for CALM ``reliability``
((C, K) or (K,)), ``weights`` (C, K), ``heads`` ((C, k) or (k,)), and for SAV ``head_scores`` (K,),
``heads`` (k,) and, with ``tie_break="margin"``, ``head_margins`` (K,). A file with a missing key,
a wrong shape or an unknown format version is refused with a ValueError naming the problem.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from calm._files import atomic_write_bytes, json_default

FORMAT = "calm-classifier"
FORMAT_VERSION = 1

__all__ = ["FORMAT", "FORMAT_VERSION", "save_classifier", "load_classifier"]


def _classes_to_json(classes: np.ndarray) -> tuple[list, str]:
    values = classes.tolist()
    for name, types in (("bool", (bool,)), ("int", (int,)), ("float", (float,)), ("str", (str,))):
        if all(isinstance(v, types) and (name == "bool" or not isinstance(v, bool)) for v in values):
            return values, name
    raise ValueError("only str, int, float or bool class labels can be saved; got " + repr(values[:3]))


def _classes_from_json(values, kind: str) -> np.ndarray:
    types = {"str": (str,), "int": (int,), "float": (float, int), "bool": (bool,)}
    if kind not in types or not isinstance(values, list):
        raise ValueError(f"bad class names in header (type {kind!r})")
    if not all(isinstance(v, types[kind]) and (kind == "bool" or not isinstance(v, bool)) for v in values):
        raise ValueError(f"bad class names in header: not all of type {kind!r}")
    if kind == "str":
        return np.asarray(values, dtype=str)
    return np.asarray(values, dtype={"int": np.int64, "float": np.float64, "bool": np.bool_}[kind])


def _tensors(clf) -> dict[str, np.ndarray]:
    t = {"centroids": clf.centroids_, "class_counts": clf.class_counts_, "heads": clf.heads_}
    if type(clf).__name__ == "CALM":
        t.update(reliability=clf.reliability_, weights=clf.weights_)
    else:
        t["head_scores"] = clf.head_scores_
        if getattr(clf, "head_margins_", None) is not None and clf.tie_break == "margin":
            t["head_margins"] = clf.head_margins_
    return {k: np.ascontiguousarray(v) for k, v in t.items()}


def save_classifier(clf, path, metadata: dict | None = None) -> None:
    """Write fitted ``clf`` (SAV or CALM) to ``path`` (written atomically)."""
    from safetensors.numpy import save

    import calm

    classes, kind = _classes_to_json(clf.classes_)
    header = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "estimator": type(clf).__name__,
        "calm_version": calm.__version__,
        "params": clf.get_params(deep=False),
        "classes": classes,
        "classes_type": kind,
        "n_classes": len(classes),
        "n_heads": int(clf.n_heads_),
        "head_dim": int(clf.head_dim_),
        "k": int(clf.k_),
        "metadata": dict(metadata or {}),
    }
    try:
        text = json.dumps(header, default=json_default, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise ValueError(f"parameters and metadata must be JSON-serialisable: {e}") from e
    path = Path(path)
    atomic_write_bytes(path, save(_tensors(clf), metadata={"calm": text}))


def _expected_shapes(est: str, h: dict, tensors: dict) -> dict[str, tuple]:
    C, K, d, k = h["n_classes"], h["n_heads"], h["head_dim"], h["k"]
    shapes = {"centroids": (C, K, d), "class_counts": (C,)}
    if est == "CALM":
        glob = h["params"].get("weighting") == "global"
        shapes.update(reliability=(K,) if glob else (C, K), weights=(C, K), heads=(k,) if glob else (C, k))
    else:
        shapes.update(head_scores=(K,), heads=(k,))
        if h["params"].get("tie_break") == "margin":
            shapes["head_margins"] = (K,)
    return shapes


def load_classifier(path):
    """Read a classifier written by :func:`save_classifier`; refuses bad files with ValueError."""
    from safetensors import safe_open

    from calm.classifiers import CALM, SAV

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no classifier file at {path}")
    try:
        with safe_open(str(path), framework="numpy") as f:
            meta = f.metadata() or {}
            tensors = {key: np.array(f.get_tensor(key)) for key in f.keys()}  # noqa: SIM118
    except Exception as e:  # safetensors raises its own error types for corrupt files
        raise ValueError(f"{path} is not a readable safetensors file: {e}") from e
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
    required = ("estimator", "params", "classes", "classes_type", "n_classes", "n_heads", "head_dim", "k")
    missing = [key for key in required if key not in h]
    if missing:
        raise ValueError(f"{path}: header is missing {missing}")
    est_cls = {"SAV": SAV, "CALM": CALM}.get(h["estimator"])
    if est_cls is None:
        raise ValueError(f"{path}: unknown estimator {h['estimator']!r}")
    for key in ("n_classes", "n_heads", "head_dim", "k"):
        if not isinstance(h[key], int) or isinstance(h[key], bool) or h[key] < 1:
            raise ValueError(f"{path}: header field {key!r} must be a positive int, got {h[key]!r}")
    if not isinstance(h["params"], dict):
        raise ValueError(f"{path}: header 'params' must be an object")
    shapes = _expected_shapes(h["estimator"], h, tensors)
    missing = sorted(set(shapes) - set(tensors))
    if missing:
        raise ValueError(f"{path}: missing tensors {missing}")
    for key, shape in shapes.items():
        if tuple(tensors[key].shape) != shape:
            raise ValueError(
                f"{path}: tensor {key!r} has shape {tuple(tensors[key].shape)}, expected {shape}"
            )
    classes = _classes_from_json(h["classes"], h["classes_type"])
    if len(classes) != h["n_classes"]:
        raise ValueError(f"{path}: {len(classes)} class names for n_classes={h['n_classes']}")
    try:
        clf = est_cls(**h["params"])
        clf._validate_params()
    except (TypeError, ValueError) as e:
        raise ValueError(f"{path}: bad parameters {h['params']}: {e}") from e
    for key in ("centroids", "reliability", "weights", "head_scores", "head_margins"):
        if key in tensors and not np.isfinite(tensors[key]).all():
            raise ValueError(f"{path}: tensor {key!r} holds NaN or infinite values")
    heads = tensors["heads"]
    if heads.dtype.kind not in "iu" or heads.min() < 0 or heads.max() >= h["n_heads"]:
        raise ValueError(f"{path}: tensor 'heads' must hold head indices in [0, {h['n_heads']})")
    clf.classes_ = classes
    clf.class_counts_ = tensors["class_counts"]
    clf.centroids_ = tensors["centroids"]
    clf.n_heads_, clf.head_dim_, clf.k_ = h["n_heads"], h["head_dim"], h["k"]
    clf.n_features_in_ = clf.n_heads_ * clf.head_dim_
    clf.heads_ = heads.astype(np.int64)
    if est_cls is CALM:
        clf.reliability_, clf.weights_ = tensors["reliability"], tensors["weights"]
    else:
        clf.head_scores_ = tensors["head_scores"]
        if "head_margins" in tensors:
            clf.head_margins_ = tensors["head_margins"]
    md = h.get("metadata", {})
    clf.metadata_ = md if isinstance(md, dict) else {}
    clf._unit = None
    clf._prepare()
    clf._unit = None
    return clf
