"""What the Ray engine's tests share: a local 2-CPU cluster, the first real ESC-10 clips, the
embedded model with `encoder_length=clip`, and the local engine's store of the same clips (the
reference a Ray store must equal)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import shared_data

MODEL = "whisper-tiny.en"
OPTIONS = {"encoder_length": "clip"}
BATCH = 4


def esc10_head(n_clips: int) -> tuple[Path, list[Any]]:
    """(the ESC-10 root, its first `n_clips` clips); skips without the real audio."""
    root = shared_data() / "esc10"
    if not root.is_dir():
        pytest.skip(f"real ESC-10 audio not found at {root} (set CALM_TEST_DATA)")
    from calm.data import load_dataset

    return root, load_dataset(f"esc10:{root}").clips[:n_clips]


def local_cluster() -> Iterator[str]:
    """A local Ray cluster of 2 CPUs (this project's machine), a small object store, no dashboard;
    yields its address and shuts it down."""
    import ray

    ray.init(num_cpus=2, object_store_memory=128 * 2**20, include_dashboard=False, log_to_driver=False)
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


def embedded_extractor() -> Any:
    from calm.models import load_extractor

    return load_extractor(MODEL, **OPTIONS)


def local_store(extractor: Any, clips: list[Any], out: Path) -> Path:
    """The local engine's store of `clips` (batch size `BATCH`), every clip stored."""
    from calm.store import extract_to_store

    assert extract_to_store(extractor, clips, out, batch_size=BATCH, progress=False).stored == len(clips)
    return out
