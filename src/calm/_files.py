"""File plumbing shared by the store, model files, answer caches and the model converter.

One job: put bytes on disk safely and name them reproducibly. Atomic writes (unique temporary
name beside the target, fsync, rename, fsync of the directory), sha256 of files memoised per
process, canonical JSON, the JSON default for numpy values and paths, and an exclusive file lock.
Nothing here knows about features, models or datasets.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import threading
from pathlib import Path
from typing import Any

import numpy as np

from calm.errors import CalmError

__all__ = [
    "FileLock",
    "LockedError",
    "atomic_write_bytes",
    "atomic_write_json",
    "atomic_write_text",
    "canonical_json",
    "file_sha256",
    "fsync_dir",
    "json_default",
    "json_text",
    "printable",
]


class LockedError(CalmError, OSError):
    """Another process holds the lock."""


def json_default(value: Any) -> Any:
    """`json.dumps(default=...)` for numpy scalars and arrays and paths."""
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"{type(value).__name__} is not JSON-serialisable")


def canonical_json(obj: Any) -> str:
    """Sorted keys, no spaces, UTF-8, no NaN: equal objects give equal strings (for hashing)."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def json_text(obj: Any, *, indent: int | None = None) -> str:
    """JSON text that is always valid UTF-8: non-ASCII characters as they are, except when a
    string holds lone surrogates (a file name that is not valid UTF-8, decoded with
    surrogateescape as `os.fsdecode` does): then the text uses JSON escapes, which read back to
    the same string, so `os.fsencode` gives the original bytes."""
    text = json.dumps(obj, indent=indent, ensure_ascii=False, default=json_default)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        text = json.dumps(obj, indent=indent, ensure_ascii=True, default=json_default)
    return text


def printable(text: str | os.PathLike[str]) -> str:
    """`text` (e.g. a file name) safe to print or write as UTF-8: bytes that are not valid UTF-8
    (lone surrogates from `os.fsdecode`) are shown as `\\xNN`."""
    s = os.fspath(text)
    try:
        s.encode("utf-8")
        return s
    except UnicodeEncodeError:
        return s.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


_HASHES: dict[tuple[str, int, int, int], str] = {}  # (path, inode, size, mtime_ns) -> sha256
_HASH_LOCK = threading.Lock()


def file_sha256(path: str | Path, chunk: int = 1 << 20, *, memo: bool = True) -> str:
    """SHA-256 (hex) of a file's bytes; memoised per process on (path, inode, size, mtime)."""
    st = os.stat(path)
    stamp = (os.path.abspath(path), st.st_ino, st.st_size, st.st_mtime_ns)
    if memo:
        with _HASH_LOCK:
            if stamp in _HASHES:
                return _HASHES[stamp]
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    digest = h.hexdigest()
    if memo:
        with _HASH_LOCK:
            _HASHES[stamp] = digest
    return digest


def fsync_dir(path: str | Path) -> None:
    """fsync a directory so a rename inside it is durable (no-op where unsupported)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # platforms without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _file_mode() -> int:
    """0o666 less the process umask (what `open(path, "w")` gives), read once at import."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


_FILE_MODE = _file_mode()


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write to a unique temporary name beside `path`, fsync, rename over `path`, fsync the folder.

    A crash leaves either the old file or the new one, never a mix; the temporary file is
    removed when the write fails."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), _FILE_MODE)  # mkstemp makes 0600; files get the usual mode
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        if isinstance(exc, OSError) and exc.filename is None and exc.errno is not None:  # e.g. ENOSPC
            raise OSError(exc.errno, exc.strerror, str(path)) from exc
        raise
    fsync_dir(path.parent)


def atomic_write_text(path: str | Path, text: str) -> None:
    """`atomic_write_bytes` of UTF-8 text."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, obj: Any, *, indent: int | None = 2) -> None:
    """`atomic_write_text` of `obj` as JSON (numpy values and paths converted)."""
    atomic_write_text(path, json_text(obj, indent=indent) + "\n")


class FileLock:
    """An exclusive, non-blocking lock on a file (released by the kernel if the process dies).

    `with FileLock(path): ...` raises `LockedError` when another process holds it."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.fd: int | None = None

    def __enter__(self) -> FileLock:
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o644)
        try:
            import fcntl

            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except ImportError:  # pragma: no cover - no fcntl (Windows): no cross-process guard
            pass
        except OSError:
            os.close(self.fd)
            self.fd = None
            raise LockedError(f"{self.path}: locked by another process") from None
        return self

    def __exit__(self, *exc: object) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing releases the flock
            self.fd = None
