"""Classifier files: which estimator class a file names, and the parameters older files lack.

A head classifier class registers itself with :func:`register` (files name it by ``__name__``);
:func:`calm.classifiers.base.load` looks it up in :data:`ESTIMATORS`. A file written before a
parameter existed loads with the value it meant then (``OLD_FILE_PARAMS``, :func:`old_file_params`).
"""

from __future__ import annotations

from typing import Any, TypeVar

__all__ = ["ESTIMATORS", "OLD_FILE_PARAMS", "old_file_params", "register"]

#: Estimator classes by the name written into files.
ESTIMATORS: dict[str, type] = {}

_C = TypeVar("_C", bound=type)

#: Parameters of files written before they existed, and the value such a file meant.
OLD_FILE_PARAMS = {
    "calibration": None,
    "unknown": None,
    "unknown_label": "unknown",
    "unknown_score": "top-proba",
    "keep_support": False,
    "scores": "paper",  # CALM only: the paper's equations
}


def old_file_params(params: dict[str, Any], cls: type) -> dict[str, Any]:
    """``params`` of a file naming estimator ``cls``, completed in place with those of its
    parameters (``_parameter_constraints``) that the file was written before (``OLD_FILE_PARAMS``)."""
    known = getattr(cls, "_parameter_constraints", {})
    for name, value in OLD_FILE_PARAMS.items():
        if name in known:
            params.setdefault(name, value)
    return params


def register(cls: _C) -> _C:
    """Class decorator: files naming ``cls.__name__`` load as ``cls``."""
    ESTIMATORS[cls.__name__] = cls
    return cls
