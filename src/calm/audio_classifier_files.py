"""`calm.AudioClassifier` as a file: the metadata `save` writes beside the fitted classifier, and
what `load` reads back from a file (`save`'s or `calm fit`'s).

The metadata is the model's `LoadSpec.to_metadata()` (the same fields `calm fit` writes), the
extraction key and how the classifier was fitted. `read` loads the feature-level classifier
(`calm.classifiers.load`) and turns the metadata back into the model description and the
`AudioClassifier`'s parameters and fitted attributes (`SavedAudioClassifier`); the key is checked
when the model is first used.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from calm.clip_features import CACHE_DTYPE
from calm.methods import method_of
from calm.models.spec import LoadSpec, ModelMismatchError

__all__ = ["FittedAudioClassifier", "SavedAudioClassifier", "auto_device", "metadata_of", "read"]


class FittedAudioClassifier(Protocol):
    """What `metadata_of` reads of a fitted `calm.AudioClassifier`."""

    method: str
    method_params: dict[str, Any]
    self_training: dict[str, Any] | None
    cache: str | Path | None
    classifier_: Any
    extraction_key_: Any
    head_names_: list[tuple[Any, ...]]
    n_support_: int

    def model_spec(self) -> LoadSpec: ...


@dataclass(frozen=True)
class SavedAudioClassifier:
    """A file's `AudioClassifier`: its parameters (`model`, `method`, `model_options`, `params`,
    `self_training`) and fitted state (`classifier`, `head_names`, `extraction_key`, `n_support`)."""

    model: str
    method: str
    model_options: dict[str, Any]
    params: dict[str, Any]
    self_training: dict[str, Any] | None
    classifier: Any
    head_names: list[tuple[Any, ...]]
    extraction_key: Any
    n_support: int


def auto_device() -> str:
    """ "cuda" when torch sees a GPU, else "cpu"."""
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def metadata_of(clf: FittedAudioClassifier) -> dict[str, Any]:
    """What `calm predict` and `AudioClassifier.load` need: the model's `LoadSpec.to_metadata()`
    (the same fields `calm fit` writes), the extraction key and how the classifier was fitted."""
    return {
        **clf.model_spec().to_metadata(),
        "extraction_key": {"extractor": clf.extraction_key_, "dtype": CACHE_DTYPE},
        "head_names": [list(h) for h in clf.head_names_],
        "method": clf.method,
        "params": clf.classifier_.get_params(),
        "method_params": dict(clf.method_params),
        "self_training": dict(clf.self_training or {}) or None,
        "shots": None,
        "seed": None,
        "holdout": False,
        "n_support": int(clf.n_support_),
        "store": str(Path(clf.cache).absolute()) if clf.cache else None,
        "fitted_by": "calm.AudioClassifier",
        **({"selection": clf.selection_} if hasattr(clf, "selection_") else {}),  # "auto"
    }


def read(path: str | Path, *, device: str | None = None) -> SavedAudioClassifier:
    """The `AudioClassifier` a file written by `save` or by `calm fit` describes: the model as
    `LoadSpec.from_metadata` gives it (as `calm predict` loads it; `ModelMismatchError` naming the
    file for metadata that does not describe a model)."""
    from calm.classifiers import load

    inner = load(path)
    meta = dict(inner.metadata_)
    try:
        spec = LoadSpec.from_metadata(meta, device=device or auto_device())
    except ModelMismatchError as exc:
        raise ModelMismatchError(f"{path}: {exc}") from None
    options = {k: v for k, v in spec.to_metadata().items() if k not in ("model", "device", "options")}
    key = meta.get("extraction_key") or {}
    return SavedAudioClassifier(
        model=spec.label,
        method=meta.get("method") or method_of(inner),
        model_options={**{k: v for k, v in options.items() if v is not None}, **spec.options},
        params=dict(meta.get("method_params", meta.get("params")) or {}),
        self_training=meta.get("self_training"),
        classifier=inner,
        head_names=[tuple(h) for h in meta.get("head_names") or []],
        extraction_key=key.get("extractor", key),
        n_support=int(meta.get("n_support") or int(np.sum(inner.class_counts_))),
    )
