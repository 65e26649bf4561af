"""calm-audio: few-shot audio classification with class-conditional sparse attention vectors.

Public API (imported lazily so that `import calm` stays light):
`calm.AudioClassifier` (audio in, labels out), `calm.SAV`, `calm.CALM`, `calm.load` (a saved
classifier), `calm.load_features` (a feature store), `calm.load_extractor` (a frozen model as a
per-head feature extractor), `calm.load_dataset`.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_LAZY = {
    "SAV": "calm.classifiers",
    "CALM": "calm.classifiers",
    "load": "calm.classifiers",
    "load_features": "calm.store",
    "load_extractor": "calm.models",
    "load_dataset": "calm.data",
    "AudioClassifier": "calm.audio_classifier",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'calm' has no attribute {name!r}")
