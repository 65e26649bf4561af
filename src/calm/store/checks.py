"""Checks of shard files: their own integrity and their agreement with the index and key.json.

One job: say whether a shard can be used. Its own checks (`ShardDamaged` when they fail): a
readable safetensors header, tensor data exactly filling the file, and the checksum the index
recorded (crc32, or sha256 for shards written before crc32 was recorded), computed once per
process per file version. Then its agreement with the index row and key.json (`StoreError`).
"""

from __future__ import annotations

import json
import os
import struct
import threading
import zlib
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from calm.store.format import DTYPES, TENSOR, StoreError, file_sha256, repair_hint, shard_path

_CHECKED: dict[tuple[str, int, int, int, str], str] = {}  # (path, inode, size, mtime, kind) -> digest
_CHECKED_LOCK = threading.Lock()


def shard_checksum(path: Path, kind: str = "crc32") -> str:
    """The shard's crc32 (8 hex digits) or sha256, computed once per process per file version
    (path, inode, size, mtime)."""
    st = path.stat()
    stamp = (os.path.abspath(path), st.st_ino, st.st_size, st.st_mtime_ns, kind)
    with _CHECKED_LOCK:
        if stamp in _CHECKED:
            return _CHECKED[stamp]
    if kind == "crc32":
        crc = 0
        with open(path, "rb") as f:
            while block := f.read(1 << 22):
                crc = zlib.crc32(block, crc)
        digest = f"{crc:08x}"
    else:
        digest = file_sha256(path)
    with _CHECKED_LOCK:
        _CHECKED[stamp] = digest
    return digest


def expected_checksum(row: Mapping[str, Any]) -> tuple[str, str] | None:
    """(kind, digest) an index row records for its shard: crc32 for new shards, else sha256."""
    for kind in ("crc32", "sha256"):
        value = row.get(f"shard_{kind}")
        if isinstance(value, str):
            return kind, value
    return None


class ShardDamaged(StoreError):
    """A shard that fails its own checks (unreadable, truncated, or not matching its checksum):
    recovery sets it aside and redoes its clips. Any other `StoreError` from `check_shard` means
    the index or key.json disagree with an intact shard, and nothing is moved."""


def read_shard_header(path: Path) -> tuple[int, dict[str, Any]]:
    """(data start offset, header dict) of a safetensors file; ShardDamaged when it is malformed."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise ShardDamaged(f"{path}: truncated shard ({size} bytes, no header)")
            (n,) = struct.unpack("<Q", raw)
            if n > size - 8 or n > 100_000_000:
                raise ShardDamaged(
                    f"{path}: truncated or damaged shard (header length {n}, file {size} bytes)"
                )
            header = json.loads(f.read(n))
        if not isinstance(header, dict):
            raise ShardDamaged(f"{path}: damaged shard header (not a JSON object)")
    except FileNotFoundError:
        raise ShardDamaged(f"{path}: shard missing") from None
    except (OSError, ValueError, RecursionError) as exc:
        if isinstance(exc, StoreError):
            raise
        raise ShardDamaged(f"{path}: damaged shard header ({exc})") from None
    return 8 + n, header


def _tensor_layout(path: Path, start: int, header: Mapping[str, Any]) -> tuple[str, tuple[int, ...], int]:
    """(safetensors dtype, shape, data begin) of the shard's tensor; ShardDamaged unless its data
    exactly fills the file."""
    info = header.get(TENSOR)
    if not isinstance(info, dict):
        raise ShardDamaged(f"{path}: shard has no {TENSOR!r} tensor")
    try:
        shape = tuple(int(s) for s in info.get("shape", ()))
        begin, end = (int(v) for v in info["data_offsets"])
        itemsize = {"F16": 2, "F32": 4}[str(info.get("dtype"))]
    except (KeyError, TypeError, ValueError):
        raise ShardDamaged(f"{path}: damaged shard header ({str(info)[:200]})") from None
    if len(shape) != 3 or end - begin != int(np.prod(shape)) * itemsize or start + end != path.stat().st_size:
        raise ShardDamaged(f"{path}: shard data does not fill the file (truncated or damaged)")
    return str(info["dtype"]), shape, begin


def check_shard(
    path: Path,
    *,
    rows: int,
    feature_shape: Sequence[int],
    dtype: str,
    nbytes: int | None = None,
    sha256: str | None = None,
    checksum: tuple[str, str] | None = None,
) -> tuple[int, tuple[int, ...]]:
    """Verify a shard against what the index expects; returns (data offset, tensor shape).

    Its own checks first (ShardDamaged): readable header, tensor data exactly filling the file,
    the `checksum` (kind, digest) the index recorded (crc32 or sha256, computed once per process
    per file) and `sha256` when given. Then (StoreError) that it agrees with the index and key:
    byte size, dtype, shape and at least `rows` rows. Without a checksum any mismatch counts as
    damage.
    """
    start, header = read_shard_header(path)
    st_dtype, shape, begin = _tensor_layout(path, start, header)
    wanted = [c for c in (checksum, ("sha256", sha256) if sha256 else None) if c is not None]
    for kind, want in wanted:
        if shard_checksum(path, kind) != want:
            raise ShardDamaged(f"{path}: shard {kind} checksum mismatch (damaged or replaced)")
    fault = StoreError if checksum or sha256 else ShardDamaged
    hint = f"; {repair_hint(path.parent.parent)}"
    size = path.stat().st_size
    if nbytes is not None and size != nbytes:
        raise fault(f"{path}: shard is {size} bytes, the index expects {nbytes}{hint}")
    if st_dtype != DTYPES[dtype][1] or list(shape[1:]) != list(feature_shape):
        raise fault(
            f"{path}: shard holds {st_dtype} {shape}, key.json says {dtype} "
            f"(rows, {', '.join(map(str, feature_shape))}){hint}"
        )
    if shape[0] < rows:
        raise fault(f"{path}: shard has {shape[0]} rows, the index refers to row {rows - 1}{hint}")
    return start + begin, shape


def find_swaps(
    root: Path,
    damaged: Mapping[str, Sequence[Mapping[str, Any]]],
    candidates: Iterable[str],
    *,
    feature_shape: Sequence[int],
    dtype: str,
    full: bool = False,
) -> dict[str, str]:
    """{shard name: other shard file name} for shards that fail their checks (`damaged`: name ->
    its index rows) while another intact shard file among `candidates` holds exactly what their
    rows recorded (size, checksum, dtype, shape, enough rows): shard files swapped or renamed, not
    damaged. Each file is given to at most one shard."""
    found: dict[str, str] = {}
    for name, rows in sorted(damaged.items()):
        checksum = expected_checksum(rows[0])
        if checksum is None:
            continue  # without a recorded checksum a match proves nothing
        for other in sorted(set(candidates) - {name} - set(found.values())):
            try:
                check_shard(
                    shard_path(root, other),
                    rows=1 + max(int(r["row"]) for r in rows),
                    feature_shape=feature_shape,
                    dtype=dtype,
                    nbytes=rows[0].get("shard_bytes"),
                    sha256=rows[0].get("shard_sha256") if full else None,
                    checksum=checksum,
                )
            except StoreError:
                continue
            found[name] = other
            break
    return found
