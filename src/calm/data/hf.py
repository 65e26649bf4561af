"""`hf:PATH_OR_ID`: a Hugging Face dataset (saved with `save_to_disk`, an `audiofolder`, or a Hub id).

`hf:ROOT?split=test&audio=audio&label=label&fold=fold` -- every option is optional:

- `split`: comma-separated splits of a DatasetDict to load [all of them]. With one split the clips
  carry no split (the protocol draws support and queries inside it); with several, each clip carries
  its split (train/training -> train, test/eval -> test, validation/valid/dev -> dev; another name
  is an error naming it: choose splits with `split=`).
- `audio`: the audio column [the one `Audio`-typed column].
- `label`: the label column [the one `ClassLabel` column, else a column named `label`]. ClassLabel
  integers become their names; a list of labels is a multi-label clip; strings split on `;`. A
  column of any other type (audio, a struct, an image ...) is refused naming it; a missing or NaN
  label is refused naming its row.
- `fold`: an integer fold column [`fold` when the dataset has one].
- `config`: a Hub dataset's configuration name; `cache`: where embedded audio is written
  [`$CALM_CACHE/hf-audio`]; `missing=skip`: skip rows whose audio file is absent (default: error).

Roots: a folder with `dataset_dict.json` or `state.json` (`save_to_disk` of a DatasetDict or a
Dataset) is opened with `datasets.load_from_disk`; any other folder is read as an `audiofolder`
(Hugging Face's layout, split folders found with `datasets`' own patterns: label = the file's
parent folder, or the `label` column of a `metadata.csv` / `metadata.jsonl` whose `file_name`
column names the files); anything else is a Hub id, loaded with `datasets.load_dataset` where the
network allows and failing with one clear line where it does not (e.g. `HF_HUB_OFFLINE=1`).

Audio is never decoded by `datasets` (no torchcodec needed): the audio column is read with
`Audio(decode=False)` and every clip is a file that `calm.audio` decodes later, with the same
resampling and the same errors as any other file. A row that references an existing file by path
is that file. A row with embedded bytes (`save_to_disk` and Hub parquet files embed them) is written
once to `CACHE/<sha[:2]>/<sha><suffix>`, named by the sha256 of the bytes, so the feature store's
content hash of the clip is the hash of the embedded audio and loading again reuses the file; the
row's original file name is kept in `meta["hf_path"]`, and `meta["origin"]` names the row
("hf:NAME[split] row 3 (id 'x')"): the store starts a clip's failure reason with it. Classes:
the ClassLabel's name order (the names that occur), otherwise sorted.
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from calm._files import atomic_write_bytes
from calm.data._util import (
    AUDIO_EXTENSIONS,
    SPLIT_ALIASES,
    class_order,
    parse_missing,
    skip_missing,
    split_labels,
)
from calm.data.base import Clip, Dataset, DatasetError

INSTALL_HINT = "pip install 'calm-audio[hf]'"
METADATA_FILES = ("metadata.csv", "metadata.jsonl")
LABEL_DTYPES = ("string", "large_string", "bool", "float16", "float32", "float64")
ID_COLUMNS = ("id", "file_id", "clip_id", "audio_id", "utt_id", "key")  # named in a clip's origin
# leading bytes -> file suffix, for embedded audio whose original name has no known suffix
MAGIC = ((b"RIFF", ".wav"), (b"fLaC", ".flac"), (b"OggS", ".ogg"), (b"ID3", ".mp3"), (b"\xff\xfb", ".mp3"))


def _datasets():
    try:
        import datasets
    except ImportError:
        raise DatasetError(f"hf: needs the Hugging Face `datasets` package: {INSTALL_HINT}") from None
    return datasets


def default_cache() -> Path:
    from calm.cache import cache_root

    return cache_root() / "hf-audio"


def load_hf(
    root: str | Path,
    *,
    split: str | None = None,
    audio: str | None = None,
    label: str | None = None,
    fold: str | None = None,
    config: str | None = None,
    cache: str | Path | None = None,
    missing: str = "error",
) -> Dataset:
    """Load `hf:ROOT` (see the module docstring) as a `Dataset` of clips backed by audio files."""
    missing = parse_missing(missing)
    wanted = [s.strip() for s in split.split(",") if s.strip()] if split else None
    source = str(root)
    path = Path(source).expanduser()
    if path.is_dir() and any((path / name).is_file() for name in ("dataset_dict.json", "state.json")):
        splits = _from_disk(path, wanted)
    elif path.is_dir():
        return _audiofolder(path.resolve(), wanted, label or "label", fold, missing)
    elif source.startswith(("/", ".", "~")) or path.exists():
        raise DatasetError(f"{source}: dataset directory not found")
    else:
        splits = _from_hub(source, config, wanted)
    cache_dir = Path(cache).expanduser() if cache else default_cache()
    columns = {"audio": audio, "label": label, "fold": fold}
    clips, names, skipped = _arrow_clips(source, splits, columns, cache_dir, missing)
    root_path = path if path.is_dir() else cache_dir
    return _dataset(f"hf:{path.name if path.is_dir() else source}", root_path, clips, names, skipped)


def _pick(splits: Mapping[str, Any], wanted: list[str] | None, where: str) -> dict[str, Any]:
    if wanted is None:
        return dict(splits)
    absent = [s for s in wanted if s not in splits]
    if absent:
        raise DatasetError(f"{where}: no split(s) {absent}; the dataset has {sorted(splits)}")
    return {s: splits[s] for s in wanted}


def _from_disk(path: Path, wanted: list[str] | None) -> dict[str, Any]:
    ds = _datasets()
    try:
        loaded = ds.load_from_disk(str(path))
    except Exception as exc:  # corrupt or foreign files: name the folder
        raise DatasetError(f"{path}: cannot open the saved dataset ({type(exc).__name__}: {exc})") from None
    if isinstance(loaded, ds.DatasetDict):
        return _pick(loaded, wanted, str(path))
    if wanted is not None:
        raise DatasetError(f"{path}: a single saved Dataset has no splits to choose (split={wanted})")
    return {"": loaded}


def _from_hub(dataset_id: str, config: str | None, wanted: list[str] | None) -> dict[str, Any]:
    ds = _datasets()
    try:
        loaded = ds.load_dataset(dataset_id, config)
    except Exception as exc:  # offline, unknown id, gated repository ...
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DatasetError(
            f"hf:{dataset_id}: not a local folder, and the Hugging Face Hub could not provide it "
            f"(no network, or HF_HUB_OFFLINE set?): {type(exc).__name__}: {first}"
        ) from None
    return _pick(loaded, wanted, f"hf:{dataset_id}")


def _clip_split(name: str, n_splits: int, where: str) -> str | None:
    """The clip's split: None when one split was loaded, else its normalised name."""
    if n_splits <= 1:
        return None
    value = SPLIT_ALIASES.get(name.lower())
    if value is None:
        raise DatasetError(
            f"{where}: split {name!r} is not train, test or dev (or an alias); choose splits with "
            f"?split=NAME (one split: the protocol draws support and queries inside it)"
        )
    return value


