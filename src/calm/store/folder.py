"""One key folder of a store opened for writing: crash recovery, shard and index appends.

One job: keep a key folder consistent while it is written (by extraction or compaction, always
under the store's lock). Every batch becomes one shard, written to a unique temporary name,
fsynced and renamed into place; only then are its index lines appended (one write, fsynced).
`recover` undoes whatever a killed run left behind: half-written temporary files, an index line
cut short, shards without index lines, and shards that do not match the index (moved aside as
`*.corrupt`, their clips dropped so they are extracted again).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Iterable
from pathlib import Path
from typing import IO, Any

import numpy as np

from calm import _files
from calm.store.format import (
    FORMAT,
    INDEX_FILE,
    KEY_FILE,
    SHARD_DIR,
    SHARD_RE,
    StoreError,
    canonical_json,
    check_shard,
    key_digest,
    key_dirname,
    latest_rows,
    read_index,
    read_key_file,
    row_json,
    shard_bytes,
    write_index,
    write_key_file,
)

log = logging.getLogger("calm.store")

_TEMP_PATTERNS = (".*.tmp-*", ".*.tmp")  # older fixed-suffix temporaries and calm._files' unique ones


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
        """Clean up after a crash and drop rows of damaged shards; returns the rows dropped."""
        self.shards.mkdir(parents=True, exist_ok=True)
        for folder in (self.shards, self.root):
            for pattern in _TEMP_PATTERNS:
                for tmp in folder.glob(pattern):
                    tmp.unlink(missing_ok=True)  # half-written by a killed run
        rows, good = read_index(self.index_path)
        dirty = good != (self.index_path.stat().st_size if self.index_path.exists() else 0)
        latest = latest_rows(rows)
        dirty |= len(latest) != len(rows)
        dropped = self._drop_damaged(latest)
        self._remove_orphans({r["shard"] for r in latest.values()})
        if dirty or dropped:
            write_index(self.index_path, latest.values())
        self.rows = latest
        return dropped

    def _drop_damaged(self, latest: dict[str, dict[str, Any]]) -> int:
        """Move shards that do not match the index aside and drop their rows from `latest`."""
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
        return dropped

    def _remove_orphans(self, referenced: set[str]) -> None:
        """Delete shards the index does not name and set the next shard number."""
        numbers = []
        for p in self.shards.iterdir():
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

    def write_shard(self, features: np.ndarray, rows: list[dict[str, Any]]) -> None:
        """Write `features` as the next shard (temp name, fsync, rename) and point `rows` at it
        (shard, row, shard_bytes, shard_sha256), row i holding features[i]."""
        name = f"shard-{self.next_shard:06d}.safetensors"
        self.next_shard += 1
        data = shard_bytes(features, self.digest)
        _files.atomic_write_bytes(self.shards / name, data)
        sha = hashlib.sha256(data).hexdigest()
        for i, row in enumerate(rows):
            row.update(shard=name, row=i, shard_bytes=len(data), shard_sha256=sha)

    def write_batch(self, features: np.ndarray, rows: list[dict[str, Any]]) -> None:
        """Shard first (temp name, fsync, rename), then the index lines (one write, fsync)."""
        self.write_shard(features, rows)
        if self.index_file is None:
            self.index_file = open(self.index_path, "ab")
        self.index_file.write("".join(row_json(r) + "\n" for r in rows).encode())
        self.index_file.flush()
        os.fsync(self.index_file.fileno())
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
