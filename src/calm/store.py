"""The feature store: per-head features on disk, resumable and crash-safe.

Layout of a store directory (one sub-folder per extraction key, so a different model, prompt,
head source, option or storage dtype never reuses another key's features):

    STORE/
      <model-slug>-<digest>/          digest = first 16 hex of sha256(canonical JSON of the key)
        key.json                      {"format", "digest", "key": {"extractor": ..., "dtype": ...},
                                       "head_names": [[layer, head, source], ...], "feature_shape": [K, d]}
        index.jsonl                   one JSON line per stored clip: path (absolute), hash (sha256 of
                                      the file's bytes), label, labels, fold, split, meta, key (digest),
                                      shard, row, shard_bytes, shard_sha256
        failures.jsonl                clips of the latest run that failed, with the reason
        shards/shard-NNNNNN.safetensors   one tensor "features" (rows, K, d), float16 or float32

Crash safety: every batch becomes one shard, written to a temporary name, fsynced and renamed into
place; only then are its index lines appended (one write, fsynced). Killing the process at any
moment loses at most the batch in flight: a half-written temporary file or an index line cut
short is cleaned up on the next run, and a shard that made it to disk without its index lines is
removed and its clips redone. A shard whose size or header does not match the index (truncated or
damaged) is detected on resume, moved aside (`*.corrupt`) and its clips redone; `load_features`
refuses it with a message saying to re-run the extraction.

Resume: a clip is skipped when its absolute path is in the index with the same content hash; a
changed file is extracted again: its old row is dropped first, so a failed re-extraction never
leaves the old content's features behind.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import struct
import time
from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from calm import _files

log = logging.getLogger(__name__)

FORMAT = 1
KEY_FILE = "key.json"
INDEX_FILE = "index.jsonl"
FAILURES_FILE = "failures.jsonl"
SHARD_DIR = "shards"
LOCK_FILE = ".lock"
TENSOR = "features"
DTYPES = {"float16": (np.float16, "F16"), "float32": (np.float32, "F32")}
_SHARD_RE = re.compile(r"^shard-(\d{6,})\.safetensors$")


class StoreError(ValueError):
    """A feature store problem, naming the file at fault."""


@dataclass
class ExtractReport:
    """What one `extract_to_store` run did."""

    store: Path  # the key folder the features went to
    digest: str
    total: int = 0  # clips considered (after `limit` and de-duplication)
    stored: int = 0  # extracted and stored by this run
    skipped: int = 0  # already in the store with the same content hash
    redone: int = 0  # rows dropped at start because their shard was damaged or orphaned
    failed: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)
    seconds: float = 0.0

    @property
    def clips_per_second(self) -> float:
        return self.stored / self.seconds if self.seconds > 0 else 0.0

    @property
    def ok(self) -> bool:
        return not self.failed

    def summary(self) -> str:
        text = (
            f"{self.stored} stored, {self.skipped} already stored, {len(self.failed)} failed "
            f"of {self.total} clips in {self.seconds:.1f} s ({self.clips_per_second:.2f} clips/s) "
            f"-> {self.store}"
        )
        if self.redone:
            text += f"; {self.redone} clips of damaged shards redone"
        return text


# ----------------------------------------------------------------------------------------------
# small helpers


def canonical_json(obj: Any) -> str:
    try:
        return _files.canonical_json(obj)
    except (TypeError, ValueError) as exc:
        raise StoreError(f"extraction key is not JSON-serialisable: {exc}") from None


def key_digest(key: Mapping[str, Any]) -> str:
    """First 16 hex digits of sha256 of the key's canonical JSON."""
    return hashlib.sha256(canonical_json(key).encode()).hexdigest()[:16]


def key_dirname(model_id: str, digest: str) -> str:
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", str(model_id).strip("/").split("/")[-1] or "model")[:48]
    return f"{slug}-{digest}"


def store_path(path: str | Path) -> str:
    """How a clip's path is stored (meta["path"]): absolute and normalised (`..` removed), links kept.
    Compare a dataset's clips with a store's rows through this function."""
    return os.path.abspath(path)


def file_sha256(path: str | Path, chunk: int = 1 << 20) -> str:
    """SHA-256 (hex) of a clip's bytes, read afresh (a clip may change between two runs)."""
    return _files.file_sha256(path, chunk, memo=False)


_fsync_dir = _files.fsync_dir
atomic_write_bytes = _files.atomic_write_bytes
_json_default = _files.json_default


def _row_json(row: Mapping[str, Any]) -> str:
    return json.dumps(row, ensure_ascii=False, default=_json_default)