# ------------------------------------------------------------------- Arrow datasets (disk or Hub)


def _columns(features: Mapping[str, Any], columns: Mapping[str, str | None], where: str) -> dict[str, Any]:
    """The audio, label and fold column names chosen by option or by feature type."""
    ds = _datasets()
    audio = columns["audio"] or _only(features, lambda f: isinstance(f, ds.Audio), "Audio", "audio", where)
    label = columns["label"] or (
        _only(features, lambda f: isinstance(f, ds.ClassLabel), "ClassLabel", "label", where)
        if any(isinstance(f, ds.ClassLabel) for f in features.values()) or "label" not in features
        else "label"
    )
    fold = columns["fold"] or ("fold" if "fold" in features else None)
    for option, name in (("audio", audio), ("label", label), ("fold", fold)):
        if name is not None and name not in features:
            raise DatasetError(f"{where}: no column {name!r} ({option}=); columns: {sorted(features)}")
    if not isinstance(features[audio], ds.Audio | ds.Value) or (
        isinstance(features[audio], ds.Value) and features[audio].dtype not in ("string", "large_string")
    ):
        raise DatasetError(f"{where}: column {audio!r} holds {features[audio]}, not audio or file paths")
    _check_label_column(features[label], label, where)
    return {"audio": audio, "label": label, "fold": fold}


def _check_label_column(feature: Any, name: str, where: str) -> None:
    """Refuse a label column that cannot hold class names: not a ClassLabel, string, integer (or
    float) column, nor a list of them (Audio, a struct, an image, nested lists ...)."""
    ds = _datasets()
    # a list column (List / Sequence / LargeList, or a one-item list in older `datasets`) of labels
    inner = (
        feature[0]
        if isinstance(feature, list) and len(feature) == 1
        else getattr(feature, "feature", feature)
    )
    ok = isinstance(inner, ds.ClassLabel) or (
        isinstance(inner, ds.Value)
        and (inner.dtype in LABEL_DTYPES or inner.dtype.startswith(("int", "uint")))
    )
    if not ok:
        shown = " ".join(str(feature).split())[:120]
        raise DatasetError(
            f"{where}: label column {name!r} holds {shown}, not class labels (a ClassLabel, string or "
            f"integer column, or a list of them); name the label column with ?label=COLUMN"
        )


