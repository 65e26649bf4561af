"""calm-audio: few-shot audio classification with class-conditional sparse attention vectors.

Public API (imported lazily so that `import calm` stays light):
`calm.AudioClassifier` (audio in, labels out), `calm.SAV`, `calm.CALM`, `calm.LinearProbe`,
`calm.SelfTraining` (SAV or CALM refitted on its confident predictions of unlabelled clips),
`calm.load` (a saved classifier), `calm.load_features` (a feature store), `calm.load_extractor`
(a frozen model as a per-head feature extractor), `calm.load_dataset`; `calm.CalmError`, the base
of every error a user can cause (`calm.errors`).

Type checkers read the real classes from the `if TYPE_CHECKING:` imports below; at run time
`__getattr__` imports a name's module on first use (`_LAZY`, which lists the same names).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from calm._version import __version__
from calm.errors import CalmError

if TYPE_CHECKING:  # the same names as _LAZY (tests/test_public_api.py checks they agree)
    from calm.audio_classifier import AudioClassifier
    from calm.classifiers import CALM, SAV, LinearProbe, load
    from calm.data import load_dataset
    from calm.models import load_extractor
    from calm.selftraining import SelfTraining
    from calm.store import load_features

_LAZY = {
    "SAV": "calm.classifiers",
    "CALM": "calm.classifiers",
    "LinearProbe": "calm.classifiers",
    "SelfTraining": "calm.selftraining",
    "load": "calm.classifiers",
    "load_features": "calm.store",
    "load_extractor": "calm.models",
    "load_dataset": "calm.data",
    "AudioClassifier": "calm.audio_classifier",
}

__all__ = [
    "CALM",
    "SAV",
    "AudioClassifier",
    "CalmError",
    "LinearProbe",
    "SelfTraining",
    "__version__",
    "load",
    "load_dataset",
    "load_extractor",
    "load_features",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'calm' has no attribute {name!r}")
