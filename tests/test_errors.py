"""Issue 22: one exception hierarchy. Every exception class defined in `calm` derives from
`calm.CalmError` (every warning from `calm.errors.CalmWarning`) unless it is listed below with the
reason; the classes that were ValueErrors (OSError, RuntimeError, KeyError) still are, so old
`except ValueError` code keeps catching them.
"""

from __future__ import annotations

import importlib
import inspect
import pkgutil

import numpy as np
import pytest

import calm
from calm import _heads as H
from calm.errors import CalmError, CalmWarning
from calm.prompts import get_template, render_prompt

# class -> why it is not a CalmError
NOT_CALM_ERRORS = {
    "calm.models.hooks._StopForward": "private control flow: ends a forward pass after the last hooked layer",
    "calm.serve.api_errors.ApiError": (
        "an HTTP answer: raised in the server's handlers and turned into a JSON response there, never "
        "seen by a Python caller; its codes include server-side failures (queue_full, internal_error)"
    ),
}
# the second base each user error kept from before issue 22
KEPT_BASES = {
    "calm.audio.AudioError": ValueError,
    "calm._safetensors.SafetensorsError": ValueError,
    "calm.data.base.DatasetError": ValueError,
    "calm.evaluate.episodes.ProtocolError": ValueError,
    "calm.models.base.ExtractorError": ValueError,
    "calm.models.whisper_ct2.CT2FormatError": ValueError,
    "calm.serialization.ModelFileError": ValueError,
    "calm.store.format.StoreError": ValueError,
    "calm.store.checks.ShardDamaged": ValueError,
    "calm._files.LockedError": OSError,
    "calm.models.hooks.HookError": RuntimeError,
    "calm.prompts.UnknownTemplate": KeyError,
    "calm.errors.FeatureError": ValueError,
    "calm.errors.ParameterError": ValueError,
}


def defined_exceptions() -> dict[str, type[BaseException]]:
    """`module.Class` -> class, for every exception or warning class a `calm` module defines."""
    found = {}
    for info in pkgutil.walk_packages(calm.__path__, "calm."):
        module = importlib.import_module(info.name)
        for name, obj in vars(module).items():
            if inspect.isclass(obj) and issubclass(obj, BaseException) and obj.__module__ == info.name:
                found[f"{info.name}.{name}"] = obj
    return found


EXCEPTIONS = defined_exceptions()


def test_the_walk_finds_the_known_classes():
    assert {*KEPT_BASES, *NOT_CALM_ERRORS} <= set(EXCEPTIONS)
    assert "calm.errors.CalmError" in EXCEPTIONS and "calm.prompts.LabelLeakWarning" in EXCEPTIONS


@pytest.mark.parametrize(
    "name",
    [n for n in sorted(EXCEPTIONS) if n not in NOT_CALM_ERRORS],
)
def test_every_exception_class_is_a_calm_error_or_warning(name):
    cls = EXCEPTIONS[name]
    base = CalmWarning if issubclass(cls, Warning) else CalmError
    assert issubclass(cls, base), f"{name} must derive from {base.__name__} (or be listed with a reason)"


@pytest.mark.parametrize("name", sorted(KEPT_BASES))
def test_user_errors_keep_their_old_base(name):
    cls = EXCEPTIONS[name]
    assert issubclass(cls, CalmError) and issubclass(cls, KEPT_BASES[name])


def test_calm_error_is_public():
    assert calm.CalmError is CalmError
    assert "CalmError" in calm.__all__


def _one_class_fit():
    calm.SAV(k=1).fit(np.ones((4, 2, 3), dtype=np.float32), ["a"] * 4)


def _features_with_nan():
    X = np.ones((4, 2, 3), dtype=np.float32)
    X[1, 0, 0] = np.nan
    calm.CALM(k=1).fit(X, ["a", "a", "b", "b"])


def _config_without_data(tmp_path):
    from calm.evaluate import EvalConfig

    EvalConfig(out=tmp_path)


# library calls a user can get wrong -> the CalmError subclass they raise (before issue 22: bare ValueError)
LIBRARY_USER_ERRORS = {
    "fit on one class": (lambda tmp: _one_class_fit(), "FeatureError", "need at least two classes"),
    "features with NaN": (lambda tmp: _features_with_nan(), "FeatureError", "NaN or infinite"),
    "k out of range": (lambda tmp: H.resolve_k(99, 10), "ParameterError", "k=99 heads"),
    "EvalConfig without data": (_config_without_data, "ParameterError", "exactly one of data"),
    "unknown template": (lambda tmp: get_template("nope"), "UnknownTemplate", "unknown prompt template"),
    "prompt without classes": (
        lambda tmp: render_prompt("choices", []),
        "ParameterError",
        "pass the class names",
    ),
}


@pytest.mark.parametrize("case", sorted(LIBRARY_USER_ERRORS))
def test_library_user_errors_are_calm_errors(tmp_path, case):
    call, kind, message = LIBRARY_USER_ERRORS[case]
    with pytest.raises(CalmError, match=message) as info:
        call(tmp_path)
    assert type(info.value).__name__ == kind
    assert isinstance(info.value, KeyError if kind == "UnknownTemplate" else ValueError)
    assert not str(info.value).startswith("'")  # printed as is, without KeyError's quotes
