"""Reading a feature store: `load_features` and the memory-mapped `ShardedArray` view.

One job: turn a key folder's index and shards into (X, y, meta) without copying the features
into memory, checking every shard it uses against the index first.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from calm.store.checks import ShardDamaged, check_shard, expected_checksum
from calm.store.format import (
    DTYPES,
    INDEX_FILE,
    KEY_FILE,
    latest_rows,
    read_index,
    read_key_file,
    repair_hint,
    resolve_key_dir,
    shard_path,
)


class ShardedArray:
    """A read-only (n, K, d) float32 view of features spread over memory-mapped shards.

    Rows are read from the shards only when indexed: `X[idx]` (int, slice, boolean mask or
    integer array, optionally followed by indices over K and d, e.g. `X[:, heads]`) returns a
    numpy array, and `np.asarray(X)` reads everything. Stored float16 values are returned as
    float32 (`storage_dtype` says what is on disk; `read_raw` returns rows exactly as stored).
    The shards are mapped when the view is made, so it stays valid when a later extraction or
    `compact` replaces or deletes their files.
    """

    ndim = 3

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

    def _gather(self, pos: np.ndarray, dtype: npt.DTypeLike) -> np.ndarray:
        out = np.empty((len(pos), *self.shape[1:]), dtype=dtype)
        shard = self._shard_of[pos]
        row = self._row_of[pos]
        for s in np.unique(shard):
            mask = shard == s
            out[mask] = self._map(int(s))[row[mask]]
        return out

    def read_raw(self, positions: npt.ArrayLike | slice) -> np.ndarray:
        """Rows at the given positions exactly as stored: (len(positions), K, d) in `storage_dtype`.

        positions: 1-D integers (negative ones count from the end) or a slice. Unlike `X[idx]`,
        nothing is converted, so copying these rows into another shard is bit-exact."""
        if isinstance(positions, slice):
            pos = np.arange(self.shape[0])[positions]
        else:
            pos = np.asarray(positions)
            if pos.ndim != 1 or not (pos.size == 0 or np.issubdtype(pos.dtype, np.integer)):
                raise IndexError(f"read_raw takes 1-D integer positions, got {pos.dtype} {pos.shape}")
            pos = np.arange(self.shape[0])[pos.astype(np.int64)]
        return self._gather(pos, self.storage_dtype)

    def __getitem__(self, idx: Any) -> Any:
        first, rest = (idx[0], idx[1:]) if isinstance(idx, tuple) else (idx, ())
        if first is Ellipsis:
            first, rest = slice(None), (Ellipsis, *rest)
        pos = np.arange(self.shape[0])[first]
        if pos.ndim == 0:
            row = self._gather(pos.reshape(1), np.float32)[0]
            return row[rest] if rest else row
        out = self._gather(pos.ravel(), np.float32).reshape(*pos.shape, *self.shape[1:])
        return out[(slice(None),) * pos.ndim + rest] if rest else out

    def __array__(self, dtype: npt.DTypeLike | None = None, copy: bool | None = None) -> np.ndarray:
        out: np.ndarray = self._gather(np.arange(self.shape[0]), np.float32)
        return out if dtype is None else out.astype(dtype, copy=False)

    def __iter__(self) -> Iterator[np.ndarray]:
        for i in range(self.shape[0]):
            yield self[i]


def _fold_column(folds: list[Any]) -> Any:
    """Nullable integers when every fold is an int (or missing), else the values as they are."""
    import pandas as pd

    if all(f is None or (isinstance(f, int) and not isinstance(f, bool)) for f in folds):
        return pd.array(folds, dtype="Int64")
    return pd.array(folds, dtype=object)


def open_rows(
    root: Path, info: Mapping[str, Any], ordered: list[dict[str, Any]], *, verify: bool = False
) -> ShardedArray:
    """A ShardedArray over the given index rows of key folder `root` (key.json content `info`),
    row i of the view being `ordered[i]`; checks every shard they use (`check_shard`: its recorded
    crc32, or sha256 for shards written before crc32 was recorded, once per process per file;
    sha256 as well with `verify`)."""
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
        path = shard_path(root, name)
        try:
            offset, shape = check_shard(
                path,
                rows=max_row + 1,
                feature_shape=feature_shape,
                dtype=dtype,
                nbytes=first.get("shard_bytes"),
                sha256=first.get("shard_sha256") if verify else None,
                checksum=expected_checksum(first),
            )
        except ShardDamaged as exc:
            raise ShardDamaged(
                f"{exc}; re-run the extraction with the same arguments to redo its clips, "
                f"or {repair_hint(root)}"
            ) from None
        paths.append(path)
        offsets.append(offset)
        shapes.append(shape)
    shard_of = np.array([number[r["shard"]] for r in ordered], dtype=np.int64)
    row_of = np.array([int(r["row"]) for r in ordered], dtype=np.int64)
    return ShardedArray(paths, offsets, shapes, shard_of, row_of, feature_shape, dtype)


def _text_safe(values: list[Any]) -> Any:
    """`values` as a column: plain, or as Python objects when a string holds lone surrogates (a
    path that is not UTF-8), which pandas' Arrow-backed strings cannot hold."""
    import pandas as pd

    for v in values:
        if isinstance(v, str):
            try:
                v.encode("utf-8")
            except UnicodeEncodeError:
                return pd.Series(values, dtype=object)
    return values


