import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import soundfile as sf

from calm.data.base import Clip
from calm.store import (
    INDEX_FILE,
    SHARD_DIR,
    ExtractProgress,
    ShardedArray,
    StoreError,
    _Lock,
    compact,
    extract_to_store,
    file_sha256,
    list_keys,
    load_features,
    resolve_key_dir,
)

RATE = 8000
N_LAYERS, N_HEADS, DIM = 2, 3, 4


class FakeExtractor:
    """A deterministic stand-in for a model (the Extractor contract, without torch).

    Head (layer, head) feature i is the mean absolute amplitude of one of K*d equal slices of the
    waveform, scaled by (1 + layer) and shifted by the prompt's length, so a different prompt gives
    different features.
    """

    sample_rate = RATE
    max_seconds = None

    def __init__(self, prompt="what is it?", *, fail_after=None, delay=0.0, bad_len=None, scale=1.0):
        self.model_id = "fake/tiny-model"
        self.prompt = prompt
        self.head_names = [(layer, head, "decoder") for layer in range(N_LAYERS) for head in range(N_HEADS)]
        self.fail_after = fail_after  # raise on every extract() call after this many
        self.delay = delay
        self.bad_len = bad_len  # inputs of this length break the "model"
        self.scale = scale
        self.calls = 0

    @property
    def key(self):
        return {"model": self.model_id, "revision": "0", "prompt": self.prompt, "heads": "all"}

    def load_input(self, path):
        from calm.audio import load_audio

        return load_audio(path, self.sample_rate)

    def features(self, x):
        k = len(self.head_names)
        means = np.array([np.abs(s).mean() for s in np.array_split(x, k * DIM)], dtype=np.float32)
        f = means.reshape(k, DIM) * (1 + np.repeat(np.arange(N_LAYERS), N_HEADS))[:, None]
        return ((f + len(self.prompt) / 100) * self.scale).astype(np.float32)

    def extract(self, inputs):
        self.calls += 1
        if self.fail_after is not None and self.calls > self.fail_after:
            raise RuntimeError("simulated crash of the model")
        if self.delay:
            time.sleep(self.delay)
        for x in inputs:
            if self.bad_len is not None and len(x) == self.bad_len:
                raise RuntimeError("input too short for the model")
        return np.stack([self.features(x) for x in inputs]).astype(np.float32)


