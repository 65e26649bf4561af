"""`folder:ROOT`: one sub-folder per class, any audio format, searched recursively inside it."""

from __future__ import annotations

import errno
import logging
import os
import stat
from pathlib import Path

from calm.data._util import AUDIO_EXTENSIONS, class_order, require_dir
from calm.data.base import Clip, Dataset, DatasetError

log = logging.getLogger("calm.data")

SHOWN = 5  # skipped entries named in the warning (all of them are on `Dataset.skipped`)


def _entry_problem(path: Path) -> str | None:
    """Why an entry with an audio extension is not a clip (None when it is a readable file)."""
    try:
        st = os.stat(path)  # follows links
    except OSError as exc:
        if path.is_symlink():
            return "symbolic link loop" if exc.errno == errno.ELOOP else "dangling symbolic link"
        return f"cannot stat ({exc.strerror or exc})"
    if stat.S_ISDIR(st.st_mode):
        return "a directory with an audio file name"
    if not stat.S_ISREG(st.st_mode):
        kind = "FIFO" if stat.S_ISFIFO(st.st_mode) else "socket" if stat.S_ISSOCK(st.st_mode) else "device"
        return f"not a regular file ({kind})"
    return None


def _class_files(class_dir: Path, skipped: list[str]) -> list[Path]:
    """Sorted audio files under `class_dir` (not following links to folders); entries with an
    audio extension that are not readable files, and folders that cannot be listed, go to
    `skipped` as "path: reason"."""

    def unreadable(exc: OSError) -> None:
        skipped.append(f"{exc.filename}: cannot list folder ({exc.strerror or exc})")

    files = []
    for folder, dirs, names in os.walk(class_dir, onerror=unreadable):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in [*names, *dirs]:
            path = Path(folder) / name
            if name.startswith(".") or path.suffix.lower() not in AUDIO_EXTENSIONS:
                continue
            problem = _entry_problem(path)
            if problem is None:
                files.append(path)
            else:
                skipped.append(f"{path}: {problem}")
    return sorted(files)


def load_folder(root: str | Path) -> Dataset:
    """Every audio file under `ROOT/<class>/` is a clip of that class (class = folder name).

    Files directly in ROOT (README, LICENSE) and hidden files and folders are ignored. Entries
    that look like audio but are not readable files (a directory named `x.wav`, dangling links,
    link loops, FIFOs), folders that cannot be listed and class folders without audio are
    skipped and reported: on `Dataset.skipped` ("path: reason") and in one logged warning
    (count and the first few). No folds or splits: the evaluation protocol makes a seeded
    per-class split. Classes are sorted by name.
    """
    root = require_dir(Path(root), "dataset")
    clips: list[Clip] = []
    skipped: list[str] = []
    for class_dir in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        files = _class_files(class_dir, skipped)
        if not files:
            skipped.append(f"{class_dir}: empty class folder (no audio files)")
        for path in files:
            rel = path.relative_to(root).as_posix()
            clips.append(Clip(path=path, labels=(class_dir.name,), meta={"relpath": rel}))
    if skipped:
        more = f"\n  ... and {len(skipped) - SHOWN} more" if len(skipped) > SHOWN else ""
        shown = "\n  ".join(skipped[:SHOWN]) + more
        log.warning("folder:%s: %d entries skipped:\n  %s", root, len(skipped), shown)
    if not clips:
        raise DatasetError(f"{root}: no audio files in class sub-folders (expected ROOT/<class>/<clip>)")
    return Dataset(
        name=f"folder:{root.name}", root=root, clips=clips, classes=class_order(clips), skipped=skipped
    )