class _Lock(_files.FileLock):
    """The store's writer lock: `StoreError` naming the store when another extraction holds it."""

    def __enter__(self) -> _Lock:
        try:
            super().__enter__()
        except _files.LockedError:
            raise StoreError(f"{self.path.parent}: another extraction is writing to this store") from None
        return self


# ----------------------------------------------------------------------------------------------
# shards


def _shard_bytes(features: np.ndarray, digest: str) -> bytes:
    from safetensors.numpy import save

    return save({TENSOR: np.ascontiguousarray(features)}, metadata={"calm_store": str(FORMAT), "key": digest})


def read_shard_header(path: Path) -> tuple[int, dict[str, Any]]:
    """(data start offset, header dict) of a safetensors file; StoreError when it is malformed."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise StoreError(f"{path}: truncated shard ({size} bytes, no header)")
            (n,) = struct.unpack("<Q", raw)
            if n > size - 8 or n > 100_000_000:
                raise StoreError(f"{path}: truncated or damaged shard (header length {n}, file {size} bytes)")
            header = json.loads(f.read(n))
    except FileNotFoundError:
        raise StoreError(f"{path}: shard missing") from None
    except (OSError, ValueError) as exc:
        if isinstance(exc, StoreError):
            raise
        raise StoreError(f"{path}: damaged shard header ({exc})") from None
    return 8 + n, header


def check_shard(
    path: Path,
    *,
    rows: int,
    feature_shape: Sequence[int],
    dtype: str,
    nbytes: int | None = None,
    sha256: str | None = None,
) -> tuple[int, tuple[int, ...]]:
    """Verify a shard against what the index expects; returns (data offset, tensor shape).

    Checks existence, byte size, header, dtype, shape (at least `rows` rows) and that the tensor's
    data ends exactly at the end of the file; the sha256 too when given (reads the whole file).
    """
    start, header = read_shard_header(path)
    size = path.stat().st_size
    if nbytes is not None and size != nbytes:
        raise StoreError(f"{path}: shard is {size} bytes, the index expects {nbytes} (truncated or damaged)")
    info = header.get(TENSOR)
    if not isinstance(info, dict):
        raise StoreError(f"{path}: shard has no {TENSOR!r} tensor")
    shape = tuple(int(s) for s in info.get("shape", ()))
    if info.get("dtype") != DTYPES[dtype][1] or len(shape) != 3 or list(shape[1:]) != list(feature_shape):
        raise StoreError(
            f"{path}: shard holds {info.get('dtype')} {shape}, "
            f"the store expects {dtype} (rows, {feature_shape[0]}, {feature_shape[1]})"
        )
    if shape[0] < rows:
        raise StoreError(f"{path}: shard has {shape[0]} rows, the index refers to row {rows - 1}")
    begin, end = (int(v) for v in info["data_offsets"])
    itemsize = np.dtype(DTYPES[dtype][0]).itemsize
    if end - begin != int(np.prod(shape)) * itemsize or start + end != size:
        raise StoreError(f"{path}: shard data does not fill the file (truncated or damaged)")
    if sha256 is not None and file_sha256(path) != sha256:
        raise StoreError(f"{path}: shard checksum mismatch (damaged)")
    return start + begin, shape


# ----------------------------------------------------------------------------------------------
# index


def read_index(path: Path) -> tuple[list[dict[str, Any]], int]:
    """Rows of an index file and the byte length of its valid part.

    A last line cut short by a crash (no newline, or not valid JSON) is ignored; a damaged line
    anywhere else raises StoreError naming the line.
    """
    if not path.exists():
        return [], 0
    data = path.read_bytes()
    rows: list[dict[str, Any]] = []
    good = 0
    pos = 0
    lineno = 0
    while pos < len(data):
        lineno += 1
        nl = data.find(b"\n", pos)
        if nl < 0:  # unterminated last line: a crash mid-append
            break
        line = data[pos:nl]
        try:
            row = json.loads(line) if line.strip() else None
        except ValueError:
            if data[nl + 1 :].strip():
                raise StoreError(f"{path}:{lineno}: damaged index line") from None
            break  # a damaged last line: a crash mid-append
        if row is not None:
            if not isinstance(row, dict) or "path" not in row or "shard" not in row:
                raise StoreError(f"{path}:{lineno}: index line without path/shard")
            rows.append(row)
        pos = nl + 1
        good = pos
    return rows, good


def latest_rows(rows: Iterable[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """path -> its last row (a re-extracted changed file supersedes its old row)."""
    out: dict[str, dict[str, Any]] = {}
    for row in rows:
        out[row["path"]] = row
    return out


def _write_index(path: Path, rows: Iterable[dict[str, Any]]) -> None:
    atomic_write_bytes(path, "".join(_row_json(r) + "\n" for r in rows).encode())


# ----------------------------------------------------------------------------------------------
# opening a key folder


def list_keys(store: str | Path) -> list[dict[str, Any]]:
    """The key.json contents of every key folder in a store (plus "dir")."""
    store = Path(store)
    if (store / KEY_FILE).is_file():
        dirs = [store]
    elif store.is_dir():
        dirs = sorted(p for p in store.iterdir() if (p / KEY_FILE).is_file())
    else:
        raise StoreError(f"{store}: no feature store here")
    out = []
    for d in dirs:
        info = _read_key_file(d / KEY_FILE)
        info["dir"] = d
        out.append(info)
    return out


def _read_key_file(path: Path) -> dict[str, Any]:
    try:
        info = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise StoreError(f"{path}: unreadable key file ({exc})") from None
    for name in ("digest", "key", "head_names", "feature_shape"):
        if name not in info:
            raise StoreError(f"{path}: key file lacks {name!r}")
    return info


def _describe(info: Mapping[str, Any]) -> str:
    return f"{info['dir'].name}: {canonical_json(info['key'])[:200]}"


def resolve_key_dir(store: str | Path, key: str | Mapping[str, Any] | None = None) -> Path:
    """The key folder of `store` selected by `key`.

    key: None (the store holds exactly one key, or `store` is a key folder itself); a digest, a
    digest prefix, a folder name or its prefix; or a mapping equal to an extractor's `key` (or to the full
    stored key {"extractor": ..., "dtype": ...}).
    """
    infos = list_keys(store)
    if not infos:
        raise StoreError(f"{store}: the store holds no features yet")
    if key is None:
        if len(infos) == 1:
            return infos[0]["dir"]
        listing = "\n  ".join(_describe(i) for i in infos)
        raise StoreError(f"{store} holds {len(infos)} extraction keys; pass key= one of:\n  {listing}")
    if isinstance(key, Mapping):
        want = canonical_json(dict(key))
        hits = [
            i for i in infos if want in (canonical_json(i["key"]), canonical_json(i["key"].get("extractor")))
        ]
    else:
        k = str(key)
        hits = [i for i in infos if i["digest"].startswith(k) or i["dir"].name.startswith(k)]
    if len(hits) == 1:
        return hits[0]["dir"]
    listing = "\n  ".join(_describe(i) for i in infos)
    what = "matches several keys" if hits else "matches no key"
    raise StoreError(f"{store}: key {key!r} {what}; the store holds:\n  {listing}")


# ----------------------------------------------------------------------------------------------
# extraction


def _as_clips(clips: Any) -> list[Any]:
    from calm.data.base import Clip

    items = getattr(clips, "clips", clips)  # a Dataset
    out = []
    for c in items:
        out.append(c if isinstance(c, Clip) else Clip(path=Path(c), labels=()))
    return out


def _failure_reason(exc: BaseException) -> str:
    reason = getattr(exc, "reason", None)  # AudioError carries the bare reason
    if isinstance(reason, str):
        return reason
    if isinstance(exc, FileNotFoundError):
        return "file not found"
    return f"{type(exc).__name__}: {exc}"


def _prepare(extractor: Any, path: str, known_hash: str | None) -> tuple[str | None, Any, str | None]:
    """Worker: (content hash, model input, failure reason)."""
    try:
        digest = known_hash or file_sha256(path)
    except OSError as exc:
        return None, None, _failure_reason(exc)
    try:
        return digest, extractor.load_input(path), None
    except Exception as exc:  # any per-clip decoding problem is recorded, not fatal
        return digest, None, _failure_reason(exc)


def _progress(total: int, enabled: bool):
    if not enabled:
        return None
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        ProgressColumn,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )
    from rich.text import Text

    class Rate(ProgressColumn):
        def render(self, task) -> Text:
            return Text(f"{task.speed:.2f} clips/s" if task.speed else "- clips/s")

    progress = Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        Rate(),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
        console=Console(stderr=True),
        transient=False,
    )
    return progress


class _KeyFolder:
    """One key folder opened for writing (under its lock)."""

    def __init__(self, root: Path, info: dict[str, Any]):
        self.root = root
        self.info = info
        self.digest = info["digest"]
        self.dtype = info["key"]["dtype"]
        self.feature_shape = tuple(info.get("feature_shape", ()))
        self.shards = root / SHARD_DIR
        self.index_path = root / INDEX_FILE
        self.rows: dict[str, dict[str, Any]] = {}
        self.next_shard = 0
        self.index_file = None

    def recover(self) -> int:
        """Clean up after a crash and drop rows of damaged shards; returns the rows dropped."""
        self.shards.mkdir(parents=True, exist_ok=True)
        for tmp in list(self.shards.glob(".*.tmp-*")) + list(self.root.glob(".*.tmp-*")):
            tmp.unlink(missing_ok=True)  # half-written by a killed run
        rows, good = read_index(self.index_path)
        dirty = good != (self.index_path.stat().st_size if self.index_path.exists() else 0)
        latest = latest_rows(rows)
        dirty |= len(latest) != len(rows)
        by_shard: dict[str, list[dict[str, Any]]] = {}
        for row in latest.values():
            by_shard.setdefault(row["shard"], []).append(row)
        dropped = 0
        for name, shard_rows in by_shard.items():
            path = self.shards / name
            try:
                check_shard(
                    path,
                    rows=1 + max(int(r["row"]) for r in shard_rows),
                    feature_shape=self.feature_shape,
                    dtype=self.dtype,
                    nbytes=shard_rows[0].get("shard_bytes"),
                )
            except StoreError as exc:
                log.warning("%s; its %d clips will be extracted again", exc, len(shard_rows))
                if path.exists():
                    os.replace(path, path.with_name(path.name + ".corrupt"))
                for r in shard_rows:
                    del latest[r["path"]]
                dropped += len(shard_rows)
                dirty = True
        referenced = {r["shard"] for r in latest.values()}
        numbers = []
        for p in self.shards.iterdir():
            m = _SHARD_RE.match(p.name.removesuffix(".corrupt"))
            if m is None:
                continue
            numbers.append(int(m.group(1)))
            if p.name == m.group(0) and p.name not in referenced:
                # renamed into place but the run died before its index lines, or superseded
                log.info("%s: shard without index lines (interrupted run) removed", p)
                p.unlink()
        self.next_shard = max(numbers, default=0) + 1
        if dirty:
            _write_index(self.index_path, latest.values())
        self.rows = latest
        return dropped

    def forget(self, paths: Iterable[str]) -> None:
        """Drop the rows of `paths` from the index (atomically): their files changed, so their old
        features must not outlive a failed re-extraction."""
        stale = [p for p in paths if p in self.rows]
        if stale:
            for p in stale:
                del self.rows[p]
            _write_index(self.index_path, self.rows.values())

    def open_for_append(self) -> None:
        self.index_file = open(self.index_path, "ab")

    def close(self) -> None:
        if self.index_file is not None:
            self.index_file.close()
            self.index_file = None

    def write_shard(self, features: np.ndarray, rows: list[dict[str, Any]]) -> None:
        """Write `features` as the next shard (temp name, fsync, rename) and point `rows` at it
        (shard, row, shard_bytes, shard_sha256), row i holding features[i]."""
        name = f"shard-{self.next_shard:06d}.safetensors"
        self.next_shard += 1
        data = _shard_bytes(features, self.digest)
        atomic_write_bytes(self.shards / name, data)
        sha = hashlib.sha256(data).hexdigest()
        for i, row in enumerate(rows):
            row.update(shard=name, row=i, shard_bytes=len(data), shard_sha256=sha)

    def write_batch(self, features: np.ndarray, rows: list[dict[str, Any]]) -> None:
        """Shard first (temp name, fsync, rename), then the index lines (one write, fsync)."""
        self.write_shard(features, rows)
        assert self.index_file is not None
        self.index_file.write("".join(_row_json(r) + "\n" for r in rows).encode())
        self.index_file.flush()
        os.fsync(self.index_file.fileno())
        for row in rows:
            self.rows[row["path"]] = row


def _open_key_folder(out: Path, extractor: Any, dtype: str) -> _KeyFolder:
    head_names = [[int(h[0]), int(h[1]), str(h[2])] for h in extractor.head_names]
    key = {"extractor": extractor.key, "dtype": dtype}
    digest = key_digest(key)
    root = out / key_dirname(getattr(extractor, "model_id", "model"), digest)
    info = {
        "format": FORMAT,
        "digest": digest,
        "key": json.loads(canonical_json(key)),
        "head_names": head_names,
    }
    key_path = root / KEY_FILE
    if key_path.exists():
        old = _read_key_file(key_path)
        if canonical_json(old["key"]) != canonical_json(info["key"]):
            raise StoreError(f"{key_path}: holds a different extraction key with the same digest {digest}")
        if old["head_names"] != head_names:
            raise StoreError(f"{key_path}: stored head names differ from the extractor's (same key {digest})")
        return _KeyFolder(root, old)
    return _KeyFolder(root, info)  # key.json is written once the feature dimension is known


def extract_to_store(
    extractor: Any,
    clips: Any,
    out: str | Path,
    *,
    batch_size: int = 8,
    dtype: str = "float16",
    limit: int | None = None,
    allow_failures: bool = True,
    progress: bool = True,
    workers: int | None = None,
    prefetch: int | None = None,
) -> ExtractReport:
    """Extract the features of `clips` into the store `out`, skipping clips already stored.

    clips: `Clip`s, a `Dataset`, or paths. `limit` keeps the first N clips (so re-running with
    the same limit resumes the same work). Audio decoding (`extractor.load_input`) and hashing run
    in `workers` threads (default: min(4, CPUs)), up to `prefetch` clips ahead of the model.
    Clips that fail to load (or whose features are not finite) are recorded with the reason in
    the report and in failures.jsonl; with `allow_failures=False` a StoreError listing them is
    raised after every other clip is stored. Errors of the model itself propagate (after a
    failing batch is retried clip by clip, to single out a clip that breaks the model).
    """
    if dtype not in DTYPES:
        raise StoreError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    if batch_size < 1:
        raise StoreError(f"batch_size must be at least 1, got {batch_size}")
    t0 = time.perf_counter()
    out = Path(out)
    items = _as_clips(clips)
    seen: set[str] = set()
    todo = []
    for clip in items:
        p = store_path(clip.path)
        if p in seen:
            log.warning("%s listed twice: extracted once", p)
            continue
        seen.add(p)
        todo.append((p, clip))
    if limit is not None:
        todo = todo[: max(0, int(limit))]
    folder = _open_key_folder(out, extractor, dtype)
    folder.root.mkdir(parents=True, exist_ok=True)
    report = ExtractReport(store=folder.root, digest=folder.digest, total=len(todo))
    workers = max(1, workers if workers is not None else min(4, os.cpu_count() or 1))
    prefetch = max(prefetch or 2 * batch_size + workers, batch_size)
    with _Lock(folder.root / LOCK_FILE):
        if "feature_shape" in folder.info:
            report.redone = folder.recover()
        # clips already stored under the same path: skip them if their content is unchanged
        known = [(p, c) for p, c in todo if p in folder.rows]
        hashes: dict[str, str | None] = {}
        if known:
            with ThreadPoolExecutor(workers) as pool:
                for (p, _), h in zip(known, pool.map(_safe_hash, [p for p, _ in known]), strict=True):
                    hashes[p] = h
        pending = []
        for p, clip in todo:
            if p in folder.rows and hashes.get(p) == folder.rows[p]["hash"]:
                report.skipped += 1
            else:
                pending.append((p, clip))
        folder.forget(p for p, _ in pending)  # changed (or vanished) files: their old rows go
        failures_path = folder.root / FAILURES_FILE
        with open(failures_path, "w") as failures_log:
            _run(
                extractor,
                folder,
                pending,
                hashes,
                report,
                failures_log,
                batch_size,
                workers,
                prefetch,
                progress,
            )
    report.seconds = time.perf_counter() - t0
    if report.failed:
        listing = "\n  ".join(f"{p}: {r}" for p, r in report.failed)
        log.warning("%d clips failed:\n  %s", len(report.failed), listing)
        if not allow_failures:
            raise StoreError(
                f"{len(report.failed)} clips failed (the others are stored in {folder.root}):\n  {listing}"
            )
    return report


def _safe_hash(path: str) -> str | None:
    try:
        return file_sha256(path)
    except OSError:
        return None


def _run(
    extractor, folder, pending, known_hashes, report, failures_log, batch_size, workers, prefetch, progress
) -> None:
    bar = _progress(len(pending), progress)
    task = None
    if bar is not None:
        bar.start()
        task = bar.add_task("extracting", total=len(pending))

    def advance(n: int) -> None:
        if bar is not None:
            bar.update(
                task,
                advance=n,
                description=f"extracting ({len(report.failed)} failed)" if report.failed else "extracting",
            )

    def fail(path: str, clip_hash: str | None, reason: str) -> None:
        report.failed.append((path, reason))
        failures_log.write(json.dumps({"path": path, "hash": clip_hash, "reason": reason}) + "\n")
        failures_log.flush()

    pool = ThreadPoolExecutor(workers, thread_name_prefix="calm-load")
    queue: deque = deque()
    it = iter(pending)

    def fill() -> None:
        while len(queue) < prefetch:
            nxt = next(it, None)
            if nxt is None:
                return
            p, clip = nxt
            queue.append((p, clip, pool.submit(_prepare, extractor, p, known_hashes.get(p))))

    batch: list[tuple[str, Any, str, Any]] = []
    try:
        fill()
        while queue:
            p, clip, fut = queue.popleft()
            clip_hash, x, reason = fut.result()
            fill()
            if reason is not None:
                fail(p, clip_hash, reason)
                advance(1)
            else:
                batch.append((p, clip, clip_hash, x))
            if len(batch) >= batch_size or (batch and not queue):
                _flush(extractor, folder, batch, report, fail)
                advance(len(batch))
                batch = []
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        folder.close()
        if bar is not None:
            bar.stop()


def _extract_checked(extractor: Any, inputs: list[Any], n_heads: int) -> np.ndarray:
    feats = np.asarray(extractor.extract(inputs))
    if feats.ndim != 3 or feats.shape[0] != len(inputs) or feats.shape[1] != n_heads:
        raise StoreError(
            f"{type(extractor).__name__}.extract returned shape {feats.shape} for {len(inputs)} clips; "
            f"expected ({len(inputs)}, {n_heads}, d)"
        )
    return feats


def _flush(extractor, folder: _KeyFolder, batch, report: ExtractReport, fail) -> None:
    n_heads = len(extractor.head_names)
    inputs = [b[3] for b in batch]
    try:
        feats = _extract_checked(extractor, inputs, n_heads)
        ok = list(range(len(batch)))
    except StoreError:
        raise
    except Exception as batch_exc:
        if len(batch) == 1:
            raise
        # single out a clip that breaks the model; a model that fails on every clip is an error
        parts, ok = [], []
        errors = []
        for i, x in enumerate(inputs):
            try:
                parts.append(_extract_checked(extractor, [x], n_heads))
                ok.append(i)
            except StoreError:
                raise
            except Exception as exc:
                errors.append((i, exc))
        if not ok:
            raise batch_exc
        for i, exc in errors:
            fail(batch[i][0], batch[i][2], f"model error: {_failure_reason(exc)}")
        feats = np.concatenate(parts)
    np_dtype = DTYPES[folder.dtype][0]
    with np.errstate(over="ignore", invalid="ignore"):
        stored = feats.astype(np_dtype)
    finite = np.isfinite(stored).reshape(len(stored), -1).all(axis=1)
    for j in np.flatnonzero(~finite):
        i = ok[j]
        hint = " (too large for float16: use dtype float32)" if np.isfinite(feats[j]).all() else ""
        fail(batch[i][0], batch[i][2], f"non-finite features{hint}")
    keep = np.flatnonzero(finite)
    if keep.size == 0:
        return
    if "feature_shape" not in folder.info:
        folder.info["feature_shape"] = [int(feats.shape[1]), int(feats.shape[2])]
        folder.feature_shape = tuple(folder.info["feature_shape"])
        atomic_write_bytes(folder.root / KEY_FILE, (json.dumps(folder.info, indent=1) + "\n").encode())
        folder.recover()
    elif list(feats.shape[1:]) != list(folder.feature_shape):
        raise StoreError(
            f"{folder.root}: features of shape {feats.shape[1:]}, the store holds {folder.feature_shape}"
        )
    if folder.index_file is None:
        folder.open_for_append()
    rows = []
    for j in keep:
        p, clip, clip_hash, _ = batch[ok[j]]
        rows.append(
            {
                "path": p,
                "hash": clip_hash,
                "label": clip.label,
                "labels": list(clip.labels),
                "fold": clip.fold,
                "split": clip.split,
                "meta": dict(clip.meta),
                "key": folder.digest,
            }
        )
    folder.write_batch(stored[keep], rows)
    report.stored += len(rows)


# ----------------------------------------------------------------------------------------------
# reading


class ShardedArray:
    """A read-only (n, K, d) float32 view of features spread over memory-mapped shards.

    Rows are read from the shards only when indexed: `X[idx]` (int, slice, boolean mask or
    integer array, optionally followed by indices over K and d, e.g. `X[:, heads]`) returns a
    numpy array, and `np.asarray(X)` reads everything. Stored float16 values are returned as
    float32 (`storage_dtype` says what is on disk). The shards are mapped when the view is made,
    so it stays valid when a later extraction or `compact` replaces or deletes their files.
    """

    def __init__(
        self,
        shard_paths: list[Path],
        offsets: list[int],
        shard_shapes: list[tuple[int, ...]],
        shard_of: np.ndarray,
        row_of: np.ndarray,
        feature_shape: Sequence[int],
        storage_dtype: str,
    ):
        self._paths = shard_paths
        self._offsets = offsets
        self._shapes = shard_shapes
        self._maps: dict[int, np.memmap] = {}
        self._shard_of = np.asarray(shard_of, dtype=np.int64)
        self._row_of = np.asarray(row_of, dtype=np.int64)
        self.storage_dtype = np.dtype(DTYPES[storage_dtype][0])
        self.dtype = np.dtype(np.float32)
        self.shape = (len(self._shard_of), int(feature_shape[0]), int(feature_shape[1]))
        for i in range(len(shard_paths)):  # map now: a view stays valid if its files are replaced later
            self._map(i)

    ndim = 3

    @property
    def size(self) -> int:
        return int(np.prod(self.shape))

    def __len__(self) -> int:
        return self.shape[0]

    def __repr__(self) -> str:
        return f"ShardedArray(shape={self.shape}, shards={len(self._paths)}, storage={self.storage_dtype})"

    def _map(self, s: int) -> np.memmap:
        m = self._maps.get(s)
        if m is None:
            m = np.memmap(
                self._paths[s],
                dtype=self.storage_dtype,
                mode="r",
                offset=self._offsets[s],
                shape=self._shapes[s],
            )
            self._maps[s] = m
        return m

    def _gather(self, pos: np.ndarray, raw: bool = False) -> np.ndarray:
        dtype = self.storage_dtype if raw else np.float32
        out = np.empty((len(pos), *self.shape[1:]), dtype=dtype)
        shard = self._shard_of[pos]
        row = self._row_of[pos]
        for s in np.unique(shard):
            mask = shard == s
            out[mask] = self._map(int(s))[row[mask]]
        return out

    def __getitem__(self, idx: Any) -> np.ndarray:
        first, rest = (idx[0], idx[1:]) if isinstance(idx, tuple) else (idx, ())
        if first is Ellipsis:
            first, rest = slice(None), (Ellipsis, *rest)
        pos = np.arange(self.shape[0])[first]
        if pos.ndim == 0:
            return self._gather(pos.reshape(1))[0][rest] if rest else self._gather(pos.reshape(1))[0]
        out = self._gather(pos.ravel()).reshape(*pos.shape, *self.shape[1:])
        return out[(slice(None),) * pos.ndim + rest] if rest else out

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        out = self[:]
        return out if dtype is None else out.astype(dtype, copy=False)

    def __iter__(self):
        for i in range(self.shape[0]):
            yield self[i]


def _fold_column(folds: list[Any]):
    """Nullable integers when every fold is an int (or missing), else the values as they are."""
    import pandas as pd

    if all(f is None or (isinstance(f, int) and not isinstance(f, bool)) for f in folds):
        return pd.array(folds, dtype="Int64")
    return pd.array(folds, dtype=object)


def _open_rows(
    root: Path, info: Mapping[str, Any], ordered: list[dict[str, Any]], *, verify: bool
) -> ShardedArray:
    """A ShardedArray over the given index rows, checking every shard they use."""
    dtype = info["key"]["dtype"]
    feature_shape = tuple(info["feature_shape"])
    by_shard: dict[str, list[dict[str, Any]]] = {}
    for r in ordered:
        by_shard.setdefault(r["shard"], []).append(r)
    names = sorted(by_shard)
    number = {n: i for i, n in enumerate(names)}
    paths, offsets, shapes = [], [], []
    for name in names:
        first = by_shard[name][0]
        max_row = max(int(r["row"]) for r in by_shard[name])
        path = root / SHARD_DIR / name
        try:
            offset, shape = check_shard(
                path,
                rows=max_row + 1,
                feature_shape=feature_shape,
                dtype=dtype,
                nbytes=first.get("shard_bytes"),
                sha256=first.get("shard_sha256") if verify else None,
            )
        except StoreError as exc:
            raise StoreError(
                f"{exc}; re-run the extraction with the same arguments to redo its clips"
            ) from None
        paths.append(path)
        offsets.append(offset)
        shapes.append(shape)
    shard_of = np.array([number[r["shard"]] for r in ordered], dtype=np.int64)
    row_of = np.array([int(r["row"]) for r in ordered], dtype=np.int64)
    return ShardedArray(paths, offsets, shapes, shard_of, row_of, feature_shape, dtype)


def compact(
    store: str | Path, key: str | Mapping[str, Any] | None = None, *, max_shard_mb: float = 512
) -> tuple[int, int]:
    """Merge a key's shards into as few as possible (each at most `max_shard_mb`), rows sorted by path.

    Returns (shards before, shards after). Crash-safe like extraction: the new shards are written
    (temp name, fsync, rename) before the index is atomically replaced, and the old shards are
    deleted only after that; an interrupted compaction leaves either the old or the new state,
    and stray shards are removed by the next run. Values are copied exactly (no dtype change).
    """
    root = resolve_key_dir(store, key)
    with _Lock(root / LOCK_FILE):
        folder = _KeyFolder(root, _read_key_file(root / KEY_FILE))
        folder.recover()
        ordered = [folder.rows[p] for p in sorted(folder.rows)]
        old = {r["shard"] for r in ordered}
        in_order = all(
            r["shard"] == ordered[0]["shard"] and int(r["row"]) == i for i, r in enumerate(ordered)
        )
        if len(old) <= 1 and in_order:
            return len(old), len(old)
        X = _open_rows(root, folder.info, ordered, verify=True)
        row_bytes = X.storage_dtype.itemsize * X.shape[1] * X.shape[2]
        per_shard = max(1, int(max_shard_mb * 2**20 // row_bytes))
        new_rows = []
        for start in range(0, len(ordered), per_shard):
            chunk = [dict(r) for r in ordered[start : start + per_shard]]
            folder.write_shard(X._gather(np.arange(start, start + len(chunk)), raw=True), chunk)
            new_rows.extend(chunk)
        del X
        _write_index(folder.index_path, new_rows)
        for name in old - {r["shard"] for r in new_rows}:
            (folder.shards / name).unlink(missing_ok=True)
        _fsync_dir(folder.shards)
        return len(old), len({r["shard"] for r in new_rows})


def load_features(
    store: str | Path, key: str | Mapping[str, Any] | None = None, *, mmap: bool = True, verify: bool = False
):
    """(X, y, meta) of a feature store.

    X: (n, K, d) float32 -- a `ShardedArray` over memory-mapped shards (supports `X[idx]` and
    `np.asarray(X)`), or an in-memory array with `mmap=False`. y: 1-D array of label strings
    (multi-label joined by `;`). meta: DataFrame with columns path, hash, label, fold, split and
    the clips' metadata; `meta.attrs` holds "key" (the extractor's key), "dtype" (storage dtype),
    "head_names" (list of (layer, head, source)), "digest" and "store" (the key folder).
    Rows are sorted by path. `key` selects the extraction key when the store holds several (see
    `resolve_key_dir`); `verify=True` also checks every shard's sha256.
    """
    import pandas as pd

    root = resolve_key_dir(store, key)
    info = _read_key_file(root / KEY_FILE)
    dtype = info["key"]["dtype"]
    rows, _ = read_index(root / INDEX_FILE)
    latest = latest_rows(rows)
    ordered = [latest[p] for p in sorted(latest)]
    X: Any = _open_rows(root, info, ordered, verify=verify)
    if not mmap:
        X = np.asarray(X)
    base = {
        "path": [r["path"] for r in ordered],
        "hash": [r["hash"] for r in ordered],
        "label": [r["label"] for r in ordered],
        "fold": _fold_column([r.get("fold") for r in ordered]),
        "split": [r.get("split") for r in ordered],
    }
    meta = pd.DataFrame(base)
    extra_cols: dict[str, list[Any]] = {}
    for i, r in enumerate(ordered):
        for k, v in (r.get("meta") or {}).items():
            if k in base:
                k = f"meta_{k}"
            extra_cols.setdefault(k, [None] * len(ordered))[i] = v
    for k, col in extra_cols.items():
        meta[k] = col
    meta.attrs.update(
        key=info["key"]["extractor"],
        dtype=dtype,
        head_names=[(int(a), int(b), str(c)) for a, b, c in info["head_names"]],
        digest=info["digest"],
        store=str(root),
    )
    y = np.array(meta["label"].tolist(), dtype=str) if len(meta) else np.array([], dtype=str)
    return X, y, meta


__all__ = [
    "ExtractReport",
    "ShardedArray",
    "StoreError",
    "extract_to_store",
    "key_digest",
    "list_keys",
    "load_features",
    "compact",
    "resolve_key_dir",
    "store_path",
]
