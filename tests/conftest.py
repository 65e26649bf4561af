import os
from pathlib import Path

import pytest
import torch

torch.set_num_threads(1)

ROOT = Path(__file__).resolve().parents[1]


def shared_data() -> Path:
    """Real labelled audio: $CALM_TEST_DATA, else ../shared/data beside the repository."""
    return Path(os.environ.get("CALM_TEST_DATA", ROOT.parent / "shared" / "data"))


@pytest.fixture
def esc10_root() -> Path:
    root = shared_data() / "esc10"
    if not root.is_dir():
        pytest.skip(f"real ESC-10 audio not found at {root} (set CALM_TEST_DATA)")
    return root
