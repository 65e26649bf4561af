"""`vggsound:ROOT`: `ROOT/vggsound.csv` (no header; `youtube_id,start_seconds,label,split`).

Clips are looked up anywhere under ROOT by the stem `{youtube_id}_{start:06d}` with any audio or
video extension (`.mp4`, `.wav`, `.flac`, ...). Without `vggsound.csv`, a `test.csv`
(`{id}_{start:06d}.mp4,label`, the released test list) is read instead, with no split (the
protocol then makes a seeded per-class split). `stat.csv` (`label,count,category`), when present,
adds each clip's category to its metadata. Classes are sorted by name.
"""

from __future__ import annotations

from pathlib import Path

from calm.data._util import class_order, index_audio, parse_missing, read_csv_rows, require_dir, skip_missing
from calm.data.base import Clip, Dataset, DatasetError


def _categories(root: Path) -> dict[str, str]:
    for name in ("stat.csv", "vggsound_stat.csv"):
        path = root / name
        if path.is_file():
            out = {}
            for line, cells in read_csv_rows(path):
                if len(cells) != 3:
                    raise DatasetError(
                        f"{path}:{line}: expected label,count,category, got {len(cells)} fields"
                    )
                out[cells[0]] = cells[2]
            return out
    return {}


def load_vggsound(root: Path, *, missing: str = "error") -> Dataset:
    root = require_dir(Path(root), "VGGSound")
    missing = parse_missing(missing)
    index = index_audio(root)
    categories = _categories(root)
    main = root / "vggsound.csv"
    rows: list[tuple[str, str, int, str, str | None]] = []  # where, ytid, start, label, split
    if main.is_file():
        for line, cells in read_csv_rows(main):
            where = f"{main}:{line}"
            if len(cells) != 4:
                raise DatasetError(
                    f"{where}: expected youtube_id,start_seconds,label,split; got {len(cells)} fields"
                )
            ytid, start, label, split = cells
            try:
                start_i = int(float(start))
            except ValueError:
                raise DatasetError(f"{where}: start_seconds {start!r} is not a number") from None
            if split not in ("train", "test"):
                raise DatasetError(f"{where}: split {split!r} is not train or test")
            rows.append((where, ytid, start_i, label, split))
    else:
        test = next((root / n for n in ("test.csv", "vggsound_test.csv") if (root / n).is_file()), None)
        if test is None:
            raise DatasetError(f"{root}: neither vggsound.csv nor test.csv found")
        for line, cells in read_csv_rows(test):
            where = f"{test}:{line}"
            if len(cells) != 2:
                raise DatasetError(f"{where}: expected file,label; got {len(cells)} fields")
            stem = Path(cells[0]).stem
            ytid, sep, start = stem.rpartition("_")
            if not sep or not start.isdigit():
                raise DatasetError(f"{where}: file {cells[0]!r} is not {{youtube_id}}_{{start:06d}}.mp4")
            rows.append((where, ytid, int(start), cells[1], None))
    clips: list[Clip] = []
    skipped: list[str] = []
    for where, ytid, start_s, label, row_split in rows:
        stem = f"{ytid}_{start_s:06d}"
        path = index.get(stem)
        if path is None:
            message = f"{where}: no audio or video file named {stem}.* under {root}"
            skip_missing(message, missing, skipped, " (pass missing=skip to leave absent clips out)")
            continue
        meta = {"youtube_id": ytid, "start_seconds": start_s}
        if categories:
            meta["category"] = categories.get(label, "")
        clips.append(Clip(path=path, labels=(label,), split=row_split, meta=meta))
    if not clips:
        raise DatasetError(f"{root}: no VGGSound clip found on disk ({len(skipped)} rows without audio)")
    return Dataset(name="vggsound", root=root, clips=clips, classes=class_order(clips), skipped=skipped)
