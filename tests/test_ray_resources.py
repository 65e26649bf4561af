"""Issue 23, item 5: the Ray engine fits its actors to the cluster or refuses in one line, and a
run that finishes no clip for a while says so.

Without a cluster: how options are fitted or refused, and the stall watch. On a real local Ray
cluster of 2 CPUs (as tests/test_ray.py starts one): `calm extract --engine ray --actors 2` with
the default --cpus-per-actor (which used to hang forever) finishes with the local engine's
features, asking for more CPUs than the cluster has is refused within seconds, and a run whose
decoding tasks wait for CPUs another job holds reports the stall, then finishes once they are free.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from calm.store import StoreError, load_features
from calm.store.distributed import RayOptions
from calm.store.stall import StallWatch
from tests.helpers import ROOT
from tests.helpers.ray_cluster import BATCH, MODEL, OPTIONS, embedded_extractor, esc10_head, local_cluster
from tests.helpers.ray_cluster import local_store as make_local_store

N_CLIPS = 8


def test_two_actors_on_two_cpus_get_a_fraction_each_leaving_room_for_decoding():
    opts = RayOptions(actors=2).resolved({"CPU": 2})
    assert opts.cpus_per_actor == 0.75 and opts.actors * opts.cpus_per_actor + opts.decode_cpus <= 2
    assert RayOptions().resolved({"CPU": 16}).cpus_per_actor == 1.0  # room enough: one CPU each
    assert RayOptions(cpus_per_actor=4).resolved({"CPU": 16}).cpus_per_actor == 4  # as asked
    assert "2 extractor actors x 0.75 CPU" in opts.describe({"CPU": 2})


@pytest.mark.parametrize(
    ("options", "cluster", "needles"),
    [
        (RayOptions(actors=2, cpus_per_actor=1), {"CPU": 2}, ["2 actors x 1 CPUs", "2 CPUs", "at most 0.75"]),
        (RayOptions(actors=400), {"CPU": 2}, ["400 actors", "lower --actors"]),
        (RayOptions(), {"CPU": 0.5}, ["0.5 CPUs", "--actors"]),
        (RayOptions(actors=3, gpus_per_actor=1), {"CPU": 8, "GPU": 2}, ["need 3 GPUs", "--gpus-per-actor"]),
    ],
)
def test_what_the_cluster_cannot_run_at_once_is_refused_in_one_line(options, cluster, needles):
    with pytest.raises(StoreError) as info:
        options.resolved(cluster)
    message = str(info.value)
    assert "\n" not in message and "--cpus-per-actor" in message or "--gpus-per-actor" in message
    for needle in needles:
        assert needle in message, message


def test_the_stall_watch_reports_a_wait_and_is_quiet_while_results_arrive():
    lines: list[str] = []
    with StallWatch(0.005, lines.append, lambda: "free: nothing") as watch:  # 0.3 s
        for _ in range(10):
            time.sleep(0.05)
            watch.tick()
        assert not lines
        time.sleep(1.0)
    assert lines and lines[0].startswith("no clip finished in 0.0 min (10 done); free: nothing")
    assert len(lines) <= 4  # once per stalled period, not per poll


# ---------------------------------------------------------------------------------- real cluster

ray = pytest.importorskip("ray", reason="the Ray engine needs ray[data]: pip install 'calm-audio[ray]'")


@pytest.fixture(scope="module")
def esc10():
    return esc10_head(N_CLIPS)


@pytest.fixture(scope="module")
def cluster():
    yield from local_cluster()


@pytest.fixture(scope="module")
def extractor():
    return embedded_extractor()


@pytest.fixture(scope="module")
def local_store(esc10, extractor, tmp_path_factory):
    return make_local_store(extractor, esc10[1], tmp_path_factory.mktemp("local"))


def assert_same_features(store, reference) -> None:
    X, y, meta = load_features(store, mmap=False)
    X0, y0, meta0 = load_features(reference, mmap=False)
    assert meta["path"].tolist() == meta0["path"].tolist() and y.tolist() == y0.tolist()
    assert meta.attrs["digest"] == meta0.attrs["digest"] and np.array_equal(X, X0)


def calm_extract(address: str, root, out, *extra: str, timeout: float) -> subprocess.CompletedProcess:
    cmd = [
        sys.executable, "-m", "calm.cli", "extract", "--model", MODEL, "-o", "encoder_length=clip",
        "--data", f"esc10:{root}", "--limit", str(N_CLIPS), "--out", str(out), "--batch-size", str(BATCH),
        "--engine", "ray", "--ray-address", address, "--no-progress", *extra,
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)


def test_more_cpus_than_the_cluster_has_are_refused_within_seconds(cluster, esc10, tmp_path):
    t0 = time.monotonic()
    res = calm_extract(
        cluster, esc10[0], tmp_path / "s", "--actors", "2", "--cpus-per-actor", "1", timeout=120
    )
    lines = [ln for ln in res.stderr.splitlines() if ln.startswith("calm: error: ")]
    assert res.returncode == 1 and len(lines) == 1, res.stderr
    assert "2 actors x 1 CPUs" in lines[0] and "--cpus-per-actor" in lines[0] and "2 CPUs" in lines[0]
    assert time.monotonic() - t0 < 60 and "Traceback" not in res.stderr


@pytest.mark.slow  # two actors load whisper-tiny.en on a shared 2-CPU machine
def test_two_actors_on_two_cpus_finish_with_the_local_features(cluster, esc10, local_store, tmp_path):
    res = calm_extract(cluster, esc10[0], tmp_path / "s", "--actors", "2", timeout=400)
    assert res.returncode == 0, res.stderr
    assert "Ray: 2 extractor actors x 0.75 CPU" in res.stderr
    assert_same_features(tmp_path / "s", local_store)


@ray.remote(num_cpus=1.5)
class Hog:
    """Another job's actor holding most of the cluster's CPUs."""

    def ready(self) -> bool:
        return True


@pytest.mark.slow  # an actor loads whisper-tiny.en
def test_a_run_waiting_for_cpus_reports_the_stall_then_finishes(
    cluster, esc10, extractor, local_store, tmp_path
):
    from calm.models.spec import LoadSpec
    from calm.store.distributed import extract_with_ray

    hog = Hog.remote()
    ray.get(hog.ready.remote())
    lines: list[str] = []

    def notify(line: str) -> None:
        lines.append(line)
        if "no clip finished" in line:  # the other job ends: its CPUs come free
            threading.Thread(target=ray.kill, args=(hog,)).start()

    opts = RayOptions(actors=1, cpus_per_actor=0.5, stall_minutes=0.05)  # fits the cluster's total
    report = extract_with_ray(
        LoadSpec(MODEL, options=OPTIONS), esc10[1], tmp_path / "s", options=opts, batch_size=BATCH,
        progress=False, extractor=extractor, notify=notify,
    )  # fmt: skip
    stalls = [ln for ln in lines if "no clip finished" in ln]
    assert (
        stalls
        and stalls[0].startswith("Ray: no clip finished in ")
        and "free on the cluster: 0 of 2 CPU" in stalls[0]
    )
    assert report.stored == N_CLIPS
    assert_same_features(tmp_path / "s", local_store)
