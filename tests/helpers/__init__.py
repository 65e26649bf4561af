"""Helpers shared by the tests: tiny offline models (`tiny_models`, `tiny_omni`) and the real-data root."""

from __future__ import annotations

import os
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def shared_data() -> Path:
    """Real labelled audio: $CALM_TEST_DATA, else ../shared/data beside the repository."""
    return Path(os.environ.get("CALM_TEST_DATA", ROOT.parent / "shared" / "data"))
