"""One classifier fitted on a feature store, with the metadata `calm predict`, `calm serve` and
`calm.AudioClassifier.load` read back: the library side of `calm fit`.

`fit_store(store, method=...)` picks the support rows (every clip, the training part with
`holdout`, or `shots` per class drawn with `seed`, as `calm evaluate` draws episodes), fits the
method with `ClassifierSpec`'s defaults and returns the fitted estimator with its metadata:
the model as `LoadSpec.from_key(store key).to_metadata()` (the one description of a model), the
store key, the head names and how it was fitted. Errors are `ProtocolError` / `ValueError` naming
the store.

`add_to_file(model_file, data)` is `calm fit --add`: a classifier saved with `keep_support=True`,
the clips of dataset `data` added by `partial_fit` after extracting only them, with the model and
options the file records (its extraction key checked: `calm.inference.load_predictor`) into a
temporary feature store of the file's storage dtype, as `calm extract` stored the others.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from calm.errors import CalmError
from calm.evaluate.config import ClassifierSpec
from calm.evaluate.episodes import Part, ProtocolError, make_parts, row_labels, sample_episode, task_of
from calm.methods import DEFAULT_METHOD
from calm.models.spec import LoadSpec

__all__ = ["FitResult", "add_to_file", "fit_store", "store_metadata", "support_rows"]


@dataclass(frozen=True)
class FitResult:
    """A classifier fitted on a store: the estimator, its metadata (for `save`), the rows used."""

    classifier: Any
    metadata: dict[str, Any]
    rows: np.ndarray


def store_metadata(meta: Any) -> dict[str, Any]:
    """The model of a store's features (`meta.attrs`: its key and head names) as classifier metadata:
    `LoadSpec.to_metadata()` fields, `extraction_key` ({"extractor": ..., "dtype": storage dtype}, the
    form `calm.models.spec.check_key` reads) and `head_names`."""
    key = dict(meta.attrs.get("key") or {})
    ext = dict(key.get("extractor", key))
    stored = {"extractor": ext, **({"dtype": key["dtype"]} if "extractor" in key and "dtype" in key else {})}
    return {
        **LoadSpec.from_key(ext).to_metadata(),
        # where the features were computed is not recorded: the predicting device's default dtype
        "dtype": None,
        "device": None,
        "extraction_key": stored,
        "head_names": [list(h) for h in meta.attrs.get("head_names", [])],
    }


def support_rows(
    y: np.ndarray,
    meta: Any,
    *,
    holdout: bool = False,
    test_fold: str = "5",
    shots: int | None = None,
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """(rows fitted on, their labels): every clip, or the training part (`holdout`), or `shots` per
    class drawn with `seed`. ProtocolError for multi-label rows without `shots`."""
    rows = np.arange(len(y))
    if holdout:
        parts, _ = make_parts(meta, test_fold)
        rows = parts[0].train
    support_y = y[rows]
    if shots is not None:
        episode = sample_episode(row_labels(y), Part("fit", rows, None), shots, seed)
        rows, support_y = episode.support, episode.support_y
    if task_of(support_y) == "multilabel":
        raise ProtocolError("multi-label rows: use --shots so each support clip stands for one class")
    return rows, support_y


def fit_store(
    store: str | os.PathLike,
    *,
    method: str = DEFAULT_METHOD,
    key: str | None = None,
    shots: int | None = None,
    seed: int = 0,
    holdout: bool = False,
    test_fold: str = "5",
    classifier: ClassifierSpec | None = None,
    params: dict[str, Any] | None = None,
) -> FitResult:
    """Fit `method` on the store's features (see the module docstring); `params`: estimator
    parameters beyond the method's defaults (e.g. `{"unknown": 0.95}`, the reject option)."""
    from calm.store import load_features

    X, y, meta = load_features(Path(store), key=key)
    y = np.asarray(y).astype(str)
    try:
        rows, support_y = support_rows(y, meta, holdout=holdout, test_fold=test_fold, shots=shots, seed=seed)
    except ProtocolError as exc:
        raise ProtocolError(f"{store}: {exc}") from None
    m = (classifier or ClassifierSpec()).registry()[method]
    chosen = {**m.defaults, **(params or {})}
    foreign = sorted(set(params) - set(m.build(**m.defaults).get_params())) if params else []
    if foreign:  # e.g. k on the linear probe
        raise ProtocolError(f"{store}: {method} has no parameter {', '.join(foreign)}")
    try:
        clf = m.build(**chosen).fit(np.asarray(X[rows], dtype=np.float32), support_y)
    except CalmError as exc:  # e.g. a store with one class (FeatureError)
        raise ProtocolError(f"{store}: cannot fit {method}: {exc}") from exc
    metadata = {
        **store_metadata(meta),
        "method": method,
        "params": chosen,
        "shots": shots,
        "seed": seed,
        "holdout": holdout,
        "n_support": int(len(rows)),
        "store": str(Path(store).absolute()),
    }
    return FitResult(clf, metadata, rows)


def add_to_file(
    model_file: str | os.PathLike,
    data: str,
    *,
    device: str = "cpu",
    batch_size: int = 8,
    progress: Any = None,
    trust_file_model: bool = False,
    announce: Any = None,
) -> FitResult:
    """The classifier in `model_file` with every clip of dataset `data` (`KIND:ROOT`) added (see
    the module docstring); `rows` are the new clips' rows. FeatureError naming the file when it
    keeps no support set (before any model is loaded); `ModelMismatchError` when the model now
    gives other features than the file's key; `StoreError` when a clip cannot be read."""
    from calm.classifiers import load
    from calm.classifiers.support import require
    from calm.data import load_dataset
    from calm.inference import load_predictor
    from calm.store import extract_to_store, load_features

    require(load(model_file), str(model_file))  # before any model is loaded
    dataset = load_dataset(data)
    if dataset.multi_label:
        raise ProtocolError(f"{data}: multi-label clips cannot be added (one class per support clip)")
    predictor = load_predictor(
        model_file, device=device, trust_file_model=trust_file_model, announce=announce
    )
    clf, metadata = predictor.classifier, dict(predictor.classifier.metadata_)
    dtype = (metadata.get("extraction_key") or {}).get("dtype") or "float16"
    with tempfile.TemporaryDirectory(prefix="calm-add-") as tmp:
        extract_to_store(
            predictor.extractor, dataset, tmp, batch_size=batch_size, dtype=dtype,
            allow_failures=False, progress=progress,
        )  # fmt: skip
        X, y, _ = load_features(tmp)
        X, y = np.asarray(X, dtype=np.float32), np.asarray(y).astype(str)  # as fit_store reads a store
    clf.partial_fit(X, y)
    added = [*metadata.get("added", []), {"data": data, "clips": len(y)}]
    metadata.update(n_support=int(np.sum(clf.class_counts_)), added=added)
    return FitResult(clf, metadata, np.arange(len(y)))
