"""Small helpers shared by the dataset loaders (file discovery, label parsing, CSV reading)."""

from __future__ import annotations

import csv
from collections.abc import Iterator
from pathlib import Path

from calm.data.base import LABEL_SEP, Clip, DatasetError

# Containers the audio loader (soundfile / PyAV) reads; video containers carry an audio stream.
AUDIO_EXTENSIONS = frozenset(
    {
        ".wav",
        ".flac",
        ".ogg",
        ".oga",
        ".opus",
        ".mp3",
        ".m4a",
        ".aac",
        ".aif",
        ".aiff",
        ".wma",
        ".mp4",
        ".m4v",
        ".mkv",
        ".webm",
        ".mov",
        ".avi",
    }
)

SPLIT_ALIASES = {
    "train": "train",
    "training": "train",
    "test": "test",
    "eval": "test",
    "evaluation": "test",
    "dev": "dev",
    "val": "dev",
    "valid": "dev",
    "validation": "dev",
}


def is_audio(path: Path) -> bool:
    return path.is_file() and not path.name.startswith(".") and path.suffix.lower() in AUDIO_EXTENSIONS


def split_labels(text: str, where: str) -> tuple[str, ...]:
    """`a;b;c` -> ("a", "b", "c"), whitespace stripped, duplicates removed (order kept)."""
    labels = tuple(dict.fromkeys(p.strip() for p in text.split(LABEL_SEP) if p.strip()))
    if not labels:
        raise DatasetError(f"{where}: empty label")
    return labels


def normalise_split(text: str, where: str) -> str | None:
    value = text.strip().lower()
    if not value:
        return None
    if value not in SPLIT_ALIASES:
        raise DatasetError(
            f"{where}: unknown split {text!r} (expected one of train, test, dev or an alias: "
            f"{', '.join(sorted(SPLIT_ALIASES))})"
        )
    return SPLIT_ALIASES[value]


def parse_fold(text: str, where: str) -> int | None:
    value = text.strip()
    if not value:
        return None
    try:
        return int(value)
    except ValueError:
        raise DatasetError(f"{where}: fold {text!r} is not an integer") from None


def read_csv_rows(path: Path) -> Iterator[tuple[int, list[str]]]:
    """Yield (line number, cells) for each non-empty row not starting with `#` (header included).

    Line numbers are 1-based physical lines of the file, as an editor shows them.
    """
    if not path.is_file():
        raise DatasetError(f"{path}: file not found")
    with path.open(newline="", encoding="utf-8-sig") as f:
        reader = csv.reader(f, skipinitialspace=True)
        start = 1
        while True:
            try:
                row = next(reader, None)
            except UnicodeDecodeError as e:  # decoded a chunk at a time: find the line in the file
                raise DatasetError(_not_utf8(path)) from e
            except csv.Error as e:  # e.g. a field over csv.field_size_limit() characters
                raise DatasetError(f"{path}:{start}: unreadable CSV: {e}") from e
            if row is None:
                return
            line = start
            start = reader.line_num + 1
            if not row or all(not c.strip() for c in row) or row[0].lstrip().startswith("#"):
                continue
            yield line, [c.strip() for c in row]


def _not_utf8(path: Path) -> str:
    """ "FILE:LINE: not UTF-8 text (byte 0xNN); ..." for the first byte of `path` that is not UTF-8."""
    data = path.read_bytes()
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        return f"{path}:{line}: not UTF-8 text (byte 0x{data[e.start]:02x}); save it as UTF-8"
    return f"{path}: not UTF-8 text; save it as UTF-8"  # changed while it was read


def class_order(clips: list[Clip]) -> list[str]:
    """Sorted set of every label of every clip (the documented class order: sorted names)."""
    return sorted({label for clip in clips for label in clip.labels})


def require_dir(root: Path, what: str) -> Path:
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DatasetError(f"{root}: {what} directory not found")
    return root


def parse_missing(missing: str) -> str:
    if missing not in ("error", "skip"):
        raise DatasetError(f"missing={missing!r}: expected 'error' or 'skip'")
    return missing


def skip_missing(message: str, missing: str, skipped: list[str], hint: str = "") -> None:
    """A clip whose audio is absent: with missing="error" a DatasetError (`message` and `hint`),
    with missing="skip" `message` is added to `skipped`."""
    if missing == "error":
        raise DatasetError(message + hint)
    skipped.append(message)


def index_audio(root: Path) -> dict[str, Path]:
    """Map each audio file's stem under root (recursively) to its path; the first in sorted order wins."""
    index: dict[str, Path] = {}
    for path in sorted(root.rglob("*")):
        if is_audio(path):
            index.setdefault(path.stem, path)
    return index
