"""The feature store's on-disk format: the extraction key, key folders, shards and the index.

One job: name, write and read the files of a store (no extraction, no models; shard checks are
in `calm.store.checks`). A store holds one folder per extraction key (`<model-slug>-<digest>`,
digest = first 16 hex of sha256 of the key's canonical JSON) with `key.json`, `index.jsonl` (one
JSON line per clip), `failures.jsonl` and `shards/shard-NNNNNN.safetensors` (one tensor
"features" (rows, K, d), float16 or float32).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import zlib
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from calm import _files
from calm.errors import CalmError

FORMAT = 1
KEY_FILE = "key.json"
INDEX_FILE = "index.jsonl"
FAILURES_FILE = "failures.jsonl"
SHARD_DIR = "shards"
LOCK_FILE = ".lock"
TENSOR = "features"
DTYPES = {"float16": (np.float16, "F16"), "float32": (np.float32, "F32")}
SHARD_RE = re.compile(r"^shard-(\d{6,})\.safetensors$")


class StoreError(CalmError, ValueError):
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
    """One index line (without its newline), always encodable as UTF-8: a path that is not valid
    UTF-8 (decoded with surrogateescape, as `os.fsdecode` does) is written with JSON escapes, so
    `os.fsencode(row["path"])` gives the file's bytes back."""
    return _files.json_text(row)


REPAIR_HINT = "run `calm verify {store} --repair` (the next extraction then redoes the clips it drops)"


def repair_hint(key_dir: Path) -> str:
    """How to repair the store holding key folder `key_dir`."""
    return REPAIR_HINT.format(store=key_dir.parent)


def shard_path(root: Path, name: Any, where: str = "") -> Path:
    """`root/shards/name` after checking that `name` is a plain `shard-NNNNNN.safetensors` and that
    neither the shards folder nor the shard is a symbolic link: whatever an index says, a store
    never reads, moves or writes outside its key folder."""
    if not isinstance(name, str) or SHARD_RE.match(name) is None:
        raise StoreError(
            f"{where or root / INDEX_FILE}: shard name {name!r} is not shard-NNNNNN.safetensors "
            f"(crafted or damaged index); {repair_hint(root)}"
        )
    return no_link(no_link(root / SHARD_DIR) / name)


def no_link(path: Path) -> Path:
    """`path`, after checking it is not a symbolic link (a store's own files never are: one that
    is could make the store read or write outside its key folder)."""
    if path.is_symlink():
        raise StoreError(f"{path}: is a symbolic link; a store only uses files inside its key folder")
    return path


def open_append(path: Path) -> Any:
    """`path` opened for appending bytes, refusing a symbolic link (O_NOFOLLOW where available)."""
    flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0)
    try:
        fd = os.open(no_link(path), flags, 0o644)
    except OSError as exc:
        raise StoreError(f"{path}: cannot open for writing ({exc.strerror or exc})") from None
    return os.fdopen(fd, "ab")


class StoreLock(_files.FileLock):
    """The store's writer lock: `StoreError` naming the store when another extraction holds it."""

    def __enter__(self) -> StoreLock:
        try:
            super().__enter__()
        except _files.LockedError:
            raise StoreError(f"{self.path.parent}: another extraction is writing to this store") from None
        except OSError as exc:  # a read-only store, a lock file that is a symbolic link, ...
            raise StoreError(
                f"{self.path}: cannot lock the store for writing ({exc.strerror or exc})"
            ) from None
        return self


# ----------------------------------------------------------------------------------------------
# shards


def shard_bytes(features: np.ndarray, digest: str) -> bytes:
    """The bytes of a shard file holding `features` (rows, K, d)."""
    from safetensors.numpy import save

    return save({TENSOR: np.ascontiguousarray(features)}, metadata={"calm_store": str(FORMAT), "key": digest})


# ----------------------------------------------------------------------------------------------
# index


ROW_CHECK = "check"  # crc32 of the rest of the row's canonical JSON: an edited row is refused