def _only(features: Mapping[str, Any], test, kind: str, option: str, where: str) -> str:
    found = [name for name, f in features.items() if test(f)]
    if len(found) != 1:
        which = "no" if not found else f"several ({', '.join(found)})"
        raise DatasetError(f"{where}: {which} {kind} column; name the column with ?{option}=COLUMN")
    return found[0]


def _label_names(feature: Any) -> list[str] | None:
    """ClassLabel names of a label column (or of the items of a list-of-ClassLabel column)."""
    ds = _datasets()
    inner = getattr(feature, "feature", feature)  # Sequence / List of ClassLabel
    return list(inner.names) if isinstance(inner, ds.ClassLabel) else None


def _labels(value: Any, names: list[str] | None, where: str) -> tuple[str, ...]:
    items = list(value) if isinstance(value, list | tuple) else [value]
    out: list[str] = []
    for item in items:
        if item is None or (isinstance(item, float) and not math.isfinite(item)):
            raise DatasetError(f"{where}: no label ({item})")
        if names is not None and not 0 <= int(item) < len(names):
            raise DatasetError(f"{where}: label {item} out of range")
        out.extend(split_labels(names[int(item)] if names is not None else str(item), where))
    if not out:
        raise DatasetError(f"{where}: empty label")
    return tuple(dict.fromkeys(out))


def _arrow_clips(source, splits, columns, cache_dir, missing) -> tuple[list[Clip], list[str] | None, list]:
    ds = _datasets()
    clips: list[Clip] = []
    skipped: list[str] = []
    names: list[str] | None = None
    for split_name, table in splits.items():
        where = f"hf:{source}" + (f"[{split_name}]" if split_name else "")
        chosen = _columns(table.features, columns, where)
        names = _label_names(table.features[chosen["label"]]) or names
        if isinstance(table.features[chosen["audio"]], ds.Audio):
            table = table.cast_column(chosen["audio"], ds.Audio(decode=False))
        split = _clip_split(split_name, len(splits), where)
        keep = [c for c in chosen.values() if c is not None]
        extra = [n for n, f in table.features.items() if n not in keep and isinstance(f, ds.Value)]
        for i, row in enumerate(table.select_columns(keep + extra)):
            at = f"{where} row {i}"
            path = _audio_file(row[chosen["audio"]], cache_dir, at)
            if path is None:
                skip_missing(f"{at}: audio file not found: {row[chosen['audio']]}", missing, skipped)
                continue
            meta = (
                {n: row[n] for n in extra} | {"hf_row": i} | ({"hf_split": split_name} if split_name else {})
            )
            meta["origin"] = _origin(at, row, extra)
            if isinstance(row[chosen["audio"]], Mapping) and row[chosen["audio"]].get("bytes"):
                meta["hf_path"] = row[chosen["audio"]].get("path")
            clips.append(
                Clip(
                    path=path,
                    labels=_labels(row[chosen["label"]], _label_names(table.features[chosen["label"]]), at),
                    fold=_fold(row[chosen["fold"]], at) if chosen["fold"] else None,
                    split=split,
                    meta=meta,
                )
            )
    return clips, names, skipped


def _origin(at: str, row: Mapping[str, Any], extra: list[str]) -> str:
    """Where a clip comes from, for messages about it (its audio may be a cache file): the dataset,
    split and row, and the row's id when it has an id column."""
    column = next((c for c in ID_COLUMNS if c in extra and row[c] not in (None, "")), None)
    return at if column is None else f"{at} ({column} {row[column]!r})"


def _fold(value: Any, where: str) -> int | None:
    if value is None or value == "":
        return None
    try:
        return int(value)
    except (TypeError, ValueError):
        raise DatasetError(f"{where}: fold {value!r} is not an integer") from None


def _audio_file(value: Any, cache_dir: Path, where: str) -> Path | None:
    """The file behind one audio cell: its path, or embedded bytes written to the cache."""
    if isinstance(value, str):
        value = {"path": value, "bytes": None}
    if not isinstance(value, Mapping):
        raise DatasetError(f"{where}: audio cell {type(value).__name__} is neither a path nor audio bytes")
    data, name = value.get("bytes"), value.get("path")
    if data:
        return materialise(bytes(data), name, cache_dir)
    if name and Path(name).expanduser().is_file():
        return Path(name).expanduser().resolve()
    return None


