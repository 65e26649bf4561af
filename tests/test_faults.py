"""Fault injection and hostile input for the feature store and the dataset loaders (issue 9).

Each `test_case_<id>` tries one case of `CASES` and asserts its outcome: handled (everything
stored or recovered), or a clear error naming the file, never a traceback, a silent wrong result
or lost data. Every case that writes ends with "nothing lost": after the fault is gone, resuming
gives a store equal to an uninterrupted run. `docs/reliability.md` lists the cases as a table
that `test_reliability_doc_lists_every_case` checks; regenerate it with

    python -m tests.test_faults --table

SIGKILL runs: CALM_FAULT_RUNS=N (default 3) kills at N random moments. The model is the
`FakeExtractor` of test_store.py except for the batch-invariance case (real Whisper).
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from calm._files import printable
from calm.data import DatasetError, load_dataset
from calm.data.base import Clip
from calm.store import (
    INDEX_FILE,
    KEY_FILE,
    SHARD_DIR,
    StoreError,
    load_features,
    verify_store,
)
from tests.test_store import FakeExtractor, assert_same_store, make_clips, run

TESTS = Path(__file__).resolve().parent
DOC = TESTS.parent / "docs" / "reliability.md"
RUNS = int(os.environ.get("CALM_FAULT_RUNS", "3"))

# id -> (issue 9 item, what is tried, runs tried, handled (stored or recovered), clear error)
CASES: dict[str, tuple[str, str, str, str, str]] = {
    "sigkill_random": (
        "tests",
        "SIGKILL at a random moment of an extraction, then resume",
        "3 (CI)",
        "3 (CI)",
        "0",
    ),
    "enospc": (
        "tests",
        "disk full (ENOSPC) while writing shards, then resume with space",
        "1",
        "0",
        "1",
    ),
    "concurrent_writers": ("tests", "two extractions into one store at once", "1", "0", "1"),
    "read_only_store": ("tests", "resume on a read-only store", "1", "0", "1"),
    "read_only_output": ("tests", "a new store on a read-only file system", "1", "0", "1"),
    "nonutf8_name": (
        "1",
        "a file name that is not UTF-8 (b'caf\\xe9.wav') in a folder class",
        "1",
        "1",
        "0",
    ),
    "nonutf8_printable": (
        "1",
        "the same name printed as text (`calm verify`, `calm._files.printable`)",
        "1",
        "1",
        "0",
    ),
    "shard_name_absolute": ("2", "an index row whose shard is an absolute path", "1", "0", "1"),
    "shard_name_dotdot": ("2", "an index row whose shard name contains `..`", "1", "0", "1"),
    "shard_symlink": (
        "2",
        "a shard (or the shards folder) that is a link outside the store",
        "1",
        "0",
        "1",
    ),
    "store_file_symlink": (
        "2",
        "index.jsonl / failures.jsonl / .lock as links outside the store",
        "1",
        "0",
        "1",
    ),
    "flipped_bytes": ("3", "flipped bytes inside shard data (size and header intact)", "1", "0", "1"),
    "swapped_shards": ("3", "two shard files of equal size swapped", "1", "0", "1"),
    "edited_index_row": ("3", "an index row edited (label changed)", "1", "0", "1"),
    "verify_repair": ("3", "`calm verify STORE --repair` on a damaged store, then extract", "1", "1", "0"),
    "key_wrong_shape": ("5", "key.json with a wrong feature_shape, then resume", "1", "0", "1"),
    "key_damaged": ("5", "key.json that is not JSON", "1", "0", "1"),
    "index_damaged_line": (
        "5",
        "a damaged line in the middle of index.jsonl, then resume",
        "1",
        "0",
        "1",
    ),
    "all_shards_bad": ("5", "every shard damaged: resume must not empty the index", "1", "0", "1"),
    "undecodable_sparse": (
        "9",
        "an undecodable 4 GB sparse file: fails without being hashed",
        "1",
        "1",
        "0",
    ),
    "folder_skips": (
        "9",
        "`folder:` with a dir x.wav, link loop, dangling link, FIFO, empty class",
        "1",
        "1",
        "0",
    ),
    "manifest_conflict": ("9", "a manifest listing one file twice with different labels", "1", "0", "1"),
    "batch_invariant": (
        "11",
        "encoder_length=clip: batched vs single / resumed store (Whisper)",
        "1",
        "1",
        "0",
    ),
    "fuzz_manifest": ("tests", "hypothesis: random manifest bytes", "60", "parsed or", "DatasetError"),
    "fuzz_decoder": (
        "tests",
        "hypothesis: random bytes as an audio file",
        "40",
        "decoded or",
        "per-clip reason",
    ),
}
COLUMNS = ["Case", "Item", "Tried", "Handled", "Clear error", "Traceback", "Silent", "Data lost", "Test"]


def reliability_rows() -> list[list[str]]:
    """The table rows of docs/reliability.md for this module's cases."""
    rows = []
    for cid, (item, what, tried, handled, clear) in CASES.items():
        rows.append(
            [what, item, tried, handled, clear, "0", "0", "0", f"`tests/test_faults.py::test_case_{cid}`"]
        )
    return rows


