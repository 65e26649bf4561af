"""Classifier files: the estimator a file names, the parameters older files lack, and ``load``.

A head classifier class registers itself with :func:`register` (files name it by ``__name__``);
:func:`load` reads a file with :func:`calm.serialization.read_classifier`, checks its parameters
with the estimator's ``_checked`` before any tensor the estimator does not declare is read, and
builds the estimator with ``_from_state``. A file written before a parameter existed loads with
the value it meant then (``OLD_FILE_PARAMS``).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from calm.serialization import ModelFileError, TensorSpec, read_classifier

if TYPE_CHECKING:
    from calm.classifiers.base import HeadClassifier

__all__ = ["ESTIMATORS", "OLD_FILE_PARAMS", "load", "old_file_params", "register"]

#: Estimator classes by the name written into files.
ESTIMATORS: dict[str, type[HeadClassifier]] = {}

_C = TypeVar("_C", bound="type[HeadClassifier]")

#: Parameters of files written before they existed, and the value such a file meant.
OLD_FILE_PARAMS = {
    "calibration": None,
    "unknown": None,
    "unknown_label": "unknown",
    "unknown_score": "top-proba",
    "keep_support": False,
}


def old_file_params(params: dict[str, Any]) -> dict[str, Any]:
    """``params`` of a file, completed in place with those it was written before (``OLD_FILE_PARAMS``)."""
    for name, value in OLD_FILE_PARAMS.items():
        params.setdefault(name, value)
    return params


def register(cls: _C) -> _C:
    """Class decorator: files naming ``cls.__name__`` load as ``cls``."""
    ESTIMATORS[cls.__name__] = cls
    return cls


def _estimator(name: str, path: str | Path) -> type[HeadClassifier]:
    cls = ESTIMATORS.get(name)
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
        cls._checked(old_file_params(params), path)  # bad parameters are refused before any tensor is read
        return cls._state_specs(params)

    saved = read_classifier(path, layout)
    return _estimator(saved.estimator, path)._from_state(saved, path)
