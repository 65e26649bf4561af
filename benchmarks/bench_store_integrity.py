"""Benchmark (not a test): the cost of checking shard integrity when a store is first opened.

`load_features` checks every shard it uses once per process (issue 9 item 3): the crc32 its
index rows record (sha256 for stores written before crc32 was recorded). This script opens a
store and reads all its features in fresh processes, side by side:

  checked    `load_features` + `np.asarray(X)` with the checksums forgotten (computed again)
  memoised   the same again in that process (checksums remembered: no integrity cost)

(both after a warm-up call, so imports and the page cache do not count; the minimum of 5
alternated calls per process, then the median over processes)

and prints the ratio, for the store as it is (stores written before crc32 was recorded are
checked with sha256) and for a temporary copy whose rows record crc32; plus the raw speed of
crc32 and sha256 over the store's shard files.

    python benchmarks/bench_store_integrity.py runs-before/fsdd/features
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path

CHILD = """
import json, sys, time
import numpy as np
from calm.store import checks, load_features
def timed():
    t = time.perf_counter()
    X, y, meta = load_features(sys.argv[1])
    np.asarray(X)
    return time.perf_counter() - t, len(y)
timed()  # warm up: imports, page cache
checked, memoised = [], []
for _ in range(5):  # alternate; the minimum of each is the least disturbed by other processes
    checks._CHECKED.clear()  # forget the checksums: the next open computes them again
    seconds, rows = timed()
    checked.append(seconds)
    memoised.append(timed()[0])
print(json.dumps({"rows": rows, "checked": min(checked), "memoised": min(memoised)}))
"""


def with_crc32(store: Path, into: Path) -> Path:
    """A copy of `store` whose index rows record crc32 (as stores written now do)."""
    from calm.store.checks import shard_checksum
    from calm.store.format import latest_rows, read_index, row_check, write_index

    shutil.copytree(store, into)
    for index in into.glob("*/index.jsonl"):
        rows = list(latest_rows(read_index(index)[0]).values())
        for row in rows:
            row["shard_crc32"] = shard_checksum(index.parent / "shards" / row["shard"], "crc32")
            row["check"] = row_check(row)
        write_index(index, rows)
    return into


def measure(store: str, repeats: int) -> tuple[int, float, float]:
    """(rows, checked seconds, memoised seconds), medians over fresh processes."""
    runs = [
        json.loads(
            subprocess.run(
                [sys.executable, "-c", CHILD, store], capture_output=True, text=True, check=True
            ).stdout
        )
        for _ in range(repeats)
    ]
    checked = sorted(r["checked"] for r in runs)[len(runs) // 2]
    memo = sorted(r["memoised"] for r in runs)[len(runs) // 2]
    return runs[0]["rows"], checked, memo


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("store")
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        crc_store = with_crc32(Path(args.store), Path(tmp) / "store")
        results = {
            "as stored": measure(args.store, args.repeats),
            "crc32 rows": measure(str(crc_store), args.repeats),
        }
    shards = sorted(Path(args.store).glob("*/shards/shard-*.safetensors"))
    data = [p.read_bytes() for p in shards]
    size = sum(map(len, data))
    speed = {}
    for name, fn in (("crc32", zlib.crc32), ("sha256", lambda b: hashlib.sha256(b).digest())):
        t = time.perf_counter()
        for b in data:
            fn(b)
        speed[name] = size / (time.perf_counter() - t) / 1e6
    rows = results["as stored"][0]
    print(f"store {args.store}: {rows} rows, {len(shards)} shards, {size / 1e6:.1f} MB")
    print(f"load_features + read all, median of {args.repeats} fresh processes:")
    for name, (_, checked, memo) in results.items():
        print(
            f"  {name:10s}: checked (first open) {checked * 1000:.1f} ms, "
            f"memoised {memo * 1000:.1f} ms, ratio {checked / memo:.2f}"
        )
    print(
        f"checksum speed over the shards (in memory): crc32 {speed['crc32']:.0f} MB/s, "
        f"sha256 {speed['sha256']:.0f} MB/s"
    )


if __name__ == "__main__":
    main()
