"""The Ray engine (`calm.store.distributed`) on a real local Ray cluster (CPU only, started once).

Real whisper-tiny.en on 24 real ESC-10 clips with `encoder_length=clip`: the Ray engine runs
exactly the local engine's batches, so its store must be bitwise equal to the local one, also
after an actor is killed mid-run or the driver is killed and the run resumed.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from tests.helpers import ROOT
from tests.helpers.ray_cluster import BATCH, MODEL, OPTIONS, embedded_extractor, esc10_head, local_cluster
from tests.helpers.ray_cluster import local_store as make_local_store

ray = pytest.importorskip("ray", reason="the Ray engine needs ray[data]: pip install 'calm-audio[ray]'")

from calm.models.spec import LoadSpec  # noqa: E402
from calm.store import list_keys, load_features, read_index  # noqa: E402
from calm.store.distributed import RayOptions, extract_with_ray  # noqa: E402

N_CLIPS = 24
ACTOR_TITLE = "MapWorker(MapBatches(Embed))"


@pytest.fixture(scope="module")
def esc10_clips():
    return esc10_head(N_CLIPS)


@pytest.fixture(scope="module")
def cluster():
    yield from local_cluster()


@pytest.fixture(scope="module")
def extractor():
    return embedded_extractor()


@pytest.fixture(scope="module")
def local_store(esc10_clips, extractor, tmp_path_factory):
    """The local engine's store of the same clips, batch size and options."""
    return make_local_store(extractor, esc10_clips[1], tmp_path_factory.mktemp("local"))


def two_actors() -> RayOptions:
    # 2 actors of half a CPU each leave one CPU of the 2-CPU cluster to the decoding tasks
    return RayOptions(actors=2, cpus_per_actor=0.5, decode_cpus=0.5)


def assert_same_store(store: Path, reference: Path) -> None:
    """Every clip indexed exactly once, and `load_features` bitwise equal to the reference."""
    (key,) = list_keys(store)
    rows, _ = read_index(key["dir"] / "index.jsonl")
    paths = [r["path"] for r in rows]
    assert len(paths) == len(set(paths)) == N_CLIPS
    X, y, meta = load_features(store, mmap=False)
    X0, y0, meta0 = load_features(reference, mmap=False)
    assert meta["path"].tolist() == meta0["path"].tolist() and y.tolist() == y0.tolist()
    assert meta["hash"].tolist() == meta0["hash"].tolist()
    assert meta["duration"].tolist() == meta0["duration"].tolist() and None not in meta["duration"].tolist()
    assert meta.attrs["key"] == meta0.attrs["key"] and meta.attrs["digest"] == meta0.attrs["digest"]
    assert X.dtype == X0.dtype and np.array_equal(X, X0)


def test_ray_engine_store_is_bitwise_equal_to_local(cluster, esc10_clips, extractor, local_store, tmp_path):
    events = []
    report = extract_with_ray(
        LoadSpec.from_options(MODEL, OPTIONS),
        esc10_clips[1],
        tmp_path,
        options=two_actors(),
        batch_size=BATCH,
        progress=events.append,
        extractor=extractor,
    )
    assert report.stored == N_CLIPS and not report.failed
    assert_same_store(tmp_path, local_store)
    assert events[0].done == 0 and events[-1].done == events[-1].total == N_CLIPS
    assert events[-1].clips_per_second > 0 and events[-1].stored == N_CLIPS


def _parent(pid: int) -> int:
    stat = Path(f"/proc/{pid}/stat").read_text()
    return int(stat.rsplit(")", 1)[1].split()[1])


def actor_pids() -> list[int]:
    """The pids of this test's extractor actors: processes under this one that Ray titled after them."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if ACTOR_TITLE not in (entry / "cmdline").read_text():
                continue
            pid = int(entry.name)
            while pid > 1 and pid != os.getpid():
                pid = _parent(pid)
        except (OSError, ValueError):
            continue
        if pid == os.getpid():
            found.append(int(entry.name))
    return found


def test_a_killed_actor_is_restarted_and_no_clip_is_lost_or_stored_twice(
    cluster, esc10_clips, extractor, local_store, tmp_path
):
    killed: list[int] = []

    def kill_one_actor(event):
        if event.done and not killed:
            pids = actor_pids()
            assert pids, "no extractor actor process found"
            os.kill(pids[0], signal.SIGKILL)
            killed.append(pids[0])

    report = extract_with_ray(
        LoadSpec.from_options(MODEL, OPTIONS),
        esc10_clips[1],
        tmp_path,
        options=two_actors(),
        batch_size=BATCH,
        progress=kill_one_actor,
        extractor=extractor,
    )
    assert killed and report.stored == N_CLIPS and not report.failed
    assert_same_store(tmp_path, local_store)


def test_a_killed_driver_leaves_a_store_a_rerun_completes_and_a_bad_file_is_reported(
    cluster, esc10_clips, extractor, local_store, tmp_path
):
    """SIGKILL of `calm extract --engine ray` after its first batch, then a rerun with a broken file
    among the clips: every clip stored exactly once, the broken one reported as a failure naming it."""
    root, clips = esc10_clips
    out = tmp_path / "store"
    cmd = [
        sys.executable, "-m", "calm.cli", "extract", "--model", MODEL, "-o", "encoder_length=clip",
        "--data", f"esc10:{root}", "--limit", str(N_CLIPS), "--out", str(out), "--batch-size", str(BATCH),
        "--engine", "ray", "--ray-address", cluster, "--actors", "1", "--cpus-per-actor", "0.5",
        "--no-progress",
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    log = tmp_path / "driver.log"  # a file, not a pipe: a full pipe would stall the driver
    driver = subprocess.Popen(cmd, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT)
    try:
        index = None
        deadline = time.monotonic() + 600  # a generous bound: start-up is slow on a loaded machine
        while driver.poll() is None and time.monotonic() < deadline:
            keys = list_keys(out) if out.is_dir() else []
            index = keys[0]["dir"] / "index.jsonl" if keys else None
            if index is not None and index.is_file() and index.read_text().count("\n") >= BATCH:
                break
            time.sleep(0.2)
        assert driver.poll() is None, f"the driver ended before it was killed:\n{log.read_text()}"
        driver.send_signal(signal.SIGKILL)
        driver.wait()
        assert index is not None and index.is_file(), f"no batch stored in 600 s:\n{log.read_text()}"
    finally:
        driver.kill()
        driver.wait()
    stored_before = len(read_index(index)[0])
    assert 0 < stored_before < N_CLIPS

    bad = tmp_path / "broken.wav"
    bad.write_bytes(b"RIFF this is not audio")
    report = extract_with_ray(
        LoadSpec.from_options(MODEL, OPTIONS),
        [*clips, bad],  # last: the other chunks are the local engine's batches
        out,
        options=two_actors(),
        batch_size=BATCH,
        progress=False,
        extractor=extractor,
    )
    assert report.skipped == stored_before and report.stored == N_CLIPS - stored_before
    assert len(report.failed) == 1 and report.failed[0][0] == str(bad) and report.failed[0][1]
    (key,) = list_keys(out)
    failures = [json.loads(line) for line in (key["dir"] / "failures.jsonl").read_text().splitlines()]
    assert [f["path"] for f in failures] == [str(bad)]
    assert_same_store(out, local_store)