def row_check(row: Mapping[str, Any]) -> str:
    """The `check` field of an index row: crc32 (8 hex) of its other fields' canonical JSON."""
    rest = {k: v for k, v in row.items() if k != ROW_CHECK}
    text = json.dumps(
        rest, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=_files.json_default
    )
    return f"{zlib.crc32(text.encode('utf-8', 'surrogatepass')):08x}"


def _row_problem(row: Any) -> str | None:
    """Why an index row cannot be used (None when it can)."""
    if not isinstance(row, dict) or not isinstance(row.get("path"), str):
        return "index line without a path"
    if not isinstance(row.get("shard"), str) or SHARD_RE.match(row["shard"]) is None:
        return f"shard name {row.get('shard')!r} is not shard-NNNNNN.safetensors (crafted or damaged index)"
    if not isinstance(row.get("row"), int) or isinstance(row["row"], bool) or row["row"] < 0:
        return f"row {row.get('row')!r} is not a row number"
    if ROW_CHECK in row and row[ROW_CHECK] != row_check(row):
        return "index line edited or damaged (its check does not match)"
    return None


def scan_index(path: Path) -> tuple[list[dict[str, Any]], int, list[tuple[int, str]]]:
    """(usable rows, byte length of the part read, [(line number, problem)] of unusable lines).

    A last line cut short by a crash (no newline, or not valid JSON) ends the part read and is not
    a problem; a damaged line anywhere else is.
    """
    if not no_link(path).exists():
        return [], 0, []
    data = path.read_bytes()
    rows: list[dict[str, Any]] = []
    bad: list[tuple[int, str]] = []
    good = pos = lineno = 0
    while pos < len(data):
        lineno += 1
        nl = data.find(b"\n", pos)
        if nl < 0:  # unterminated last line: a crash mid-append
            break
        line = data[pos:nl]
        problem: str | None
        try:
            row = json.loads(line) if line.strip() else None
        except (ValueError, RecursionError):
            if not data[nl + 1 :].strip():
                break  # a damaged last line: a crash mid-append
            row, problem = None, "damaged index line (not JSON)"
        else:
            problem = None if row is None else _row_problem(row)
        if problem is not None:
            bad.append((lineno, problem))
        elif row is not None:
            rows.append(row)
        pos = good = nl + 1
    return rows, good, bad


def read_index(path: Path) -> tuple[list[dict[str, Any]], int]:
    """Rows of an index file and the byte length of its valid part (see `scan_index`); StoreError
    naming the first unusable line, with the repair route."""
    rows, good, bad = scan_index(path)
    if bad:
        lineno, problem = bad[0]
        more = f" (and {len(bad) - 1} more lines)" if len(bad) > 1 else ""
        raise StoreError(f"{path}:{lineno}: {problem}{more}; {repair_hint(path.parent)}")
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
        info = json.loads(no_link(path).read_text())
    except (OSError, ValueError, RecursionError) as exc:
        raise StoreError(
            f"{path}: unreadable key file ({exc}); restore it, or move its key folder aside to extract again"
        ) from None
    if not isinstance(info, dict):
        raise StoreError(f"{path}: key file is not a JSON object")
    for name in ("digest", "key", "head_names", "feature_shape"):
        if name not in info:
            raise StoreError(f"{path}: key file lacks {name!r}; {repair_hint(path.parent)}")
    shape = info["feature_shape"]
    dtype = info["key"].get("dtype") if isinstance(info["key"], dict) else None
    if (
        not isinstance(shape, list)
        or len(shape) != 2
        or not all(isinstance(v, int) and v > 0 for v in shape)
        or dtype not in DTYPES
        or not isinstance(info["head_names"], list)
        or len(info["head_names"]) != shape[0]
    ):
        raise StoreError(
            f"{path}: damaged key file (feature_shape {shape!r}, dtype {dtype!r}, "
            f"{len(info['head_names']) if isinstance(info['head_names'], list) else '?'} head names); "
            f"{repair_hint(path.parent)}"
        )
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
