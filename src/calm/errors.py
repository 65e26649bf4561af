"""The root of calm-audio's exceptions: every error a user can cause (a bad file, option, clip,
model or store) is a `CalmError`; anything else that escapes is a bug.

Like httpx's `HTTPError`, one base lets a caller catch every user error at once
(`except calm.CalmError`), and lets the command line tell a user error (one line, exit 1) from a
bug (a traceback). Each module defines its own subclasses next to the code that raises them; the
subclasses that were `ValueError`s before keep `ValueError` as a second base, so existing
`except ValueError` code still catches them.
"""

from __future__ import annotations


class CalmError(Exception):
    """An error caused by the user's input (file, option, clip, model, store), not by a bug."""
