"""Checking a feature store and repairing what can be repaired (`calm verify STORE [--repair]`).

One job: report every problem of a store's key folders, each naming its file: unusable index
lines (damaged, edited, a shard name that is not `shard-NNNNNN.safetensors`), shards failing
their own checks (missing, truncated, checksum mismatch), index rows that disagree with an
intact shard, and a key.json whose feature shape disagrees with every intact shard. With
`repair=True` (under the store's lock): rows of a shard whose file was swapped with another's
or renamed are pointed at the intact file that holds exactly what they recorded (size and
checksum; nothing dropped), bad shards are moved aside (`*.corrupt`; a missing one is reported
missing), the rows that cannot be used are dropped (the next extraction redoes those clips), and
a key.json whose feature shape disagrees with all intact shards is rewritten from them.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from calm.store.checks import (
    ShardDamaged,
    _tensor_layout,
    read_shard_header,
)
from calm.store.folder import KeyFolder, relink_rows
from calm.store.format import (
    INDEX_FILE,
    KEY_FILE,
    LOCK_FILE,
    SHARD_DIR,
    StoreError,
    StoreLock,
    latest_rows,
    list_keys,
    no_link,
    read_key_file,
    resolve_key_dir,
    scan_index,
    shard_path,
    write_index,
    write_key_file,
)


@dataclass
class VerifyReport:
    """What `verify_store` found in one key folder (and, with repair, what it changed)."""

    key_dir: Path
    rows: int = 0  # usable rows after the check (after repair: rows kept)
    shards: int = 0
    problems: list[str] = field(default_factory=list)
    repaired: list[str] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)  # clip paths whose rows were dropped

    @property
    def ok(self) -> bool:
        return not self.problems


def _key_dirs(store: Path, key: str | Mapping[str, Any] | None) -> list[Path]:
    if key is not None or (store / KEY_FILE).exists():
        return [resolve_key_dir(store, key)]
    dirs = sorted(p for p in store.iterdir() if (p / KEY_FILE).exists()) if store.is_dir() else []
    if not dirs:
        list_keys(store)  # raises the usual "no feature store here"
    return dirs


def verify_store(
    store: str | Path, key: str | Mapping[str, Any] | None = None, *, repair: bool = False, full: bool = False
) -> list[VerifyReport]:
    """Check every key folder of `store` (or the one `key` selects); one `VerifyReport` each.

    Reads every shard in full (crc32, and sha256 too with `full`). `repair=True` fixes what can
    be fixed (see the module docstring) and never touches a file outside the key folder."""
    reports = []
    for root in _key_dirs(Path(store), key):
        if repair:
            with StoreLock(no_link(root / LOCK_FILE)):
                reports.append(_verify_dir(root, repair=True, full=full))
        else:
            reports.append(_verify_dir(root, repair=False, full=full))
    return reports


def _load_key(root: Path, report: VerifyReport) -> dict[str, Any] | None:
    """key.json as a dict (possibly with a wrong feature_shape), or None when unusable."""
    try:
        return read_key_file(root / KEY_FILE)
    except StoreError as exc:
        report.problems.append(str(exc).split("; ")[0])
    try:
        info = json.loads(no_link(root / KEY_FILE).read_text())
        if (
            isinstance(info, dict)
            and isinstance(info.get("key"), dict)
            and info["key"].get("dtype") in ("float16", "float32")
            and isinstance(info.get("head_names"), list)
            and isinstance(info.get("digest"), str)
        ):
            return info  # its feature shape can be repaired from the shards
    except (OSError, ValueError, RecursionError, StoreError):
        pass
    return None


def _shard_shapes(root: Path, names: set[str]) -> set[tuple[str, int]]:
    """{(dtype, d)} of the readable shards among `names`."""
    shapes = set()
    for name in names:
        try:
            path = shard_path(root, name)
            start, header = read_shard_header(path)
            dtype, shape, _ = _tensor_layout(path, start, header)
            shapes.add((dtype, shape[2]))
        except StoreError:
            continue
    return shapes


def _fix_key(
    root: Path, info: dict[str, Any], latest: dict[str, Any], report: VerifyReport, repair: bool
) -> None:
    """When every readable shard holds features of one shape that key.json's feature_shape
    disagrees with, report it, use the shards' shape, and (repair) rewrite key.json with it."""
    shapes = _shard_shapes(root, {r["shard"] for r in latest.values()})
    want = {"float16": "F16", "float32": "F32"}.get(info["key"].get("dtype"))
    if len(shapes) != 1 or next(iter(shapes))[0] != want:
        return
    shape = [len(info["head_names"]), next(iter(shapes))[1]]
    if info.get("feature_shape") == shape:
        return
    report.problems.append(
        f"{root / KEY_FILE}: feature_shape {info.get('feature_shape')!r}, the shards hold {shape}"
    )
    info["feature_shape"] = shape
    if repair:
        write_key_file(root / KEY_FILE, info)
        report.repaired.append(f"{root / KEY_FILE}: feature_shape set to {shape} from the shards")


