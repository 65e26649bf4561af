"""One key folder of a store opened for writing: crash recovery, shard and index appends.

One job: keep a key folder consistent while it is written (by extraction or compaction, always
under the store's lock). Every batch becomes one shard, written to a unique temporary name,
fsynced and renamed into place; only then are its index lines appended (one write, fsynced).
`recover` undoes whatever a killed run left behind: half-written temporary files, an index line
cut short, shards without index lines, shard files swapped or renamed (their rows re-linked), and
shards that fail their own checks (moved aside as `*.corrupt`, their clips dropped so they are
extracted again).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import zlib
from collections.abc import Iterable
from pathlib import Path
from typing import IO, Any

import numpy as np

from calm import _files
from calm.store.checks import ShardDamaged, check_shard, expected_checksum, find_swaps
from calm.store.format import (
    FORMAT,
    INDEX_FILE,
    KEY_FILE,
    ROW_CHECK,
    SHARD_DIR,
    SHARD_RE,
    StoreError,
    canonical_json,
    key_digest,
    key_dirname,
    latest_rows,
    no_link,
    open_append,
    read_index,
    read_key_file,
    repair_hint,
    row_check,
    row_json,
    shard_bytes,
    shard_path,
    write_index,
    write_key_file,
)

log = logging.getLogger("calm.store")

_TEMP_PATTERNS = (".*.tmp-*", ".*.tmp")  # older fixed-suffix temporaries and calm._files' unique ones


def relink_rows(latest: dict[str, dict[str, Any]], rows: list[dict[str, Any]], holder: str) -> int:
    """Point `rows` (of one shard) at the shard file `holder`, in `latest`; returns how many."""
    for r in rows:
        row = {**r, "shard": holder}
        if ROW_CHECK in row:
            row[ROW_CHECK] = row_check(row)
        latest[r["path"]] = row
    return len(rows)


class KeyFolder:
    """One key folder opened for writing (use it under its `StoreLock`).

    `info` is the key.json content; `rows` maps each stored clip's path to its index row once
    `recover` has run.
    """

    def __init__(self, root: Path, info: dict[str, Any]):
        self.root = root
        self.info = info
        self.digest: str = info["digest"]
        self.dtype: str = info["key"]["dtype"]
        self.feature_shape = tuple(info.get("feature_shape", ()))
        self.shards = root / SHARD_DIR
        self.index_path = root / INDEX_FILE
        self.rows: dict[str, dict[str, Any]] = {}
        self.next_shard = 0
        self.index_file: IO[bytes] | None = None

    def recover(self) -> int:
        """Clean up after a crash and drop rows of damaged shards; returns the rows dropped.

        Rows of a shard whose file was swapped with another's or renamed (an intact file holds
        exactly what they recorded) are pointed at that file, as `verify --repair` does. Only a
        shard failing its own checks (`ShardDamaged`) is set aside; an index line that
        cannot be used, or key.json disagreeing with an intact shard, raise StoreError (with the
        repair route) and change nothing, and so does a recovery that would drop every row."""
        no_link(self.shards)
        try:
            self.shards.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StoreError(f"{self.shards}: cannot create ({exc.strerror or exc})") from None
        for folder in (self.shards, self.root):
            for pattern in _TEMP_PATTERNS:
                for tmp in folder.glob(pattern):
                    tmp.unlink(missing_ok=True)  # half-written by a killed run
        rows, good = read_index(self.index_path)
        dirty = good != (self.index_path.stat().st_size if self.index_path.exists() else 0)
        latest = latest_rows(rows)
        dirty |= len(latest) != len(rows)
        dropped, relinked = self._drop_damaged(latest)
        self._remove_orphans({r["shard"] for r in latest.values()})
        if dirty or dropped or relinked:
            write_index(self.index_path, latest.values())
        self.rows = latest
        return dropped

    def shard_failures(
        self, latest: dict[str, dict[str, Any]], *, full: bool = False
    ) -> dict[str, tuple[StoreError, list[dict[str, Any]]]]:
        """shard name -> (why it cannot be used, its index rows) for the shards of `latest` failing
        their checks (`full`: the whole file's sha256 too)."""
        by_shard: dict[str, list[dict[str, Any]]] = {}
        for row in latest.values():
            by_shard.setdefault(row["shard"], []).append(row)
        failed = {}
        for name, shard_rows in sorted(by_shard.items()):
            try:
                check_shard(
                    shard_path(self.root, name),
                    rows=1 + max(int(r["row"]) for r in shard_rows),
                    feature_shape=self.feature_shape,
                    dtype=self.dtype,
                    nbytes=shard_rows[0].get("shard_bytes"),
                    sha256=shard_rows[0].get("shard_sha256") if full else None,
                    checksum=expected_checksum(shard_rows[0]),
                )
            except StoreError as exc:
                failed[name] = (exc, shard_rows)
        return failed

    def unreferenced(self, latest: dict[str, dict[str, Any]]) -> set[str]:
        """Shard files of the key folder that no row of `latest` names (a renamed shard may be one)."""
        referenced = {r["shard"] for r in latest.values()}
        names = {p.name for p in no_link(self.shards).iterdir()} if self.shards.is_dir() else set()
        return {n for n in names if SHARD_RE.fullmatch(n) and n not in referenced}

    def swaps(
        self,
        failed: dict[str, tuple[StoreError, list[dict[str, Any]]]],
        latest: dict[str, dict[str, Any]],
        *,
        full: bool = False,
    ) -> dict[str, str]:
        """{failing shard: intact file holding exactly its rows} (shard files swapped or renamed)."""
        damaged = {n: rows for n, (exc, rows) in failed.items() if isinstance(exc, ShardDamaged)}
        return find_swaps(
            self.root,
            damaged,
            {*failed, *self.unreferenced(latest)},
            feature_shape=self.feature_shape,
            dtype=self.dtype,
            full=full,
        )

    def _drop_damaged(self, latest: dict[str, dict[str, Any]]) -> tuple[int, int]:
        """Re-link the rows of swapped or renamed shards, move shards failing their own checks aside
        and drop their rows from `latest`; returns (rows dropped, rows re-linked). An intact shard
        disagreeing with the index or key.json raises StoreError and changes nothing."""
        failed = self.shard_failures(latest)
        for exc, _ in failed.values():
            if not isinstance(exc, ShardDamaged):
                raise exc
        swaps = self.swaps(failed, latest)
        dropped = sum(len(rows) for name, (_, rows) in failed.items() if name not in swaps)
        if latest and dropped == len(latest):
            first = next(iter(failed.values()))[0]
            raise StoreError(
                f"{self.root}: every shard fails its checks (first: {first}); "
                f"refusing to empty the index: check the disk, then {repair_hint(self.root)}"
            )
        relinked = 0
        for name, (why, rows) in failed.items():
            if name in swaps:
                log.warning(
                    "%s; its %d clips are in %s (swapped or renamed): re-linked", why, len(rows), swaps[name]
                )
                relinked += relink_rows(latest, rows, swaps[name])
                continue
            log.warning("%s; its %d clips will be extracted again", why, len(rows))
            if name not in swaps.values():
                self.set_aside(name)
            for r in rows:
                del latest[r["path"]]
        return dropped, relinked

    def set_aside(self, name: str) -> None:
        """Rename shard `name` to `name.corrupt` (kept for inspection, never read again)."""
        path = shard_path(self.root, name)
        if path.exists():
            os.replace(path, path.with_name(path.name + ".corrupt"))

    def _remove_orphans(self, referenced: set[str]) -> None:
        """Delete shards the index does not name and set the next shard number."""
        numbers = []
        for p in no_link(self.shards).iterdir():
            m = SHARD_RE.match(p.name.removesuffix(".corrupt"))
            if m is None:
                continue
            numbers.append(int(m.group(1)))
            if p.name == m.group(0) and p.name not in referenced:
                # renamed into place but the run died before its index lines, or superseded
                log.info("%s: shard without index lines (interrupted run) removed", p)
                p.unlink()
        self.next_shard = max(numbers, default=0) + 1

    def set_feature_shape(self, shape: tuple[int, int]) -> None:
        """Fix the feature shape (K, d) of a new key folder: write key.json, then recover."""
        self.info["feature_shape"] = [int(shape[0]), int(shape[1])]
        self.feature_shape = tuple(self.info["feature_shape"])
        write_key_file(self.root / KEY_FILE, self.info)
        self.recover()

    def forget(self, paths: Iterable[str]) -> None:
        """Drop the rows of `paths` from the index (atomically): their files changed, so their old
        features must not outlive a failed re-extraction."""
        stale = [p for p in paths if p in self.rows]
        if stale:
            for p in stale:
                del self.rows[p]
            write_index(self.index_path, self.rows.values())

    def close(self) -> None:
        if self.index_file is not None:
            self.index_file.close()
            self.index_file = None

    def _write_error(self, path: Path, exc: OSError) -> str:
        return (
            f"{exc.filename or path}: cannot write ({exc.strerror or exc}); the {len(self.rows)} clips "
            f"stored so far are kept: run the extraction again once this is fixed"
        )

    def write_shard(self, features: np.ndarray, rows: list[dict[str, Any]]) -> None:
        """Write `features` as the next shard (temp name, fsync, rename) and point `rows` at it
        (shard, row, shard_bytes, shard_sha256), row i holding features[i]."""
        name = f"shard-{self.next_shard:06d}.safetensors"
        self.next_shard += 1
        data = shard_bytes(features, self.digest)
        _files.atomic_write_bytes(self.shards / name, data)
        sha = hashlib.sha256(data).hexdigest()
        crc = f"{zlib.crc32(data):08x}"
        for i, row in enumerate(rows):
            row.update(shard=name, row=i, shard_bytes=len(data), shard_sha256=sha, shard_crc32=crc)
            row[ROW_CHECK] = row_check(row)

    def write_batch(self, features: np.ndarray, rows: list[dict[str, Any]]) -> None:
        """Shard first (temp name, fsync, rename), then the index lines (one write, fsync).
        A failed write (disk full, read-only) raises StoreError naming the file; the clips
        stored before stay stored, and the next run redoes this batch."""
        try:
            self.write_shard(features, rows)
        except OSError as exc:
            raise StoreError(self._write_error(self.shards, exc)) from None
        if self.index_file is None:
            self.index_file = open_append(self.index_path)
        try:
            self.index_file.write("".join(row_json(r) + "\n" for r in rows).encode())
            self.index_file.flush()
            os.fsync(self.index_file.fileno())
        except OSError as exc:
            self.index_file.close()  # a partial line is cut off by the next run's recovery
            self.index_file = None
            raise StoreError(self._write_error(self.index_path, exc)) from None
        for row in rows:
            self.rows[row["path"]] = row


def open_key_folder(out: Path, key: Any, head_names: Iterable[Any], model_id: str, dtype: str) -> KeyFolder:
    """The key folder of store `out` for an extractor's `key`, heads and storage dtype.

    An existing key.json must hold the same key and head names; a new folder's key.json is written
    once the feature shape is known (`KeyFolder.set_feature_shape`).
    """
    names = [[int(h[0]), int(h[1]), str(h[2])] for h in head_names]
    full_key = {"extractor": key, "dtype": dtype}
    digest = key_digest(full_key)
    root = out / key_dirname(model_id, digest)
    info = {
        "format": FORMAT,
        "digest": digest,
        "key": json.loads(canonical_json(full_key)),
        "head_names": names,
    }
    key_path = root / KEY_FILE
    if key_path.exists():
        old = read_key_file(key_path)
        if canonical_json(old["key"]) != canonical_json(info["key"]):
            raise StoreError(f"{key_path}: holds a different extraction key with the same digest {digest}")
        if old["head_names"] != names:
            raise StoreError(f"{key_path}: stored head names differ from the extractor's (same key {digest})")
        return KeyFolder(root, old)
    return KeyFolder(root, info)
