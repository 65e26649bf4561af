"""The root of calm-audio's exceptions and warnings: every error a user can cause (a bad file,
option, clip, model or store) is a `CalmError`; anything else that escapes is a bug.

Like httpx's `HTTPError`, one base lets a caller catch every user error at once
(`except calm.CalmError`), and lets the command line tell a user error (one line, exit 1) from a
bug (one line saying so, exit 3). Each module defines its own subclasses next to the code that
raises them; the subclasses that were `ValueError`s (or `OSError`s, `RuntimeError`s) before keep
that class as a second base, so existing `except ValueError` code still catches them.
Two subclasses are shared by many modules: `ParameterError` (a parameter value out of range or
unknown) and `FeatureError` (features or labels an estimator cannot use).
Warnings a user can act on derive from `CalmWarning`. The tree is in docs/architecture.md.
"""

from __future__ import annotations


class CalmError(Exception):
    """An error caused by the user's input (file, option, clip, model, store), not by a bug."""


class ParameterError(CalmError, ValueError):
    """A parameter value the library cannot use (out of range, unknown); the message names it."""


class FeatureError(CalmError, ValueError):
    """Features X or labels y an estimator cannot use (shape, dtype, NaN, classes); names the array."""


class CalmWarning(UserWarning):
    """A warning about the user's input or results (e.g. a prompt that leaks the label)."""