def _verify_dir(root: Path, *, repair: bool, full: bool) -> VerifyReport:
    report = VerifyReport(root)
    info = _load_key(root, report)
    rows, _, bad = scan_index(root / INDEX_FILE)
    for lineno, problem in bad:
        report.problems.append(f"{root / INDEX_FILE}:{lineno}: {problem}")
    latest = latest_rows(rows)
    if info is None:
        return report
    _fix_key(root, info, latest, report, repair)
    folder = KeyFolder(root, info)
    failed = folder.shard_failures(latest, full=full)
    swaps = folder.swaps(failed, latest, full=full)
    relinked = 0
    for name, (exc, shard_rows) in sorted(failed.items()):
        report.problems.append(_problem(exc, swaps.get(name)))
        if name in swaps:
            relinked += _relink(root, name, swaps[name], shard_rows, latest, report, repair)
            continue
        if repair and isinstance(exc, ShardDamaged):
            _set_aside(folder, name, len(shard_rows), set(swaps.values()), report)
        for r in shard_rows:
            del latest[r["path"]]
            report.dropped.append(r["path"])
    report.shards = len({r["shard"] for r in latest.values()})
    report.rows = len(latest)
    if repair and (bad or report.dropped or relinked):
        write_index(root / INDEX_FILE, latest.values())
        if bad or report.dropped:
            n = len(bad) + len(report.dropped)
            report.repaired.append(
                f"{root / INDEX_FILE}: {n} unusable rows dropped (the next extraction redoes them)"
            )
    return report


def _problem(exc: StoreError, holder: str | None) -> str:
    first = str(exc).split("; ")[0]
    return first if holder is None else f"{first}; its clips are in {holder} (shards swapped or renamed)"


def _relink(
    root: Path,
    name: str,
    holder: str,
    shard_rows: list[dict[str, Any]],
    latest: dict[str, dict[str, Any]],
    report: VerifyReport,
    repair: bool,
) -> int:
    """Point the rows of shard `name` at `holder`, the intact file holding their features."""
    relink_rows(latest, shard_rows, holder)
    if repair:
        report.repaired.append(
            f"{root / SHARD_DIR / holder}: holds the {len(shard_rows)} clips the index placed in {name} "
            f"(swapped or renamed, intact): their rows now point at it"
        )
    return len(shard_rows)


def _set_aside(folder: KeyFolder, name: str, n_rows: int, in_use: set[str], report: VerifyReport) -> None:
    """Move a damaged shard aside (unless another shard's rows now use the file); a missing one is
    reported as missing."""
    path = folder.root / SHARD_DIR / name
    if not path.exists():
        report.repaired.append(f"{path}: missing; its {n_rows} rows are dropped")
    elif name not in in_use:
        folder.set_aside(name)
        report.repaired.append(f"{path}: moved aside as {name}.corrupt")
