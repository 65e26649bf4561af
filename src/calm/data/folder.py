"""`folder:ROOT`: one sub-folder per class, any audio format, searched recursively inside it."""

from __future__ import annotations

from pathlib import Path

from calm.data._util import class_order, is_audio, require_dir
from calm.data.base import Clip, Dataset, DatasetError


def load_folder(root: str | Path) -> Dataset:
    """Every audio file under `ROOT/<class>/` is a clip of that class (class = folder name).

    Files directly in ROOT (README, LICENSE) and hidden folders are ignored. No folds or splits:
    the evaluation protocol makes a seeded per-class split. Classes are sorted by name.
    """
    root = require_dir(Path(root), "dataset")
    clips: list[Clip] = []
    for class_dir in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        files = sorted(p for p in class_dir.rglob("*") if is_audio(p))
        for path in files:
            rel = path.relative_to(root).as_posix()
            clips.append(Clip(path=path, labels=(class_dir.name,), meta={"relpath": rel}))
    if not clips:
        raise DatasetError(f"{root}: no audio files in class sub-folders (expected ROOT/<class>/<clip>)")
    return Dataset(name=f"folder:{root.name}", root=root, clips=clips, classes=class_order(clips))
