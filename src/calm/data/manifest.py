"""`csv:MANIFEST.csv`: a manifest with at least `path,label` (paths relative to the manifest).

Optional columns `split` (train / test / dev) and `fold` (integer) are read into the clip and then
respected by the evaluation protocol; `;` separates the labels of a multi-label clip; every other
column is kept as per-clip metadata (strings).
"""

from __future__ import annotations

import os
from pathlib import Path

from calm.data._util import class_order, normalise_split, parse_fold, read_csv_rows, split_labels
from calm.data.base import Clip, Dataset, DatasetError

RESERVED = ("path", "label", "split", "fold")


def load_manifest(manifest: str | Path, *, check_files: bool = True) -> Dataset:
    manifest = Path(manifest).expanduser()
    if manifest.is_dir():
        raise DatasetError(f"{manifest}: is a directory; csv: expects the manifest file itself")
    rows = read_csv_rows(manifest)
    try:
        line, header = next(rows)
    except StopIteration:
        raise DatasetError(f"{manifest}: empty manifest (expected a header with path,label)") from None
    header = [h.lower() for h in header]
    missing = [c for c in ("path", "label") if c not in header]
    if missing:
        raise DatasetError(f"{manifest}:{line}: header lacks column(s) {', '.join(missing)} (got {header})")
    if len(set(header)) != len(header):
        raise DatasetError(f"{manifest}:{line}: duplicate column names in header {header}")
    col = {name: i for i, name in enumerate(header)}
    extra = [h for h in header if h not in RESERVED]
    base = manifest.parent
    clips: list[Clip] = []
    seen: dict[str, tuple[int, str]] = {}  # normalised absolute path -> (line, label cell)
    for line, cells in rows:
        where = f"{manifest}:{line}"
        if len(cells) != len(header):
            raise DatasetError(
                f"{where}: expected {len(header)} fields ({','.join(header)}), got {len(cells)}"
            )
        rel = cells[col["path"]]
        if not rel:
            raise DatasetError(f"{where}: empty path")
        path = (base / rel) if not Path(rel).is_absolute() else Path(rel)
        if check_files and not path.is_file():
            raise DatasetError(f"{where}: audio file not found: {path}")
        same = os.path.normpath(os.path.abspath(path))
        if same in seen:
            first, label = seen[same]
            if label != cells[col["label"]]:
                raise DatasetError(
                    f"{where}: {rel} already listed on line {first} with label {label!r}, "
                    f"here with label {cells[col['label']]!r} (conflicting labels)"
                )
            raise DatasetError(f"{where}: {rel} already listed on line {first}")
        seen[same] = (line, cells[col["label"]])
        clips.append(
            Clip(
                path=path,
                labels=split_labels(cells[col["label"]], where),
                fold=parse_fold(cells[col["fold"]], where) if "fold" in col else None,
                split=normalise_split(cells[col["split"]], where) if "split" in col else None,
                meta={name: cells[col[name]] for name in extra},
            )
        )
    if not clips:
        raise DatasetError(f"{manifest}: no rows after the header")
    return Dataset(
        name=f"csv:{manifest.stem}",
        root=base,
        clips=clips,
        classes=class_order(clips),
        multi_label=any(len(c.labels) > 1 for c in clips),
    )