def materialise(data: bytes, name: str | None, cache_dir: Path) -> Path:
    """Write embedded audio once to CACHE/<sha[:2]>/<sha><suffix> (suffix from the name or the bytes)."""
    digest = hashlib.sha256(data).hexdigest()
    suffix = Path(name).suffix.lower() if name else ""
    if suffix not in AUDIO_EXTENSIONS:
        suffix = next((s for magic, s in MAGIC if data.startswith(magic)), ".audio")
    path = cache_dir / digest[:2] / f"{digest}{suffix}"
    if not (path.is_file() and path.stat().st_size == len(data)):
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(path, data)
    return path


def _dataset(name: str, root: Path, clips: list[Clip], names, skipped: list[str]) -> Dataset:
    if not clips:
        raise DatasetError(f"{name}: no clips")
    present = {label for clip in clips for label in clip.labels}
    classes = [n for n in names if n in present] if names else class_order(clips)
    return Dataset(
        name=name,
        root=root,
        clips=clips,
        classes=classes if set(classes) == present else class_order(clips),
        multi_label=any(len(c.labels) > 1 for c in clips),
        skipped=skipped,
    )


# ------------------------------------------------------------------- audiofolder


def _audiofolder(root: Path, wanted, label_col: str, fold_col: str | None, missing: str) -> Dataset:
    """Hugging Face's audiofolder layout, split folders found with `datasets`' own patterns."""
    from datasets.data_files import DataFilesDict, get_data_patterns

    _datasets()
    try:
        files = DataFilesDict.from_patterns(get_data_patterns(str(root)), base_path=str(root))
    except Exception as exc:  # no files at all, or an unreadable folder
        raise DatasetError(f"{root}: not an audiofolder ({type(exc).__name__}: {exc})") from None
    splits = _pick({str(k): [Path(p) for p in v] for k, v in files.items()}, wanted, str(root))
    clips: list[Clip] = []
    skipped: list[str] = []
    for split_name, paths in splits.items():
        split = _clip_split(split_name, len(splits), f"{root}[{split_name}]")
        rows = _metadata_rows(p for p in paths if p.name in METADATA_FILES)
        for path in sorted(p for p in paths if p.suffix.lower() in AUDIO_EXTENSIONS):
            row = rows.pop(path.resolve(), None)
            clips.append(_folder_clip(root, path, row, label_col, fold_col, split, split_name))
        for path, row in rows.items():
            skip_missing(f"{row['_where']}: audio file not found: {path}", missing, skipped)
    return _dataset(f"hf:{root.name}", root, clips, None, skipped)


def _folder_clip(root, path, row, label_col, fold_col, split, split_name) -> Clip:
    where = row["_where"] if row else str(path)
    fold_col = fold_col or ("fold" if row and "fold" in row else None)
    if row is not None and label_col in row:
        labels = split_labels(str(row[label_col]), where)
    elif path.parent.resolve() != root.resolve() and path.parent.name.lower() not in SPLIT_ALIASES:
        labels = (path.parent.name,)
    else:
        raise DatasetError(f"{where}: no label (no class folder and no {label_col!r} in a metadata file)")
    if fold_col and (row is None or fold_col not in row):
        raise DatasetError(f"{where}: no {fold_col!r} column in the metadata")
    reserved = {"file_name", "_where", label_col, fold_col}
    meta = {k: v for k, v in (row or {}).items() if k not in reserved}
    meta |= {"hf_split": split_name, "relpath": path.relative_to(root).as_posix()}
    fold = _fold(row[fold_col], where) if fold_col else None
    return Clip(path=path, labels=labels, fold=fold, split=split, meta=meta)


def _metadata_rows(files: Iterable[Path]) -> dict[Path, dict[str, Any]]:
    """Rows of metadata.csv / metadata.jsonl keyed by the resolved audio path (file_name column)."""
    rows: dict[Path, dict[str, Any]] = {}
    for meta_file in sorted(files):
        for line, row in _read_metadata(meta_file):
            where = f"{meta_file}:{line}"
            if not row.get("file_name"):
                raise DatasetError(f"{where}: no file_name")
            rows[(meta_file.parent / str(row["file_name"])).resolve()] = {**row, "_where": where}
    return rows


def _read_metadata(path: Path) -> Iterable[tuple[int, dict[str, Any]]]:
    if path.suffix == ".jsonl":
        for line, text in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if text.strip():
                try:
                    yield line, json.loads(text)
                except json.JSONDecodeError as exc:
                    raise DatasetError(f"{path}:{line}: not JSON ({exc.msg})") from None
        return
    with path.open(newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        for row in reader:
            yield reader.line_num, {k.strip(): (v or "").strip() for k, v in row.items() if k}
