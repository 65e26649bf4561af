"""A bounded reader of the safetensors layout: the header first, checked, then only the tensors asked for.

A safetensors file is an 8-byte little-endian header length N, N bytes of JSON (``{name: {"dtype",
"shape", "data_offsets": [begin, end]}, "__metadata__": {str: str}}``), then the tensor bytes, with
offsets relative to the end of the header. :func:`read_header` refuses, before any tensor byte is
read: a header longer than :data:`MAX_HEADER_BYTES` or beyond the end of the file, JSON that is not
UTF-8 or is nested deeper than :data:`MAX_JSON_DEPTH`, an unknown dtype, a shape whose byte size
disagrees with its offsets, offsets outside the file, overlapping tensors, and gaps or trailing bytes
(the tensors must tile the data area exactly, as the safetensors library requires). Every refusal
is a :class:`SafetensorsError` whose message says what is wrong (the caller adds the file name).
"""

from __future__ import annotations

import io
import json
import math
import os
from dataclasses import dataclass
from typing import Any

import numpy as np

from calm.errors import CalmError

__all__ = [
    "DTYPES",
    "MAX_HEADER_BYTES",
    "MAX_JSON_DEPTH",
    "SafetensorsError",
    "TensorEntry",
    "dtype_code",
    "loads_bounded",
    "read_header",
    "read_tensor",
]

#: The largest header read (the header of a classifier file is a few KB).
MAX_HEADER_BYTES = 16 * 2**20
#: The deepest JSON nesting accepted in the header and in a metadata value parsed as JSON.
MAX_JSON_DEPTH = 64
MAX_RANK = 8

#: safetensors dtype codes and the little-endian NumPy dtypes they are read as.
DTYPES: dict[str, np.dtype] = {
    code: np.dtype(np_code)
    for code, np_code in {
        "F64": "<f8",
        "F32": "<f4",
        "F16": "<f2",
        "I64": "<i8",
        "I32": "<i4",
        "I16": "<i2",
        "I8": "i1",
        "U64": "<u8",
        "U32": "<u4",
        "U16": "<u2",
        "U8": "u1",
        "BOOL": "?",
    }.items()
}


class SafetensorsError(CalmError, ValueError):
    """The bytes are not a well-formed safetensors file (the message says why)."""


@dataclass(frozen=True)
class TensorEntry:
    """One tensor of the header: ``name``, ``code`` (e.g. "F32"), NumPy ``dtype``, ``shape`` and its
    absolute byte range [``begin``, ``end``) in the file."""

    name: str
    code: str
    dtype: np.dtype
    shape: tuple[int, ...]
    begin: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


def dtype_code(dtype: np.dtype) -> str:
    """The safetensors code of a NumPy dtype (KeyError for dtypes safetensors cannot hold)."""
    want = np.dtype(dtype).newbyteorder("<") if np.dtype(dtype).itemsize > 1 else np.dtype(dtype)
    return next(code for code, dt in DTYPES.items() if dt == want)


