import os
from pathlib import Path

import pytest
import torch

from tests.helpers import shared_data

torch.set_num_threads(1)

# The `auto` dtype is bf16 on CPUs with native bf16 units and float32 elsewhere. The suite pins it
# to float32 (here and in every subprocess it starts) so that its figures and tolerances do not
# depend on the CI machine; the bf16 paths are tested with an explicit dtype or CALM_CPU_BF16=1
# (tests/test_load_spec.py, tests/test_whisper.py).
os.environ["CALM_CPU_BF16"] = "0"


@pytest.fixture
def esc10_root() -> Path:
    root = shared_data() / "esc10"
    if not root.is_dir():
        pytest.skip(f"real ESC-10 audio not found at {root} (set CALM_TEST_DATA)")
    return root
