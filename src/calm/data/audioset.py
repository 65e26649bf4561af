"""`audioset:ROOT`: AudioSet segments CSVs (multi-label) with locally downloaded audio.

ROOT holds `balanced_train_segments.csv` (split train), `eval_segments.csv` (split test) and,
with `unbalanced=True`, `unbalanced_train_segments.csv` (train): three `#` comment lines, then
rows `YTID, start_seconds, end_seconds, "mid1,mid2"`. `class_labels_indices.csv`
(`index,mid,display_name`; also found as `audioset_class_labels_indices.csv`, in ROOT or its
parent) maps mids to display names; classes follow its index order; without it labels are mids.

Local audio naming varies, so `template` names each clip's file relative to ROOT, with fields
`{ytid}`, `{start}` / `{end}` (as written in the CSV), `{start_int}` / `{end_int}` (whole
seconds), `{start_ms}` and `{split}` (`balanced_train`, `eval`, `unbalanced_train`), e.g.
`audio/{split}/Y{ytid}.wav`. Without a template, files are found anywhere under ROOT by the stems
`Y{ytid}`, `{ytid}`, `{ytid}_{start_int}`, `{ytid}_{start}` or `{ytid}_{start_int:06d}`.
"""

from __future__ import annotations

from pathlib import Path

from calm.data._util import index_audio, parse_missing, read_csv_rows, require_dir, skip_missing
from calm.data.base import Clip, Dataset, DatasetError

SEGMENT_FILES = {
    "balanced_train": ("balanced_train_segments.csv", "train"),
    "eval": ("eval_segments.csv", "test"),
    "unbalanced_train": ("unbalanced_train_segments.csv", "train"),
}
DEFAULT_STEMS = ("Y{ytid}", "{ytid}", "{ytid}_{start_int}", "{ytid}_{start}", "{ytid}_{start_int:06d}")


def _label_table(root: Path) -> tuple[dict[str, str], list[str]] | None:
    for folder in (root, root.parent):
        for name in ("class_labels_indices.csv", "audioset_class_labels_indices.csv"):
            path = folder / name
            if not path.is_file():
                continue
            rows = read_csv_rows(path)
            line, header = next(rows, (1, []))
            if header != ["index", "mid", "display_name"]:
                raise DatasetError(f"{path}:{line}: header {header} is not index,mid,display_name")
            entries = []
            for line, cells in rows:
                if len(cells) != 3 or not cells[0].isdigit():
                    raise DatasetError(f"{path}:{line}: expected index,mid,display_name")
                entries.append((int(cells[0]), cells[1], cells[2]))
            entries.sort()
            return {mid: name for _, mid, name in entries}, [name for _, _, name in entries]
    return None


def _fields(ytid: str, start: str, end: str, split: str, where: str) -> dict:
    try:
        s, e = float(start), float(end)
    except ValueError:
        raise DatasetError(f"{where}: start/end {start!r}/{end!r} are not numbers") from None
    if e <= s:
        raise DatasetError(f"{where}: end_seconds {end} is not after start_seconds {start}")
    return {
        "ytid": ytid,
        "start": start,
        "end": end,
        "start_int": int(s),
        "end_int": int(e),
        "start_ms": int(round(s * 1000)),
        "split": split,
    }


def _labels(mids_text: str, names: dict[str, str], where: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(mids, labels) of one row: labels are display names when the label table is known."""
    mids = tuple(dict.fromkeys(m.strip() for m in mids_text.split(",") if m.strip()))
    if not mids:
        raise DatasetError(f"{where}: no labels")
    if not names:
        return mids, mids
    unknown = [m for m in mids if m not in names]
    if unknown:
        raise DatasetError(f"{where}: label id(s) {unknown} not in class_labels_indices.csv")
    return mids, tuple(names[m] for m in mids)


def _audio_path(root: Path, template: str | None, index: dict[str, Path], fields: dict) -> Path | None:
    """The clip's file: `template` relative to ROOT, else the first default stem found under ROOT."""
    if template is None:
        return next((index[s] for s in (t.format(**fields) for t in DEFAULT_STEMS) if s in index), None)
    try:
        path = root / template.format(**fields)
    except (KeyError, ValueError, IndexError) as exc:
        raise DatasetError(f"template {template!r}: {exc!r} (fields: {', '.join(fields)})") from None
    return path if path.is_file() else None


def _segment_clips(
    csv_path: Path,
    split_name: str,
    *,
    names: dict[str, str],
    template: str | None,
    index: dict[str, Path],
    missing: str,
    skipped: list[str],
) -> list[Clip]:
    """The clips of one segments CSV whose audio is on disk; absent ones go through `skip_missing`."""
    root, split = csv_path.parent, SEGMENT_FILES[split_name][1]
    clips: list[Clip] = []
    for line, cells in read_csv_rows(csv_path):
        where = f"{csv_path}:{line}"
        if len(cells) != 4:
            raise DatasetError(
                f'{where}: expected YTID, start_seconds, end_seconds, "mids"; got {len(cells)} fields'
            )
        ytid, start, end, mids_text = cells
        fields = _fields(ytid, start, end, split_name, where)
        mids, labels = _labels(mids_text, names, where)
        path = _audio_path(root, template, index, fields)
        if path is None:
            message = f"{where}: no audio for {ytid} at {start}s under {root}"
            hint = " (set template=..., or missing=skip to leave absent clips out)"
            skip_missing(message, missing, skipped, hint)
            continue
        meta = {
            "ytid": ytid,
            "start_seconds": float(start),
            "end_seconds": float(end),
            "mids": ",".join(mids),
            "segments": split_name,
        }
        clips.append(Clip(path=path, labels=labels, split=split, meta=meta))
    return clips


def load_audioset(
    root: Path,
    *,
    template: str | None = None,
    unbalanced: bool | str = False,
    missing: str = "error",
) -> Dataset:
    """The AudioSet segments under ROOT as a multi-label `Dataset` (see the module docstring)."""
    root = require_dir(Path(root), "AudioSet")
    missing = parse_missing(missing)
    if isinstance(unbalanced, str):
        unbalanced = unbalanced.lower() in ("1", "true", "yes")
    table = _label_table(root)
    names, ordered = table if table is not None else ({}, [])
    index = index_audio(root) if template is None else {}
    clips: list[Clip] = []
    skipped: list[str] = []
    csv_paths = {
        split_name: root / filename
        for split_name, (filename, _) in SEGMENT_FILES.items()
        if (unbalanced or split_name != "unbalanced_train") and (root / filename).is_file()
    }
    if not csv_paths:
        raise DatasetError(
            f"{root}: no AudioSet segments CSV ({', '.join(f for f, _ in SEGMENT_FILES.values())})"
        )
    for split_name, csv_path in csv_paths.items():
        clips += _segment_clips(
            csv_path,
            split_name,
            names=names,
            template=template,
            index=index,
            missing=missing,
            skipped=skipped,
        )
    if not clips:
        raise DatasetError(f"{root}: no AudioSet clip found on disk ({len(skipped)} rows without audio)")
    present = {label for c in clips for label in c.labels}
    classes = [n for n in ordered if n in present] if ordered else sorted(present)
    return Dataset(
        name="audioset", root=root, clips=clips, classes=classes, multi_label=True, skipped=skipped
    )
