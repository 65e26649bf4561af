"""The feature store: per-head features on disk, resumable and crash-safe.

One job: keep extracted features between runs. The package is split by job:

- `calm.store.format`: the on-disk format (key, key folders, index, shard names);
- `calm.store.checks`: shard checks (own integrity: header, size, checksum; agreement with index and key);
- `calm.store.folder`: one key folder opened for writing (crash recovery, shard/index appends);
- `calm.store.pipeline`: threaded decoding ahead of the model, and the checked model call;
- `calm.store.events`: `ExtractReport`, `ExtractProgress` events and the `TextProgress` printer;
- `calm.store.writer`: `Extraction` / `ExtractionRun` / `extract_to_store` (resume plan, batches);
- `calm.store.reader`: `load_features` and the memory-mapped `ShardedArray`;
- `calm.store.compaction`: `compact`;
- `calm.store.verify`: `verify_store` (`calm verify STORE [--repair]`).

Layout of a store directory (one sub-folder per extraction key, so a different model, prompt,
head source, option or storage dtype never reuses another key's features):

    STORE/
      <model-slug>-<digest>/          digest = first 16 hex of sha256(canonical JSON of the key)
        key.json                      {"format", "digest", "key": {"extractor": ..., "dtype": ...},
                                       "head_names": [[layer, head, source], ...], "feature_shape": [K, d]}
        index.jsonl                   one JSON line per stored clip: path (absolute), hash (sha256 of
                                      the file's bytes), label, labels, fold, split, meta, key (digest),
                                      duration (seconds decoded; absent in older stores), shard,
                                      row, shard_bytes, shard_sha256
        failures.jsonl                clips of the latest run that failed, with the reason
        shards/shard-NNNNNN.safetensors   one tensor "features" (rows, K, d), float16 or float32

Crash safety: every batch becomes one shard, written to a temporary name, fsynced and renamed into
place; only then are its index lines appended (one write, fsynced). Killing the process at any
moment loses at most the batch in flight: a half-written temporary file or an index line cut
short is cleaned up on the next run, and a shard that made it to disk without its index lines is
removed and its clips redone. A shard whose size or header does not match the index (truncated or
damaged) is detected on resume, moved aside (`*.corrupt`) and its clips redone; a shard file
swapped with another's or renamed is found by its recorded size and checksum and its rows re-linked
(as `verify_store(repair=True)` does). `load_features` refuses either with a message saying to
re-run the extraction.

Integrity: every index row records its shard's crc32 (and sha256) and a `check` (crc32 of the
row's other fields); each shard is checked against them once per process when first opened (by
`load_features`, resume, compaction), and an edited index line is refused. Shard names must be
`shard-NNNNNN.safetensors` and no file of the store may be a symbolic link, so a crafted index or
key file never makes the store read, move or write outside its key folder. Recovery sets aside
only shards failing their own checks; a damaged key.json or index line is refused with the
repair route `calm verify STORE --repair` (`verify_store`).

Resume: a clip is skipped when its absolute path is in the index with the same content hash; a
changed file is extracted again: its old row is dropped first, so a failed re-extraction never
leaves the old content's features behind.
"""

from __future__ import annotations

from calm._files import atomic_write_bytes
from calm.store.checks import ShardDamaged, check_shard, read_shard_header
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
    file_sha256,
    key_digest,
    key_dirname,
    latest_rows,
    list_keys,
    read_index,
    resolve_key_dir,
    store_path,
)
from calm.store.pipeline import Decoded
from calm.store.reader import ShardedArray, load_features, open_rows
from calm.store.verify import VerifyReport, verify_store
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
    "ExtractProgress",
    "ExtractReport",
    "Extraction",
    "ExtractionRun",
    "KeyFolder",
    "ProgressCallback",
    "ShardDamaged",
    "ShardedArray",
    "StoreError",
    "StoreLock",
    "TextProgress",
    "VerifyReport",
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
    "verify_store",
]
