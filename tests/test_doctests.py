"""Issue 22: the numpydoc examples of the public estimators run (lines that need a model or a file
are marked ``# doctest: +SKIP``)."""

from __future__ import annotations

import doctest
import importlib

import pytest

MODULES = [
    "calm.classifiers.sav",
    "calm.classifiers.calm",
    "calm.classifiers.auto",
    "calm.classifiers.probe",
    "calm.selftraining",
    "calm.audio_classifier",
]


@pytest.mark.parametrize("name", MODULES)
def test_examples_run(name):
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.attempted >= 3 and result.failed == 0, result