def make_clips(root: Path, n: int = 10, seed: int = 0, write: bool = True) -> list[Clip]:
    """n labelled noise clips under root (write=False: the Clips of files written before; float
    WAV files carry a time stamp, so rewriting them changes their content hash)."""
    rng = np.random.default_rng(seed)
    clips = []
    for i in range(n):
        label = ["dog", "rain", "siren"][i % 3]
        path = root / label / f"{i:03d}.wav"
        path.parent.mkdir(parents=True, exist_ok=True)
        x = (rng.standard_normal(RATE // 4 + 37 * i) * 0.1 * (1 + i % 4)).astype(np.float32)
        if write:
            sf.write(path, x, RATE, subtype="FLOAT")
        clips.append(
            Clip(path=path, labels=(label,), fold=i % 5 + 1, split=None, meta={"take": f"t{i}", "n": i})
        )
    return clips


def expected(ext: FakeExtractor, clips: list[Clip]) -> np.ndarray:
    from calm.audio import load_audio

    return np.stack([ext.features(load_audio(c.path, RATE)) for c in clips])


def run(ext, clips, out, **kw):
    kw.setdefault("progress", False)
    kw.setdefault("batch_size", 3)
    return extract_to_store(ext, clips, out, **kw)


def assert_same_store(a: Path, b: Path) -> None:
    Xa, ya, ma = load_features(a)
    Xb, yb, mb = load_features(b)
    np.testing.assert_array_equal(np.asarray(Xa), np.asarray(Xb))
    np.testing.assert_array_equal(ya, yb)
    pd.testing.assert_frame_equal(ma, mb)


@pytest.fixture
def clips(tmp_path):
    return make_clips(tmp_path / "audio")


@pytest.fixture
def reference(tmp_path, clips):
    out = tmp_path / "reference"
    report = run(FakeExtractor(), clips, out)
    assert report.stored == len(clips) and report.ok
    return out


def test_roundtrip_float16_and_float32(tmp_path, clips, reference):
    ext = FakeExtractor()
    want = expected(ext, sorted(clips, key=lambda c: str(c.path)))
    X, y, meta = load_features(reference)
    assert isinstance(X, ShardedArray) and X.shape == (10, N_LAYERS * N_HEADS, DIM) and X.dtype == np.float32
    np.testing.assert_allclose(np.asarray(X), want, rtol=2e-3, atol=1e-4)  # float16 storage
    assert list(meta.columns[:5]) == ["path", "hash", "label", "fold", "split"]
    assert meta["path"].tolist() == sorted(str(c.path) for c in clips)
    assert list(y) == meta["label"].tolist() and set(y) == {"dog", "rain", "siren"}
    assert meta["take"].tolist() == [f"t{int(Path(p).stem)}" for p in meta["path"]]
    assert meta["fold"].tolist() == [int(Path(p).stem) % 5 + 1 for p in meta["path"]]
    assert meta.attrs["key"] == ext.key and meta.attrs["dtype"] == "float16"
    assert meta.attrs["head_names"] == ext.head_names
    assert len(list((Path(meta.attrs["store"]) / SHARD_DIR).glob("*.safetensors"))) == 4  # 10 clips, batch 3

    out32 = tmp_path / "f32"
    run(ext, clips, out32, dtype="float32", batch_size=4)
    X32, _, _ = load_features(out32, mmap=False)
    assert isinstance(X32, np.ndarray)
    np.testing.assert_array_equal(X32, want)


def test_sharded_array_indexing(reference):
    X, _, _ = load_features(reference)
    full = np.asarray(X)
    idx = np.array([7, 0, 3, 3, 9])
    np.testing.assert_array_equal(X[idx], full[idx])
    mask = np.arange(10) % 2 == 0
    np.testing.assert_array_equal(X[mask], full[mask])
    np.testing.assert_array_equal(X[4], full[4])
    np.testing.assert_array_equal(X[-1], full[-1])
    np.testing.assert_array_equal(X[2:8:3], full[2:8:3])
    np.testing.assert_array_equal(X[:, 2], full[:, 2])
    np.testing.assert_array_equal(X[idx, 1:3, 0], full[idx, 1:3, 0])
    np.testing.assert_array_equal(X[..., 0], full[..., 0])
    np.testing.assert_array_equal(np.asarray(X, dtype=np.float64), full.astype(np.float64))
    assert len(X) == 10 and X.ndim == 3 and np.mean(X) == pytest.approx(full.mean())
    with pytest.raises(IndexError):
        X[10]


def test_interrupted_by_model_error_resumes_to_the_same_rows(tmp_path, clips, reference):
    out = tmp_path / "store"
    with pytest.raises(RuntimeError, match="simulated crash"):
        run(FakeExtractor(fail_after=2), clips, out)
    X, _, _ = load_features(out)
    assert len(X) == 6  # two finished batches of 3 survived
    report = run(FakeExtractor(), clips, out)
    assert (report.skipped, report.stored, report.failed) == (6, 4, [])
    assert_same_store(out, reference)
    again = run(FakeExtractor(), clips, out)
    assert (again.skipped, again.stored) == (10, 0)


KILL_SCRIPT = """
import sys
sys.path.insert(0, {root!r})
from tests.test_store import FakeExtractor, make_clips
from calm.store import extract_to_store
from pathlib import Path
clips = make_clips(Path({audio!r}), write=False)
extract_to_store(FakeExtractor(delay=0.08), clips, {out!r}, batch_size=1, progress=False, workers=2)
print("finished")
"""


@pytest.mark.slow
def test_killed_with_sigkill_resumes_to_the_same_rows(tmp_path, clips, reference):
    out = tmp_path / "killed"
    script = KILL_SCRIPT.format(
        root=str(Path(__file__).parents[1]), audio=str(tmp_path / "audio"), out=str(out)
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    kills = 0
    jitter = np.random.default_rng(1).uniform(0, 0.06, 3)
    for wait_rows, pause in zip(
        (2, 5, 7), jitter, strict=True
    ):  # kill at three different points, resuming in between
        proc = subprocess.Popen(
            [sys.executable, "-c", script], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and proc.poll() is None:
            index = list(out.glob(f"*/{INDEX_FILE}"))
            if index and index[0].read_bytes().count(b"\n") >= wait_rows:
                break
            time.sleep(0.005)
        time.sleep(pause)  # land the kill anywhere in the batch cycle
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            kills += 1
        proc.wait()
        assert proc.returncode in (0, -signal.SIGKILL), proc.stderr.read().decode()
    assert kills >= 1
    stored_before = len(load_features(out)[0])
    assert stored_before < len(clips)
    report = run(FakeExtractor(), clips, out, batch_size=3)
    assert report.skipped == stored_before and report.stored == len(clips) - stored_before
    # float16 of identical float32 features: the rows equal those of an uninterrupted run
    assert_same_store(out, reference)
    assert not list(out.glob(f"*/{SHARD_DIR}/.*tmp*"))


def test_truncated_shard_is_detected_and_redone(tmp_path, clips, reference):
    out = tmp_path / "store"
    run(FakeExtractor(), clips, out)
    shards = sorted(out.glob(f"*/{SHARD_DIR}/shard-*.safetensors"))
    victim = shards[1]
    data = victim.read_bytes()
    victim.write_bytes(data[: len(data) - 10])
    with pytest.raises(StoreError, match=f"{victim.name}.*truncated.*re-run"):
        load_features(out)
    report = run(FakeExtractor(), clips, out)
    assert report.redone == 3 and report.stored == 3 and report.skipped == 7
    assert victim.with_name(victim.name + ".corrupt").exists()
    assert_same_store(out, reference)


def test_damaged_shard_header_is_detected_and_redone(tmp_path, clips, reference):
    out = tmp_path / "store"
    run(FakeExtractor(), clips, out)
    victim = sorted(out.glob(f"*/{SHARD_DIR}/shard-*.safetensors"))[0]
    data = bytearray(victim.read_bytes())
    data[8:20] = b"\x00garbage!!\xff\xfe"
    victim.write_bytes(bytes(data))
    with pytest.raises(StoreError, match=victim.name):
        load_features(out)
    report = run(FakeExtractor(), clips, out)
    assert report.redone == 3 and report.stored == 3
    assert_same_store(out, reference)


def test_damaged_shard_data_caught_by_checksum(tmp_path, clips):
    out = tmp_path / "store"
    run(FakeExtractor(), clips, out)
    victim = sorted(out.glob(f"*/{SHARD_DIR}/shard-*.safetensors"))[0]
    data = bytearray(victim.read_bytes())
    data[-1] ^= 0xFF
    victim.write_bytes(bytes(data))
    # size and header are fine, the checksum checked by default is not (issue 9 item 3)
    with pytest.raises(StoreError, match=f"{victim.name}: shard crc32 checksum mismatch"):
        load_features(out)
    with pytest.raises(StoreError, match="checksum"):
        load_features(out, verify=True)


def test_crash_leftovers_are_cleaned_up(tmp_path, clips, reference):
    out = tmp_path / "store"
    with pytest.raises(RuntimeError):
        run(FakeExtractor(fail_after=2), clips, out)
    key_dir = next(out.iterdir())
    shards = key_dir / SHARD_DIR
    # a shard renamed into place whose index lines never got written, a half-written temp file,
    # and an index line cut short
    (shards / "shard-000009.safetensors").write_bytes((shards / "shard-000001.safetensors").read_bytes())
    (shards / ".shard-000010.safetensors.tmp-123").write_bytes(b"half")
    (shards / ".shard-000011.safetensors.k2x9.tmp").write_bytes(b"half")  # calm._files' unique names
    (key_dir / ".index.jsonl.a1b2.tmp").write_bytes(b"half")
    with open(key_dir / INDEX_FILE, "ab") as f:
        f.write(b'{"path": "/x.wav", "hash": "ab')
    assert len(load_features(out)[0]) == 6  # the cut line is ignored when reading
    report = run(FakeExtractor(), clips, out)
    assert (report.skipped, report.stored) == (6, 4)
    assert not (shards / "shard-000009.safetensors").exists()
    assert not list(shards.glob(".*tmp*")) and not list(key_dir.glob(".*tmp*"))
    assert_same_store(out, reference)


def test_a_run_driven_from_outside_writes_the_same_store(tmp_path, clips, reference):
    """What a distributed extraction does: plan under the lock, compute features elsewhere, write."""
    from calm.audio import load_audio
    from calm.store import Decoded, Extraction

    out = tmp_path / "store"
    run(FakeExtractor(), clips[:4], out)  # some clips are stored already
    ext = FakeExtractor()
    events = []
    job = Extraction(ext, out, batch_size=3, progress=events.append)
    with job.start(clips) as part:
        assert [p for p, _ in part.pending] == [str(c.path) for c in clips[4:]]
        with pytest.raises(StoreError, match="another extraction"):
            run(FakeExtractor(), clips, out)  # the lock is held while the run is open
        for start in range(0, len(part.pending), 3):
            chunk = part.pending[start : start + 3]
            waves = [load_audio(p, RATE) for p, _ in chunk]
            items = [
                Decoded(p, c, part.hashes.get(p) or file_sha256(p), None, None, True, len(w) / RATE)
                for (p, c), w in zip(chunk, waves, strict=True)
            ]
            part.write(items, np.stack([ext.features(w) for w in waves]))
            part.advance(len(items))
    assert (part.report.skipped, part.report.stored, part.report.failed) == (4, 6, [])
    assert [e.done for e in events] == [0, 3, 6] and events[-1].stored == 6
    assert_same_store(out, reference)
    assert run(FakeExtractor(), clips, out).skipped == 10


def test_damaged_index_line_in_the_middle_is_an_error(tmp_path, clips):
    out = tmp_path / "store"
    run(FakeExtractor(), clips, out)
    index = next(out.glob(f"*/{INDEX_FILE}"))
    lines = index.read_text().splitlines(keepends=True)
    lines[2] = "{broken\n"
    index.write_text("".join(lines))
    with pytest.raises(StoreError, match=f"{INDEX_FILE}:3"):
        load_features(out)


def test_different_key_never_reuses_features(tmp_path, clips):
    out = tmp_path / "store"
    a, b = FakeExtractor("prompt A"), FakeExtractor("a longer prompt B")
    run(a, clips, out)
    report = run(b, clips, out)
    assert report.skipped == 0 and report.stored == len(clips)
    assert len(list_keys(out)) == 2
    with pytest.raises(StoreError, match="2 extraction keys"):
        load_features(out)
    Xa, _, ma = load_features(out, key=a.key)
    Xb, _, mb = load_features(out, key=b.key)
    assert ma.attrs["key"]["prompt"] == "prompt A" and mb.attrs["key"]["prompt"] == "a longer prompt B"
    assert not np.allclose(np.asarray(Xa), np.asarray(Xb))
    digest = mb.attrs["digest"]
    assert resolve_key_dir(out, digest[:6]) == Path(mb.attrs["store"])
    folder = Path(mb.attrs["store"]).name  # "<model>-<digest>": the folder name or its prefix
    assert (
        resolve_key_dir(out, folder)
        == resolve_key_dir(out, folder[: folder.rindex("-") + 5])
        == Path(mb.attrs["store"])
    )
    with pytest.raises(StoreError, match="matches several keys"):
        resolve_key_dir(out, folder[: folder.rindex("-")])
    assert load_features(Path(ma.attrs["store"]))[2].attrs["digest"] == ma.attrs["digest"]
    with pytest.raises(StoreError, match="matches no key"):
        load_features(out, key="ffffffffffff")
    # the storage dtype is part of the key too
    run(a, clips, out, dtype="float32")
    assert len(list_keys(out)) == 3


def test_failures_are_recorded_and_listed(tmp_path, clips):
    bad = tmp_path / "audio" / "bad"
    bad.mkdir()
    (bad / "garbage.wav").write_bytes(b"not audio" * 20)
    sf.write(bad / "silent.wav", np.zeros(4000, np.float32), RATE)
    items = [*clips[:4], Clip(bad / "garbage.wav", ("x",)), *clips[4:], Clip(bad / "silent.wav", ("x",))]
    items.append(Clip(bad / "missing.wav", ("x",)))
    out = tmp_path / "store"
    report = run(FakeExtractor(), items, out)
    assert report.stored == 10 and not report.ok
    reasons = dict(report.failed)
    assert set(reasons) == {str(bad / n) for n in ("garbage.wav", "silent.wav", "missing.wav")}
    assert "unreadable" in reasons[str(bad / "garbage.wav")]
    assert "silent" in reasons[str(bad / "silent.wav")]
    assert "not found" in reasons[str(bad / "missing.wav")]
    logged = [json.loads(line) for line in next(out.glob("*/failures.jsonl")).read_text().splitlines()]
    assert {r["path"] for r in logged} == set(reasons)
    assert len(load_features(out)[0]) == 10
    with pytest.raises(StoreError, match="3 clips failed"):
        run(FakeExtractor(), items, out, allow_failures=False)


def test_a_clip_that_breaks_the_model_is_singled_out(tmp_path, clips):
    from calm.audio import load_audio

    ext = FakeExtractor(bad_len=len(load_audio(clips[4].path, RATE)))
    report = run(ext, clips, tmp_path / "store")
    assert report.stored == 9 and [p for p, _ in report.failed] == [str(clips[4].path)]
    assert "model error" in report.failed[0][1]
    with pytest.raises(RuntimeError, match="simulated"):  # a model that always fails stops the run
        run(FakeExtractor(fail_after=0), clips, tmp_path / "other")


def test_float16_overflow_is_a_failure_with_a_hint(tmp_path, clips):
    report = run(FakeExtractor(scale=1e6), clips[:3], tmp_path / "store")
    assert report.stored == 0 and len(report.failed) == 3
    assert "float32" in report.failed[0][1]
    ok = run(FakeExtractor(scale=1e6), clips[:3], tmp_path / "store", dtype="float32")
    assert ok.stored == 3


def test_changed_file_is_extracted_again(tmp_path, clips):
    out = tmp_path / "store"
    run(FakeExtractor(), clips, out)
    sf.write(clips[0].path, np.full(3000, 0.25, np.float32), RATE, subtype="FLOAT")
    report = run(FakeExtractor(), clips, out)
    assert (report.stored, report.skipped) == (1, 9)
    X, _, meta = load_features(out)
    assert len(X) == 10
    i = meta.index[meta["path"] == str(clips[0].path)][0]
    np.testing.assert_allclose(X[i], FakeExtractor().features(np.full(3000, 0.25, np.float32)), rtol=1e-3)


def test_limit_paths_dedupe_and_lock(tmp_path, clips):
    out = tmp_path / "store"
    report = run(FakeExtractor(), [c.path for c in clips] + [clips[0].path], out, limit=4)
    assert report.total == 4 and report.stored == 4
    _, y, meta = load_features(out)
    assert set(y) == {""} and meta["fold"].isna().all()
    key_dir = next(out.iterdir())
    with _Lock(key_dir / ".lock"), pytest.raises(StoreError, match="another extraction"):
        run(FakeExtractor(), clips, out)
    assert run(FakeExtractor(), clips, out).stored == 6


def test_paths_are_stored_absolute_and_normalised(tmp_path, clips, monkeypatch):
    from calm.store import store_path

    monkeypatch.chdir(tmp_path / "audio" / "dog")
    relative = [Path("..") / c.path.parent.name / c.path.name for c in clips[:3]]
    run(FakeExtractor(), relative, tmp_path / "store")
    meta = load_features(tmp_path / "store")[2]
    assert meta["path"].tolist() == sorted(str(c.path) for c in clips[:3])
    assert store_path(relative[0]) == str(clips[0].path)
    assert run(FakeExtractor(), clips[:3], tmp_path / "store").skipped == 3


def test_progress_true_prints_plain_lines(tmp_path, clips, capsys):
    report = extract_to_store(FakeExtractor(), clips[:4], tmp_path / "store", batch_size=2, progress=True)
    assert report.stored == 4
    err = capsys.readouterr().err
    assert "extracting: 4/4 clips" in err and "clips/s" in err and "\x1b" not in err  # no terminal codes


def test_progress_callback_gets_every_event(tmp_path, clips):
    bad = tmp_path / "audio" / "bad.wav"
    bad.write_bytes(b"not audio" * 20)
    out = tmp_path / "store"
    run(FakeExtractor(), clips[:3], out)
    events: list[ExtractProgress] = []
    items = [*clips[:7], Clip(bad, ("x",))]
    report = run(FakeExtractor(), items, out, batch_size=2, progress=events.append)
    assert (report.stored, report.skipped, len(report.failed)) == (4, 3, 1)
    assert events[0].done == 0 and all(e.total == 5 and e.skipped == 3 for e in events)
    assert [e.done for e in events] == sorted(e.done for e in events)  # done never goes back
    last = events[-1]
    assert (last.done, last.stored, last.failed) == (5, 4, 1)
    assert all(e.done == e.stored + e.failed for e in events)
    assert all(e.clips_per_second >= 0 and e.seconds >= 0 for e in events)
    # each batch of two and the failed clip is one event after the first
    assert len(events) == 1 + 3
    with pytest.raises(TypeError, match="progress"):
        run(FakeExtractor(), items, out, progress="yes")


def test_read_raw_returns_stored_values_exactly(tmp_path, clips):
    out = tmp_path / "store"
    run(FakeExtractor(scale=1.001), clips, out)
    X, _, meta = load_features(out)
    assert X.storage_dtype == np.float16
    raw = X.read_raw([4, 0, -1])
    assert raw.dtype == np.float16 and raw.shape == (3, *X.shape[1:])
    np.testing.assert_array_equal(raw.astype(np.float32), X[[4, 0, -1]])
    # the bytes are those of the shard, not a float32 round trip
    from safetensors.numpy import load_file

    row = load_features(out, mmap=True)[2].index[0]
    shard_rows = [json.loads(line) for line in next(out.glob(f"*/{INDEX_FILE}")).read_text().splitlines()]
    first = {r["path"]: r for r in shard_rows}[meta["path"][row]]
    stored = load_file(str(Path(meta.attrs["store"]) / SHARD_DIR / first["shard"]))["features"][first["row"]]
    assert X.read_raw([row])[0].tobytes() == stored.tobytes()
    np.testing.assert_array_equal(X.read_raw(slice(2, 8, 3)), X.read_raw([2, 5]))
    assert X.read_raw([]).shape == (0, *X.shape[1:])
    with pytest.raises(IndexError):
        X.read_raw([10])
    with pytest.raises(IndexError):
        X.read_raw([[0, 1]])
    with pytest.raises(IndexError):
        X.read_raw(np.array([0.5]))
    X32 = load_features(run(FakeExtractor(), clips, tmp_path / "f32", dtype="float32").store)[0]
    assert X32.read_raw([1]).dtype == np.float32


def test_compact_merges_shards_exactly_and_survives_a_crash(tmp_path, clips, reference, monkeypatch):
    import calm.store.compaction as compaction_mod

    out = tmp_path / "store"
    run(FakeExtractor(), clips, out, batch_size=2)
    shards = lambda: sorted(p.name for p in out.glob(f"*/{SHARD_DIR}/*.safetensors"))  # noqa: E731
    assert len(shards()) == 5

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(compaction_mod, "write_index", crash)
    with pytest.raises(OSError):
        compact(out)
    monkeypatch.undo()
    assert len(shards()) == 6  # the new shard is an orphan: the index still names the old ones
    assert_same_store(out, reference)
    assert compact(out) == (5, 1)
    assert len(shards()) == 1
    assert_same_store(out, reference)
    assert compact(out) == (1, 1)
    assert run(FakeExtractor(), clips, out).skipped == 10
    row_kb = N_LAYERS * N_HEADS * DIM * 2 / 1024
    assert compact(out, max_shard_mb=3.5 * row_kb / 1024) == (1, 1)  # already compact and in order
    run(FakeExtractor(), make_clips(tmp_path / "more", n=2, seed=5), out)
    assert compact(out, max_shard_mb=3.5 * row_kb / 1024) == (2, 4)  # 12 rows, 3 a shard
    X, _, meta = load_features(out)
    ref = load_features(reference)
    keep = meta["path"].isin(ref[2]["path"]).to_numpy()
    np.testing.assert_array_equal(np.asarray(X)[keep], np.asarray(ref[0]))


def test_missing_store_is_a_clear_error(tmp_path):
    with pytest.raises(StoreError, match="no feature store"):
        load_features(tmp_path / "nothing")


def test_changed_file_that_now_fails_leaves_no_stale_features(tmp_path, clips):
    out = tmp_path / "store"
    run(FakeExtractor(), clips, out)
    clips[0].path.write_bytes(b"RIFF this is no longer audio")
    report = run(FakeExtractor(), clips, out, allow_failures=True)
    assert (report.stored, report.skipped, len(report.failed)) == (0, 9, 1)
    X, _, meta = load_features(out)
    assert len(X) == 9 and str(clips[0].path) not in set(meta["path"])
    # and the store stays consistent for the next run (nothing to redo but the broken file)
    again = run(FakeExtractor(), clips, out, allow_failures=True)
    assert (again.stored, again.skipped, len(again.failed), again.redone) == (0, 9, 1, 0)