def markdown_table(rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


# ----------------------------------------------------------------------------------------------
# fixtures and helpers


@pytest.fixture
def clips(tmp_path):
    return make_clips(tmp_path / "audio")


@pytest.fixture
def reference(tmp_path, clips):
    out = tmp_path / "reference"
    assert run(FakeExtractor(), clips, out).stored == len(clips)
    return out


def key_dir(out: Path) -> Path:
    return next(p for p in out.iterdir() if (p / KEY_FILE).exists())


def shards(out: Path) -> list[Path]:
    return sorted(key_dir(out).glob(f"{SHARD_DIR}/shard-*.safetensors"))


def index_lines(out: Path) -> list[dict]:
    return [json.loads(x) for x in (key_dir(out) / INDEX_FILE).read_text().splitlines()]


def write_index_lines(out: Path, rows: list[dict]) -> None:
    (key_dir(out) / INDEX_FILE).write_text("".join(json.dumps(r) + "\n" for r in rows))


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def repair_and_resume(out: Path, clips: list[Clip], reference: Path) -> None:
    """`verify --repair`, then extraction: the store equals the uninterrupted one."""
    reports = verify_store(out, repair=True)
    assert all(r.ok for r in verify_store(out)), [r.problems for r in reports]
    run(FakeExtractor(), clips, out)
    assert_same_store(out, reference)


@contextmanager
def mounted_tmpfs(path: Path, size: str):
    """A small tmpfs at `path` (root only); yields False where mounting is not permitted."""
    path.mkdir(parents=True, exist_ok=True)
    ok = (
        os.geteuid() == 0
        and subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True
        ).returncode
        == 0
    )
    try:
        yield ok
    finally:
        if ok:
            subprocess.run(["umount", "-l", str(path)], capture_output=True)


# ----------------------------------------------------------------------------------------------
# fault injection: kills, full disk, concurrent writers, read-only stores

CHILD = """
import os, sys
sys.path.insert(0, {root!r})
from tests.test_store import FakeExtractor, make_clips
from calm.store import extract_to_store
from pathlib import Path
clips = make_clips(Path({audio!r}), write=False)
if {enospc_after!r} is not None:  # no tmpfs: make the disk "full" after some shards
    import calm._files as files
    real, count = files.atomic_write_bytes, [0]
    def full(path, data):
        count[0] += 1
        if count[0] > {enospc_after!r}:
            raise OSError(28, "No space left on device", str(path))
        real(path, data)
    files.atomic_write_bytes = full
print("started", flush=True)
try:
    extract_to_store(FakeExtractor(delay={delay!r}), clips, {out!r}, batch_size={batch!r}, progress=False)
except Exception as exc:
    print(f"ERROR {{type(exc).__name__}}: {{exc}}", flush=True)
    sys.exit(2)
print("finished", flush=True)
"""


