"""The feature store's on-disk format: the extraction key, key folders, shards and the index.

One job: name, write, read and check the files of a store (no extraction, no models). A store
holds one folder per extraction key (`<model-slug>-<digest>`, digest = first 16 hex of sha256 of
the key's canonical JSON) with `key.json`, `index.jsonl` (one JSON line per clip), `failures.jsonl`
and `shards/shard-NNNNNN.safetensors` (one tensor "features" (rows, K, d), float16 or float32).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import struct
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from calm import _files

FORMAT = 1
KEY_FILE = "key.json"
INDEX_FILE = "index.jsonl"
FAILURES_FILE = "failures.jsonl"
SHARD_DIR = "shards"
LOCK_FILE = ".lock"
TENSOR = "features"
DTYPES = {"float16": (np.float16, "F16"), "float32": (np.float32, "F32")}
SHARD_RE = re.compile(r"^shard-(\d{6,})\.safetensors$")


class StoreError(ValueError):
    """A feature store problem, naming the file at fault."""


# ----------------------------------------------------------------------------------------------
# keys and paths


def canonical_json(obj: Any) -> str:
    """`calm._files.canonical_json`, raising StoreError for a key that is not JSON-serialisable."""
    try:
        return _files.canonical_json(obj)
    except (TypeError, ValueError) as exc:
        raise StoreError(f"extraction key is not JSON-serialisable: {exc}") from None


def key_digest(key: Mapping[str, Any]) -> str:
    """First 16 hex digits of sha256 of the key's canonical JSON."""
    return hashlib.sha256(canonical_json(key).encode()).hexdigest()[:16]


def key_dirname(model_id: str, digest: str) -> str:
    """The key folder's name: `<model-slug>-<digest>`."""
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", str(model_id).strip("/").split("/")[-1] or "model")[:48]
    return f"{slug}-{digest}"


def store_path(path: str | Path) -> str:
    """How a clip's path is stored (meta["path"]): absolute and normalised (`..` removed), links kept.
    Compare a dataset's clips with a store's rows through this function."""
    return os.path.abspath(path)


def file_sha256(path: str | Path, chunk: int = 1 << 20) -> str:
    """SHA-256 (hex) of a clip's bytes, read afresh (a clip may change between two runs)."""
    return _files.file_sha256(path, chunk, memo=False)


def row_json(row: Mapping[str, Any]) -> str:
    """One index line (without its newline)."""
    return json.dumps(row, ensure_ascii=False, default=_files.json_default)


class StoreLock(_files.FileLock):
    """The store's writer lock: `StoreError` naming the store when another extraction holds it."""

    def __enter__(self) -> StoreLock:
        try:
            super().__enter__()
        except _files.LockedError:
            raise StoreError(f"{self.path.parent}: another extraction is writing to this store") from None
        return self


# ----------------------------------------------------------------------------------------------
# shards


def shard_bytes(features: np.ndarray, digest: str) -> bytes:
    """The bytes of a shard file holding `features` (rows, K, d)."""
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


def write_index(path: Path, rows: Iterable[dict[str, Any]]) -> None:
    """Replace an index file atomically (unique temporary name, fsync, rename)."""
    _files.atomic_write_bytes(path, "".join(row_json(r) + "\n" for r in rows).encode())


# ----------------------------------------------------------------------------------------------
# key folders


def read_key_file(path: Path) -> dict[str, Any]:
    """The contents of a key.json; StoreError when it is unreadable or incomplete."""
    try:
        info = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise StoreError(f"{path}: unreadable key file ({exc})") from None
    if not isinstance(info, dict):
        raise StoreError(f"{path}: key file is not a JSON object")
    for name in ("digest", "key", "head_names", "feature_shape"):
        if name not in info:
            raise StoreError(f"{path}: key file lacks {name!r}")
    return info


def write_key_file(path: Path, info: Mapping[str, Any]) -> None:
    """Write a key.json atomically."""
    _files.atomic_write_bytes(path, (json.dumps(info, indent=1) + "\n").encode())


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
        info = read_key_file(d / KEY_FILE)
        info["dir"] = d
        out.append(info)
    return out


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
            return Path(infos[0]["dir"])
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
        return Path(hits[0]["dir"])
    listing = "\n  ".join(_describe(i) for i in infos)
    what = "matches several keys" if hits else "matches no key"
    raise StoreError(f"{store}: key {key!r} {what}; the store holds:\n  {listing}")
