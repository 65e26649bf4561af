"""Crafting classifier files byte by byte: split a safetensors file into its header dict and data
bytes, write one back from (possibly edited) parts, and re-seal an edited file's checksum as an
attacker who knows the format would."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from calm._safetensors import DTYPES
from calm.serialization import CHECKSUM_KEY, content_digest


def split_file(path: str | Path) -> tuple[dict[str, Any], bytes]:
    """The header JSON (a dict) and the data bytes after it."""
    raw = Path(path).read_bytes()
    n = int.from_bytes(raw[:8], "little")
    return json.loads(raw[8 : 8 + n]), raw[8 + n :]


def join_file(path: str | Path, header: dict[str, Any] | bytes, data: bytes) -> Path:
    """Write a safetensors file from a header (dict, or raw JSON bytes) and data bytes."""
    text = header if isinstance(header, bytes) else json.dumps(header).encode()
    Path(path).write_bytes(len(text).to_bytes(8, "little") + text + data)
    return Path(path)


def tensors_of(header: dict[str, Any], data: bytes) -> dict[str, np.ndarray]:
    """The tensors the header declares, read from ``data``."""
    out = {}
    for name, info in header.items():
        if name != "__metadata__":
            begin, end = info["data_offsets"]
            a = np.frombuffer(data[begin:end], dtype=DTYPES[info["dtype"]]).reshape(info["shape"])
            out[name] = a
    return out


def reseal(header: dict[str, Any], data: bytes) -> dict[str, Any]:
    """``header`` with the checksum recomputed over its 'calm' text and the tensors in ``data``."""
    meta = header["__metadata__"]
    meta[CHECKSUM_KEY] = content_digest(meta["calm"], tensors_of(header, data))
    return header


def replace_tensor(path: str | Path, out: str | Path, name: str, value: np.ndarray) -> Path:
    """Copy of the file at ``path`` with tensor ``name`` set to ``value`` (same dtype and shape),
    checksum re-sealed: a crafted file that is well-formed except for its values."""
    header, data = split_file(path)
    begin, end = header[name]["data_offsets"]
    blob = np.ascontiguousarray(value, dtype=DTYPES[header[name]["dtype"]]).tobytes()
    assert len(blob) == end - begin
    data = data[:begin] + blob + data[end:]
    return join_file(out, reseal(header, data), data)
