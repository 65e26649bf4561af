"""Compaction: merge a key folder's shards into as few as possible, rows sorted by path.

One job: rewrite a key's shards bit for bit into larger ones, crash-safely, reading them only
through the reader's public API (`open_rows`, `ShardedArray.read_raw`).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from calm import _files
from calm.store.folder import KeyFolder
from calm.store.format import KEY_FILE, LOCK_FILE, StoreLock, read_key_file, resolve_key_dir, write_index
from calm.store.reader import open_rows


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
    with StoreLock(root / LOCK_FILE):
        folder = KeyFolder(root, read_key_file(root / KEY_FILE))
        folder.recover()
        ordered = [folder.rows[p] for p in sorted(folder.rows)]
        old = {r["shard"] for r in ordered}
        in_order = all(
            r["shard"] == ordered[0]["shard"] and int(r["row"]) == i for i, r in enumerate(ordered)
        )
        if len(old) <= 1 and in_order:
            return len(old), len(old)
        X = open_rows(root, folder.info, ordered, verify=True)
        row_bytes = X.storage_dtype.itemsize * X.shape[1] * X.shape[2]
        per_shard = max(1, int(max_shard_mb * 2**20 // row_bytes))
        new_rows = []
        for start in range(0, len(ordered), per_shard):
            chunk = [dict(r) for r in ordered[start : start + per_shard]]
            folder.write_shard(X.read_raw(slice(start, start + len(chunk))), chunk)
            new_rows.extend(chunk)
        del X
        write_index(folder.index_path, new_rows)
        for name in old - {r["shard"] for r in new_rows}:
            (folder.shards / name).unlink(missing_ok=True)
        _files.fsync_dir(folder.shards)
        return len(old), len({r["shard"] for r in new_rows})
