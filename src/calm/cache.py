"""The user cache shared by the package (converted models, downloaded datasets)."""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    """$CALM_CACHE, else $XDG_CACHE_HOME/calm, else ~/.cache/calm."""
    if os.environ.get("CALM_CACHE"):
        return Path(os.environ["CALM_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "calm"
