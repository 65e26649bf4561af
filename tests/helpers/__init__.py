"""Helpers shared by the tests: tiny offline models (`tiny_models`, `tiny_omni`) and the real-data root."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from types import ModuleType

import numpy as np

ROOT = Path(__file__).resolve().parents[2]


def shared_data() -> Path:
    """Real labelled audio: $CALM_TEST_DATA, else ../shared/data beside the repository."""
    return Path(os.environ.get("CALM_TEST_DATA", ROOT.parent / "shared" / "data"))


def benchmark_script(name: str) -> ModuleType:
    """`benchmarks/<name>.py` imported as a module (the scripts are not a package)."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def readonly_float16_map(path: Path, X: np.ndarray) -> np.memmap:
    """`X` written to `path` as float16 and mapped back read-only, as a feature store provides it."""
    mm = np.memmap(path, dtype=np.float16, mode="w+", shape=X.shape)
    mm[:] = X
    mm.flush()
    return np.memmap(path, dtype=np.float16, mode="r", shape=X.shape)