def _meta_frame(ordered: list[dict[str, Any]]) -> Any:
    """The meta DataFrame of index rows: the fixed columns, then the clips' metadata."""
    import pandas as pd

    base = {
        "path": _text_safe([r["path"] for r in ordered]),
        "hash": [r["hash"] for r in ordered],
        "label": _text_safe([r["label"] for r in ordered]),
        "fold": _fold_column([r.get("fold") for r in ordered]),
        "split": _text_safe([r.get("split") for r in ordered]),
        # None (not NaN): not a waveform, or a row of a store written before durations were recorded
        "duration": pd.Series([r.get("duration") for r in ordered], dtype=object),
    }
    meta = pd.DataFrame(base)
    extra_cols: dict[str, list[Any]] = {}
    for i, r in enumerate(ordered):
        for k, v in (r.get("meta") or {}).items():
            if k in base:
                k = f"meta_{k}"
            extra_cols.setdefault(k, [None] * len(ordered))[i] = v
    for k, col in extra_cols.items():
        meta[k] = _text_safe(col)
    return meta


def load_features(
    store: str | Path, key: str | Mapping[str, Any] | None = None, *, mmap: bool = True, verify: bool = False
) -> tuple[Any, np.ndarray, Any]:
    """(X, y, meta) of a feature store.

    X: (n, K, d) float32 -- a `ShardedArray` over memory-mapped shards (supports `X[idx]` and
    `np.asarray(X)`), or an in-memory array with `mmap=False`. y: 1-D array of label strings
    (multi-label joined by `;`). meta: DataFrame with columns path, hash, label, fold, split,
    duration (seconds decoded; None in rows of stores written before it was recorded and for inputs
    that are not waveforms) and the clips' metadata; `meta.attrs` holds "key" (the extractor's key),
    "dtype" (storage dtype), "head_names" (list of (layer, head, source)), "digest" and "store" (the
    key folder). Rows are sorted by path. `key` selects the extraction key when the store holds
    several (see `resolve_key_dir`). Every shard used is checked once per process (size, header and
    the checksum its index rows record) and every index line against its own check; `verify=True`
    also checks every shard's sha256.
    """
    root = resolve_key_dir(store, key)
    info = read_key_file(root / KEY_FILE)
    rows, _ = read_index(root / INDEX_FILE)
    latest = latest_rows(rows)
    ordered = [latest[p] for p in sorted(latest)]
    X: Any = open_rows(root, info, ordered, verify=verify)
    if not mmap:
        X = np.asarray(X)
    meta = _meta_frame(ordered)
    meta.attrs.update(
        key=info["key"]["extractor"],
        dtype=info["key"]["dtype"],
        head_names=[(int(a), int(b), str(c)) for a, b, c in info["head_names"]],
        digest=info["digest"],
        store=str(root),
    )
    y = np.array(meta["label"].tolist(), dtype=str) if len(meta) else np.array([], dtype=str)
    return X, y, meta