def child(audio: Path, out: Path, *, delay=0.0, batch=2, enospc_after=None) -> subprocess.Popen:
    code = CHILD.format(
        root=str(TESTS.parent),
        audio=str(audio),
        out=str(out),
        delay=delay,
        batch=batch,
        enospc_after=enospc_after,
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS.parent / "src"), str(TESTS.parent)])}
    return subprocess.Popen(
        [sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env
    )


@pytest.mark.slow
def test_case_sigkill_random(tmp_path, clips, reference):
    rng = random.Random(int(os.environ.get("CALM_FAULT_SEED", "0")) or None)
    for i in range(RUNS):
        out = tmp_path / f"killed{i}"
        proc = child(tmp_path / "audio", out, delay=0.05, batch=2)
        assert proc.stdout.readline().strip() == b"started"
        time.sleep(rng.uniform(0.0, 0.4))  # anywhere: planning, decoding, a shard or index write
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        report = run(FakeExtractor(), clips, out)
        assert report.ok and report.stored + report.skipped == len(clips)
        assert_same_store(out, reference)
        assert not list(out.glob(f"*/{SHARD_DIR}/.*tmp*"))


@pytest.mark.slow
def test_case_enospc(tmp_path, clips, reference):
    out = tmp_path / "small" / "store"
    with mounted_tmpfs(tmp_path / "small", "48k") as tmpfs:
        if tmpfs:
            proc = child(tmp_path / "audio", out, batch=1)
        else:  # not root: the write fails as on a full disk
            proc = child(tmp_path / "audio", out, batch=1, enospc_after=4)
        stdout, stderr = proc.communicate(timeout=120)
        assert proc.returncode == 2, stderr.decode()
        message = stdout.decode().strip().splitlines()[-1]
        assert message.startswith("ERROR StoreError") and "No space left on device" in message, message
        assert "run the extraction again" in message
        stored = len(load_features(out)[0])  # what was written before the disk filled is intact
        assert 0 < stored < len(clips)
        saved = tmp_path / "saved"
        shutil.copytree(out, saved)  # "free space": move the store to a roomy disk
    run(FakeExtractor(), clips, saved)
    assert_same_store(saved, reference)


@pytest.mark.slow
def test_case_concurrent_writers(tmp_path, clips, reference):
    out = tmp_path / "store"
    first = child(tmp_path / "audio", out, delay=0.3, batch=1)
    assert first.stdout.readline().strip() == b"started"
    deadline = time.time() + 60
    while not list(out.glob(f"*/{SHARD_DIR}")) and time.time() < deadline:
        time.sleep(0.01)  # the first writer holds the lock once its key folder exists
    with pytest.raises(StoreError, match="another extraction is writing to this store"):
        run(FakeExtractor(), clips, out)
    first.communicate(timeout=120)
    assert first.returncode == 0
    assert_same_store(out, reference)


@contextmanager
def read_only(folder: Path):
    """`folder` made read-only: a read-only tmpfs remount as root, else chmod (non-root)."""
    if os.geteuid() == 0:
        with mounted_tmpfs(folder.with_name(folder.name + "-ro"), "16m") as ok:
            if not ok:
                pytest.skip("root without permission to mount: read-only cannot be simulated")
            mount = folder.with_name(folder.name + "-ro")
            shutil.copytree(folder, mount, dirs_exist_ok=True)
            subprocess.run(["mount", "-o", "remount,ro", str(mount)], check=True)
            yield mount
        return
    modes = {p: p.stat().st_mode for p in [folder, *folder.rglob("*")]}
    for p in modes:
        p.chmod(modes[p] & ~0o222)
    try:
        yield folder
    finally:
        for p, mode in modes.items():
            p.chmod(mode)


def test_case_read_only_store(tmp_path, clips, reference):
    out = tmp_path / "store"
    run(FakeExtractor(), clips[:6], out)
    with read_only(out) as ro:
        before = snapshot(ro)
        with pytest.raises(StoreError, match="cannot (lock|open)|read-only|Read-only|Permission"):
            run(FakeExtractor(), clips, ro)
        assert snapshot(ro) == before
        assert len(load_features(ro)[0]) == 6  # reading still works
    run(FakeExtractor(), clips, out)
    assert_same_store(out, reference)


def test_case_read_only_output(tmp_path, clips, reference):
    parent = tmp_path / "parent"
    parent.mkdir()
    with read_only(parent) as ro:
        with pytest.raises(StoreError, match=str(ro)):
            run(FakeExtractor(), clips, ro / "store")


# ----------------------------------------------------------------------------------------------
# item 1: file names that are not UTF-8


def test_case_nonutf8_name(tmp_path, reference, clips):
    root = tmp_path / "audio"
    odd = os.fsencode(root / "dog") + b"/caf\xe9.wav"
    shutil.copy(os.fsencode(clips[0].path), odd)
    ds = load_dataset(f"folder:{root}")
    assert len(ds.clips) == len(clips) + 1
    out = tmp_path / "store"
    report = run(FakeExtractor(), ds, out)
    assert report.ok and report.stored == len(clips) + 1
    X, y, meta = load_features(out)
    hits = [p for p in meta["path"] if os.fsencode(p) == odd]
    assert len(hits) == 1 and open(os.fsencode(hits[0]), "rb").read() == open(odd, "rb").read()
    np.testing.assert_array_equal(
        X[list(meta["path"]).index(hits[0])], X[list(meta["path"]).index(str(clips[0].path))]
    )
    (key_dir(out) / INDEX_FILE).read_bytes().decode("utf-8")  # the index stays valid UTF-8
    again = run(FakeExtractor(), ds, out)
    assert (again.skipped, again.stored) == (len(clips) + 1, 0)  # the name round-trips: nothing redone


def test_case_nonutf8_printable(tmp_path):
    name = os.fsdecode(b"/data/caf\xe9.wav")
    assert printable(name) == "/data/caf\\xe9.wav"
    assert printable("/data/café.wav") == "/data/café.wav"
    (tmp_path / "p.csv").write_text(printable(name) + "\n", encoding="utf-8")


# ----------------------------------------------------------------------------------------------
# item 2: nothing outside the key folder


def _crafted_shard_name(tmp_path, clips, reference, kind):
    out = tmp_path / "store"
    run(FakeExtractor(), clips, out)
    victim = tmp_path / "victim.safetensors"
    victim.write_bytes(shards(out)[0].read_bytes())
    rows = index_lines(out)
    rows[0]["shard"] = str(victim) if kind == "absolute" else "../../victim.safetensors"
    write_index_lines(out, rows)
    before = victim.read_bytes()
    with pytest.raises(StoreError, match=r"index.jsonl:1: shard name .* is not shard-NNNNNN"):
        load_features(out)
    with pytest.raises(StoreError, match="calm verify .* --repair"):
        run(FakeExtractor(), clips, out)
    repair_and_resume(out, clips, reference)
    assert victim.read_bytes() == before and not victim.with_name(victim.name + ".corrupt").exists()


def test_case_shard_name_absolute(tmp_path, clips, reference):
    _crafted_shard_name(tmp_path, clips, reference, "absolute")


def test_case_shard_name_dotdot(tmp_path, clips, reference):
    _crafted_shard_name(tmp_path, clips, reference, "dotdot")


def test_case_shard_symlink(tmp_path, clips, reference):
    out = tmp_path / "store"
    run(FakeExtractor(), clips, out)
    first = shards(out)[0]
    outside = tmp_path / "outside.safetensors"
    first.rename(outside)
    first.symlink_to(outside)
    with pytest.raises(StoreError, match=f"{first.name}: is a symbolic link"):
        load_features(out)
    with pytest.raises(StoreError, match="symbolic link"):
        run(FakeExtractor(), clips, out)
    assert outside.exists() and not outside.with_name(outside.name + ".corrupt").exists()
    # the whole shards folder as a link elsewhere
    folder = key_dir(out) / SHARD_DIR
    first.unlink()
    outside.rename(first)
    elsewhere = tmp_path / "elsewhere"
    folder.rename(elsewhere)
    folder.symlink_to(elsewhere)
    before = snapshot(elsewhere)
    with pytest.raises(StoreError, match=f"{SHARD_DIR}: is a symbolic link"):
        run(FakeExtractor(), clips, out)
    assert snapshot(elsewhere) == before


def test_case_store_file_symlink(tmp_path, clips, reference):
    out = tmp_path / "store"
    run(FakeExtractor(), clips[:4], out)
    victim = tmp_path / "victim.txt"
    for name in ("failures.jsonl", ".lock", INDEX_FILE):
        victim.write_text("precious\n")
        target = key_dir(out) / name
        saved = target.read_bytes() if target.exists() else None
        target.unlink(missing_ok=True)
        target.symlink_to(victim)
        with pytest.raises(StoreError, match="symbolic link"):
            run(FakeExtractor(), clips, out)
        assert victim.read_text() == "precious\n", name
        target.unlink()
        if saved is not None:
            target.write_bytes(saved)
    run(FakeExtractor(), clips, out)
    assert_same_store(out, reference)


# ----------------------------------------------------------------------------------------------
# item 3: integrity by default


def test_case_flipped_bytes(tmp_path, clips, reference):
    out = tmp_path / "store"
    run(FakeExtractor(), clips, out)
    victim = shards(out)[1]
    data = bytearray(victim.read_bytes())
    data[len(data) - 7] ^= 0x10
    victim.write_bytes(bytes(data))
    with pytest.raises(StoreError, match=f"{victim}: shard crc32 checksum mismatch"):
        load_features(out)
    from click.testing import CliRunner

    from calm.cli import main

    fit = CliRunner().invoke(main, ["fit", str(out), "--out", str(tmp_path / "m.safetensors")])
    assert fit.exit_code == 1 and f"{victim}: shard crc32 checksum mismatch" in fit.output
    assert not (tmp_path / "m.safetensors").exists()
    report = run(FakeExtractor(), clips, out)  # resume sets the bad shard aside and redoes it
    assert report.redone == 3 and report.stored == 3
    assert victim.with_name(victim.name + ".corrupt").exists()
    assert_same_store(out, reference)


def test_case_swapped_shards(tmp_path, clips, reference):
    out = tmp_path / "store"
    run(FakeExtractor(), clips, out)
    a, b = shards(out)[:2]
    assert a.stat().st_size == b.stat().st_size
    tmp = a.with_name("swap")
    a.rename(tmp)
    b.rename(a)
    tmp.rename(b)
    with pytest.raises(StoreError, match="checksum mismatch"):
        load_features(out)
    problems = verify_store(out)[0].problems
    assert len(problems) == 2 and all("checksum mismatch" in p for p in problems)
    report = run(FakeExtractor(), clips, out)  # resume re-links both shards: nothing redone
    assert report.redone == 0 and report.stored == 0
    assert not list(key_dir(out).rglob("*.corrupt"))
    assert_same_store(out, reference)


def test_case_edited_index_row(tmp_path, clips, reference):
    out = tmp_path / "store"
    run(FakeExtractor(), clips, out)
    rows = index_lines(out)
    rows[4]["label"] = "cat"
    write_index_lines(out, rows)
    with pytest.raises(StoreError, match=r"index.jsonl:5: index line edited or damaged"):
        load_features(out)
    with pytest.raises(StoreError, match="index.jsonl:5"):
        run(FakeExtractor(), clips, out)
    repair_and_resume(out, clips, reference)


def test_case_verify_repair(tmp_path, clips, reference):
    from click.testing import CliRunner

    from calm.cli import main

    out = tmp_path / "store"
    run(FakeExtractor(), clips, out)
    victim = shards(out)[2]
    victim.write_bytes(victim.read_bytes()[:-3] + b"xyz")
    check = CliRunner().invoke(main, ["verify", str(out)])
    assert check.exit_code == 1 and f"{victim}: shard crc32 checksum mismatch" in check.output
    fixed = CliRunner().invoke(main, ["verify", str(out), "--repair"])
    assert fixed.exit_code == 0, fixed.output
    assert "moved aside" in fixed.output and "3 clips will be extracted again" in fixed.output
    assert CliRunner().invoke(main, ["verify", str(out), "--full"]).exit_code == 0
    assert len(load_features(out)[0]) == 7
    assert run(FakeExtractor(), clips, out).stored == 3
    assert_same_store(out, reference)


# ----------------------------------------------------------------------------------------------
# item 5: damaged key files and indexes are refused, never emptied


def test_case_key_wrong_shape(tmp_path, clips, reference):
    out = tmp_path / "store"
    run(FakeExtractor(), clips, out)
    key_path = key_dir(out) / KEY_FILE
    info = json.loads(key_path.read_text())
    info["feature_shape"][1] += 3
    key_path.write_text(json.dumps(info))
    before = snapshot(key_dir(out) / SHARD_DIR), (key_dir(out) / INDEX_FILE).read_bytes()
    with pytest.raises(StoreError, match=r"key.json says float16 \(rows, 6, 7\).*calm verify"):
        run(FakeExtractor(), clips, out)
    with pytest.raises(StoreError, match="key.json says"):
        load_features(out)
    assert (snapshot(key_dir(out) / SHARD_DIR), (key_dir(out) / INDEX_FILE).read_bytes()) == before
    report = verify_store(out, repair=True)[0]
    assert any("feature_shape set to [6, 4]" in r for r in report.repaired) and not report.dropped
    repair_and_resume(out, clips, reference)


def test_case_key_damaged(tmp_path, clips, reference):
    out = tmp_path / "store"
    run(FakeExtractor(), clips, out)
    key_path = key_dir(out) / KEY_FILE
    good = key_path.read_bytes()
    key_path.write_bytes(good[: len(good) // 2])
    with pytest.raises(StoreError, match=f"{key_path}: unreadable key file"):
        load_features(out)
    key_path.write_bytes(good)
    assert_same_store(out, reference)


def test_case_index_damaged_line(tmp_path, clips, reference):
    out = tmp_path / "store"
    run(FakeExtractor(), clips, out)
    index = key_dir(out) / INDEX_FILE
    lines = index.read_bytes().split(b"\n")
    lines[3] = lines[3][:20] + b"\x00garbage" + lines[3][40:]
    index.write_bytes(b"\n".join(lines))
    before = index.read_bytes()
    with pytest.raises(StoreError, match=r"index.jsonl:4: damaged index line.*calm verify"):
        run(FakeExtractor(), clips, out)
    assert index.read_bytes() == before
    repair_and_resume(out, clips, reference)


def test_case_all_shards_bad(tmp_path, clips, reference):
    out = tmp_path / "store"
    run(FakeExtractor(), clips, out)
    for shard in shards(out):
        data = bytearray(shard.read_bytes())
        data[-1] ^= 1
        shard.write_bytes(bytes(data))
    index = (key_dir(out) / INDEX_FILE).read_bytes()
    with pytest.raises(StoreError, match="refusing to empty the index"):
        run(FakeExtractor(), clips, out)
    assert (key_dir(out) / INDEX_FILE).read_bytes() == index and len(shards(out)) == 4
    repair_and_resume(out, clips, reference)


# ----------------------------------------------------------------------------------------------
# item 9: decode first; loaders report what they skip and refuse conflicting labels


def test_case_undecodable_sparse(tmp_path, clips, monkeypatch):
    import calm.store.pipeline as pipeline

    big = tmp_path / "audio" / "dog" / "huge.wav"
    with open(big, "wb") as f:
        f.truncate(4 << 30)  # 4 GB of zeros, sparse: not a WAV file
    hashed = []
    real = pipeline.file_sha256
    monkeypatch.setattr(pipeline, "file_sha256", lambda p: hashed.append(p) or real(p))
    out = tmp_path / "store"
    report = run(FakeExtractor(), [*clips, Clip(path=big, labels=("dog",))], out)
    assert report.stored == len(clips) and [p for p, _ in report.failed] == [str(big)]
    assert str(big) not in hashed and len(hashed) == len(clips)
    failure = json.loads((key_dir(out) / "failures.jsonl").read_text())
    assert failure["path"] == str(big) and failure["reason"]


def test_case_folder_skips(tmp_path, clips, caplog):
    root = tmp_path / "audio"
    (root / "dog" / "dir.wav").mkdir()
    (root / "dog" / "loop.wav").symlink_to(root / "dog" / "loop.wav")
    (root / "rain" / "dangling.wav").symlink_to(tmp_path / "nowhere.wav")
    os.mkfifo(root / "siren" / "pipe.wav")
    (root / "empty").mkdir()
    with caplog.at_level(logging.WARNING, logger="calm.data"):
        ds = load_dataset(f"folder:{root}")  # must not hang on the FIFO
    assert len(ds.clips) == len(clips)
    reasons = dict(s.rsplit(": ", 1) for s in ds.skipped)
    assert reasons == {
        str(root / "dog" / "dir.wav"): "a directory with an audio file name",
        str(root / "dog" / "loop.wav"): "symbolic link loop",
        str(root / "rain" / "dangling.wav"): "dangling symbolic link",
        str(root / "siren" / "pipe.wav"): "not a regular file (FIFO)",
        str(root / "empty"): "empty class folder (no audio files)",
    }
    assert "5 entries skipped" in caplog.text and "dangling symbolic link" in caplog.text


def test_case_manifest_conflict(tmp_path, clips):
    manifest = tmp_path / "audio" / "m.csv"
    manifest.write_text("path,label\ndog/000.wav,dog\nrain/001.wav,rain\n./dog/../dog/000.wav,cat\n")
    with pytest.raises(
        DatasetError,
        match=r"m.csv:4: .*000.wav already listed on line 2 with label 'dog', here with label 'cat'",
    ):
        load_dataset(f"csv:{manifest}")
    with pytest.raises(StoreError, match="listed twice with different labels"):
        run(FakeExtractor(), [clips[0], Clip(path=clips[0].path, labels=("cat",))], tmp_path / "store")


# ----------------------------------------------------------------------------------------------
# item 11: batch invariance (real Whisper, encoder_length=clip)


@pytest.mark.slow
def test_case_batch_invariant(tmp_path):
    from tests.helpers import shared_data

    files = sorted((shared_data() / "esc10").glob("*/*.ogg"))[:5]
    if len(files) < 5:
        pytest.skip("real ESC-10 audio not found (set CALM_TEST_DATA)")
    import torch

    from calm.models import load_extractor

    torch.set_num_threads(1)
    audio = tmp_path / "audio"
    audio.mkdir()
    for i, f in enumerate(files):  # 0.7 s and 1 s around each clip's peak keep the model cheap
        x, rate = sf.read(f, dtype="float32")
        start = max(0, int(np.argmax(np.abs(x))) - 10000)
        sf.write(audio / f"{i}.wav", x[start : start + (44100 if i % 2 else 30000)], rate)
    wavs = sorted(audio.glob("*.wav"))
    ext = load_extractor("whisper-tiny.en", encoder_length="clip", heads="encoder")
    from calm.store import extract_to_store

    reports = [
        extract_to_store(ext, wavs, tmp_path / "batched", batch_size=5, progress=False),
        extract_to_store(ext, wavs, tmp_path / "resumed", batch_size=2, limit=3, progress=False),
        extract_to_store(ext, wavs, tmp_path / "resumed", batch_size=2, progress=False),
    ]
    assert all(r.ok for r in reports) and reports[0].stored == 5 and reports[2].skipped == 3
    a, _, _ = load_features(tmp_path / "batched", mmap=False)
    b, _, _ = load_features(tmp_path / "resumed", mmap=False)
    np.testing.assert_array_equal(a, b)  # bit-identical whatever the batches


# ----------------------------------------------------------------------------------------------
# property-based fuzzing: the manifest parser and the audio decoder


CELLS = st.sampled_from(
    [
        "path",
        "label",
        "fold",
        "split",
        "a.wav",
        "b.wav",
        "dog",
        "cat;dog",
        "",
        "1",
        "x",
        '"',
        ",",
        "\n",
        "train",
        "#",
    ]
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    data=st.one_of(
        st.binary(max_size=300),
        st.lists(CELLS, max_size=30).map(lambda cells: ",".join(cells).encode()),
        st.text(max_size=200).map(lambda t: t.encode("utf-8", "surrogatepass")),
    )
)
def test_case_fuzz_manifest(tmp_path, data):
    manifest = tmp_path / "m.csv"
    manifest.write_bytes(data)
    try:
        ds = load_dataset(f"csv:{manifest}", check_files=False)
    except DatasetError as exc:
        assert str(manifest) in str(exc) or "csv:" in str(exc)
    else:
        assert ds.clips and all(c.labels for c in ds.clips)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    data=st.one_of(
        st.binary(max_size=2048), st.binary(max_size=512).map(lambda b: b"RIFF\x00\x10\x00\x00WAVEfmt " + b)
    )
)
def test_case_fuzz_decoder(tmp_path, data):
    from calm.audio import AudioError
    from calm.audio_inputs import ClipError, checked_clip
    from calm.store.pipeline import prepare

    path = tmp_path / "fuzz.wav"
    path.write_bytes(data)
    digest, x, reason, _ = prepare(FakeExtractor(), str(path), None)
    if reason is None:
        assert digest and np.isfinite(x).all()
        return
    assert digest is None and x is None and reason and "Traceback" not in reason
    try:
        wave = FakeExtractor().load_input(str(path))
    except AudioError as exc:
        assert str(path) in str(exc)
    else:  # decodable, but refused by the checks every clip passes (too short, empty)
        with pytest.raises(ClipError) as refused:
            checked_clip(str(path), wave, FakeExtractor().sample_rate)
        assert refused.value.reason == reason


# ----------------------------------------------------------------------------------------------
# the doc


def test_reliability_doc_lists_every_case():
    text = DOC.read_text()
    for row in reliability_rows():
        line = "| " + " | ".join(row) + " |"
        assert line in text, (
            f"docs/reliability.md lacks (or has a different) row:\n{line}\n"
            "regenerate: python -m tests.test_faults --table"
        )
    for cid in CASES:
        assert callable(globals().get(f"test_case_{cid}")), cid
    cases_here = {name[len("test_case_") :] for name in globals() if name.startswith("test_case_")}
    assert cases_here == set(CASES)
    for ref in set(re.findall(r"`(tests/test_\w+\.py)::(test_\w+)`", text)):
        assert f"def {ref[1]}(" in (TESTS.parent / ref[0]).read_text(), ref


if __name__ == "__main__":
    if "--table" in sys.argv:
        print(markdown_table(reliability_rows()))
