from pathlib import Path

import pytest
import torch

from tests.helpers import shared_data

torch.set_num_threads(1)


@pytest.fixture
def esc10_root() -> Path:
    root = shared_data() / "esc10"
    if not root.is_dir():
        pytest.skip(f"real ESC-10 audio not found at {root} (set CALM_TEST_DATA)")
    return root
