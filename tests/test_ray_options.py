"""The Ray engine's pieces that need no cluster: options, the install hint, the extractor shell, the
driver's de-duplication, and the CLI's engine options."""

from __future__ import annotations

import pickle
import sys

import numpy as np
import pytest
from click.testing import CliRunner

from calm.store import Extraction, StoreError, load_features
from calm.store.distributed import INSTALL_HINT, ExtractorShell, RayOptions, drain, require_ray
from tests.test_store import FakeExtractor, make_clips


def test_without_ray_the_engine_says_how_to_install_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)
    with pytest.raises(StoreError, match=r"pip install 'calm-audio\[ray\]'"):
        require_ray()
    assert "calm-audio[ray]" in INSTALL_HINT


def test_options_resolve_against_the_cluster():
    assert RayOptions().resolved({"CPU": 8}).actors == 1  # CPU-only: one actor
    on_gpus = RayOptions().resolved({"CPU": 64, "GPU": 8})
    assert on_gpus.actors == 8 and on_gpus.gpus_per_actor == 1
    assert RayOptions(gpus_per_actor=0.5).resolved({"CPU": 8, "GPU": 2}).actors == 4
    assert RayOptions(actors=3).resolved({"CPU": 8, "GPU": 8}).actors == 3
    with pytest.raises(StoreError, match="has 0 GPUs"):
        RayOptions(gpus_per_actor=1).resolved({"CPU": 4})
    with pytest.raises(StoreError):
        RayOptions(actors=0)
    with pytest.raises(StoreError):
        RayOptions(cpus_per_actor=0)


def test_the_shell_pickles_without_the_model_and_reads_clips_the_same(tmp_path):
    clips = make_clips(tmp_path / "audio", n=2)
    ext = FakeExtractor()
    shell = pickle.loads(pickle.dumps(ExtractorShell(ext)))
    assert shell.key == ext.key and shell.head_names == list(ext.head_names)
    for clip in clips:
        assert np.array_equal(shell.load_input(str(clip.path)), ext.load_input(str(clip.path)))


def result_row(paths, hashes, ok, features, reasons):
    res = {"paths": paths, "hashes": hashes, "ok": ok, "features": features, "reasons": reasons, "pid": 1}
    return {"id": 0, "blob": pickle.dumps(res)}


def test_the_driver_writes_a_retried_chunk_once(tmp_path):
    clips = make_clips(tmp_path / "audio", n=4)
    ext = FakeExtractor()
    K, d = len(ext.head_names), 4
    feats = np.arange(4 * K * d, dtype=np.float32).reshape(4, K, d)
    with Extraction(ExtractorShell(ext), tmp_path / "store", progress=False).start(clips) as run:
        paths = [p for p, _ in run.pending]
        first = result_row(paths[:2], ["a", "b"], [0, 1], feats[:2], [None, None])
        # the same chunk again (an actor died after sending it), then one with a failed clip
        second = result_row(paths[2:], ["c", "d"], [1], feats[3:], ["cannot decode", None])
        duplicates = drain(run, iter([first, first, second]))
    assert duplicates == 2
    assert run.report.stored == 3 and run.report.failed == [(paths[2], "cannot decode")]
    X, _, meta = load_features(tmp_path / "store", mmap=False)
    assert sorted(meta["path"]) == sorted([paths[0], paths[1], paths[3]])
    assert np.array_equal(X[meta["path"].tolist().index(paths[3])], feats[3].astype(np.float16))


def test_extract_help_lists_the_engine_options():
    from calm.cli import main

    for command in ("extract", "evaluate"):
        out = CliRunner().invoke(main, [command, "--help"]).output
        for option in ("--engine", "--ray-address", "--actors", "--gpus-per-actor", "--cpus-per-actor"):
            assert option in out, (command, option)


def test_the_engine_options_become_ray_options_of_the_eval_config():
    from calm.commands.options import ray_options

    params = {"engine": "ray", "ray_address": "auto", "actors": 2, "gpus_per_actor": 0.5, "cpus_per_actor": 4}
    assert ray_options(params) == RayOptions(address="auto", actors=2, gpus_per_actor=0.5, cpus_per_actor=4)
    assert ray_options({**params, "engine": "local"}) is None
