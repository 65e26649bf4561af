"""The feature store: per-head features on disk, resumable and crash-safe.

One job: keep extracted features between runs. The package is split by job:

- `calm.store.format`: the on-disk format (key, key folders, index, shards and their checks);
- `calm.store.folder`: one key folder opened for writing (crash recovery, shard/index appends);
- `calm.store.pipeline`: threaded decoding ahead of the model, and the checked model call;
- `calm.store.events`: `ExtractReport`, `ExtractProgress` events and the `TextProgress` printer;
- `calm.store.writer`: `Extraction` / `ExtractionRun` / `extract_to_store` (resume plan, batches);
- `calm.store.reader`: `load_features` and the memory-mapped `ShardedArray`;
- `calm.store.compaction`: `compact`.

Layout of a store directory (one sub-folder per extraction key, so a different model, prompt,
head source, option or storage dtype never reuses another key's features):

    STORE/
      <model-slug>-<digest>/          digest = first 16 hex of sha256(canonical JSON of the key)
        key.json                      {"format", "digest", "key": {"extractor": ..., "dtype": ...},
                                       "head_names": [[layer, head, source], ...], "feature_shape": [K, d]}
        index.jsonl                   one JSON line per stored clip: path (absolute), hash (sha256 of
                                      the file's bytes), label, labels, fold, split, meta, key (digest),
                                      shard, row, shard_bytes, shard_sha256
        failures.jsonl                clips of the latest run that failed, with the reason
        shards/shard-NNNNNN.safetensors   one tensor "features" (rows, K, d), float16 or float32

Crash safety: every batch becomes one shard, written to a temporary name, fsynced and renamed into
place; only then are its index lines appended (one write, fsynced). Killing the process at any
moment loses at most the batch in flight: a half-written temporary file or an index line cut
short is cleaned up on the next run, and a shard that made it to disk without its index lines is
removed and its clips redone. A shard whose size or header does not match the index (truncated or
damaged) is detected on resume, moved aside (`*.corrupt`) and its clips redone; `load_features`
refuses it with a message saying to re-run the extraction.

Resume: a clip is skipped when its absolute path is in the index with the same content hash; a
changed file is extracted again: its old row is dropped first, so a failed re-extraction never
leaves the old content's features behind.
"""

from __future__ import annotations

from calm._files import atomic_write_bytes
from calm.store.compaction import compact
from calm.store.events import ExtractProgress, ExtractReport, ProgressCallback, TextProgress
from calm.store.folder import KeyFolder, open_key_folder
from calm.store.format import (
    DTYPES,
    FAILURES_FILE,
    FORMAT,
    INDEX_FILE,
    KEY_FILE,
    LOCK_FILE,
    SHARD_DIR,
    TENSOR,
    StoreError,
    StoreLock,
    canonical_json,
    check_shard,
    file_sha256,
    key_digest,
    key_dirname,
    latest_rows,
    list_keys,
    read_index,
    read_shard_header,
    resolve_key_dir,
    store_path,
)
from calm.store.pipeline import Decoded
from calm.store.reader import ShardedArray, load_features, open_rows
from calm.store.writer import Extraction, ExtractionRun, extract_to_store, plan_clips

_Lock = StoreLock  # the name tests and older code use

__all__ = [
    "DTYPES",
    "FAILURES_FILE",
    "FORMAT",
    "INDEX_FILE",
    "KEY_FILE",
    "LOCK_FILE",
    "SHARD_DIR",
    "TENSOR",
    "Decoded",
    "Decoded",
    "ExtractProgress",
    "ExtractReport",
    "Extraction",
    "ExtractionRun",
    "ExtractionRun",
    "KeyFolder",
    "ProgressCallback",
    "ShardedArray",
    "StoreError",
    "StoreLock",
    "TextProgress",
    "atomic_write_bytes",
    "canonical_json",
    "check_shard",
    "compact",
    "extract_to_store",
    "file_sha256",
    "key_digest",
    "key_dirname",
    "latest_rows",
    "list_keys",
    "load_features",
    "open_key_folder",
    "open_rows",
    "plan_clips",
    "read_index",
    "read_shard_header",
    "resolve_key_dir",
    "store_path",
]