def _depth(value: Any) -> int:
    """Nesting depth of a parsed JSON value (iterative: no recursion limit involved)."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        v, d = stack.pop()
        if isinstance(v, (dict, list)):
            deepest = max(deepest, d)
            stack.extend((x, d + 1) for x in (v.values() if isinstance(v, dict) else v))
    return deepest


def loads_bounded(text: str | bytes, what: str, max_depth: int = MAX_JSON_DEPTH) -> Any:
    """``json.loads(text)``; SafetensorsError naming ``what`` if it is not JSON or is nested deeper
    than ``max_depth`` (the decoder's own recursion limit is caught too)."""
    try:
        value = json.loads(text)
    except RecursionError:
        raise SafetensorsError(f"{what} is JSON nested deeper than {max_depth} levels") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise SafetensorsError(f"{what} is not valid JSON: {e}") from None
    if _depth(value) > max_depth:
        raise SafetensorsError(f"{what} is JSON nested deeper than {max_depth} levels")
    return value


def _entry(name: str, info: Any, data_start: int) -> TensorEntry:
    where = f"tensor {name[:40]!r}"
    if not isinstance(info, dict) or set(info) != {"dtype", "shape", "data_offsets"}:
        raise SafetensorsError(f"{where}: header entry must hold exactly dtype, shape and data_offsets")
    code, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
    if not isinstance(code, str) or code not in DTYPES:
        raise SafetensorsError(f"{where}: unknown dtype {str(code)[:20]!r}")

    def is_int(x: Any) -> bool:
        return isinstance(x, int) and not isinstance(x, bool) and x >= 0

    if not isinstance(shape, list) or len(shape) > MAX_RANK or not all(is_int(x) for x in shape):
        raise SafetensorsError(f"{where}: shape must be a list of at most {MAX_RANK} non-negative ints")
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(is_int(x) for x in offsets):
        raise SafetensorsError(f"{where}: data_offsets must be two non-negative ints")
    begin, end = offsets
    size = math.prod(shape) * DTYPES[code].itemsize
    if end < begin or end - begin != size:
        raise SafetensorsError(
            f"{where}: shape {tuple(shape)} of {code} needs {size} bytes but data_offsets span {end - begin}"
        )
    return TensorEntry(name, code, DTYPES[code], tuple(shape), data_start + begin, data_start + end)


def _check_tiling(entries: list[TensorEntry], data_start: int, file_size: int) -> None:
    pos = data_start
    for e in sorted(entries, key=lambda e: (e.begin, e.end)):
        if e.begin < pos:
            raise SafetensorsError(f"tensor {e.name!r} overlaps the tensor before it")
        if e.begin > pos:
            raise SafetensorsError(f"{e.begin - pos} bytes before tensor {e.name!r} belong to no tensor")
        pos = e.end
    if pos > file_size:
        raise SafetensorsError(f"the tensors end at byte {pos} but the file has {file_size} bytes")
    if pos < file_size:
        raise SafetensorsError(f"{file_size - pos} bytes after the last tensor belong to no tensor")


def read_header(fh: io.BufferedIOBase) -> tuple[dict[str, str], dict[str, TensorEntry]]:
    """The ``__metadata__`` dict and the tensor entries of the open file ``fh``; reads the header
    only (bounded by :data:`MAX_HEADER_BYTES`); SafetensorsError for any malformed part."""
    file_size = os.fstat(fh.fileno()).st_size
    fh.seek(0)
    prefix = fh.read(8)
    if len(prefix) < 8:
        raise SafetensorsError(f"only {file_size} bytes, shorter than the 8-byte header length")
    n = int.from_bytes(prefix, "little")
    if n > MAX_HEADER_BYTES:
        raise SafetensorsError(f"header length {n} exceeds the limit of {MAX_HEADER_BYTES} bytes")
    if 8 + n > file_size:
        raise SafetensorsError(f"header length {n} runs past the end of the file ({file_size} bytes)")
    raw = fh.read(n)
    header = loads_bounded(raw, "the safetensors header")
    if not isinstance(header, dict):
        raise SafetensorsError("the safetensors header is not a JSON object")
    meta = header.pop("__metadata__", None) or {}
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise SafetensorsError("__metadata__ must map names to strings")
    entries = {name: _entry(name, info, 8 + n) for name, info in header.items()}
    _check_tiling(list(entries.values()), 8 + n, file_size)
    return meta, entries


def read_tensor(fh: io.BufferedIOBase, entry: TensorEntry) -> np.ndarray:
    """The bytes of ``entry`` as a fresh native-order array of its dtype and shape."""
    out = np.empty(entry.shape, dtype=entry.dtype)
    fh.seek(entry.begin)
    got = fh.readinto(memoryview(out).cast("B")) if entry.nbytes else 0  # type: ignore[arg-type]
    if got != entry.nbytes:
        raise SafetensorsError(f"tensor {entry.name!r}: file ended after {got} of {entry.nbytes} bytes")
    return out.astype(entry.dtype.newbyteorder("="), copy=False)
