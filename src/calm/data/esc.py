"""ESC-50 (`esc50:ROOT`, or `esc50` alone to download the official archive) and ESC-10 (`esc10:ROOT`).

ESC-50 layout: `ROOT/audio/{fold}-{src}-{take}-{target}.wav` and `ROOT/meta/esc50.csv`
(`filename,fold,target,category,esc10,src_file,take`); classes are the 50 categories in target
order. ROOT may also be the folder that contains `ESC-50-master/`, or the archive zip itself.

ESC-10 release layout: `ROOT/NNN - Class name/{fold}-{src}-{take}.ogg`; classes are the class
names in category-number order. `esc10:ROOT` also accepts an ESC-50 root (the `esc10` subset).
"""

from __future__ import annotations

import re
import shutil
import urllib.request
import zipfile
from pathlib import Path

from calm.cache import cache_root
from calm.data._util import is_audio, read_csv_rows, require_dir
from calm.data.base import Clip, Dataset, DatasetError

ESC50_URL = "https://github.com/karolpiczak/ESC-50/archive/master.zip"
ESC50_DIRNAME = "ESC-50-master"
ESC50_COLUMNS = ["filename", "fold", "target", "category", "esc10", "src_file", "take"]
_ESC50_NAME = re.compile(r"^(\d+)-([^-]+)-([A-Za-z]+)-(\d+)\.wav$")
_ESC10_CLASS_DIR = re.compile(r"^(\d+)\s*-\s*(.+?)\s*$")
_ESC10_NAME = re.compile(r"^(\d+)-([^-]+)-([A-Za-z]+)$")


def _find_esc50_root(path: Path) -> Path | None:
    for candidate in (path, path / ESC50_DIRNAME):
        if (candidate / "meta" / "esc50.csv").is_file():
            return candidate
    return None


def extract_esc50_archive(archive: Path, dest: Path) -> Path:
    """Unpack the official ESC-50 zip (its `meta/` and `audio/` only) into dest; returns the root.

    Refuses members that would land outside dest. Extracts into a temporary folder first, so an
    interrupted extraction never leaves a half-filled root behind.
    """
    archive, dest = Path(archive), Path(dest)
    try:
        zf = zipfile.ZipFile(archive)
    except (zipfile.BadZipFile, OSError) as exc:
        raise DatasetError(f"{archive}: not a readable zip archive ({exc})") from None
    with zf:
        names = zf.namelist()
        csv_members = [n for n in names if n.endswith("meta/esc50.csv")]
        if not csv_members:
            raise DatasetError(f"{archive}: no meta/esc50.csv inside; not the ESC-50 archive")
        prefix = csv_members[0][: -len("meta/esc50.csv")]
        tmp = dest / (ESC50_DIRNAME + ".partial")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        for name in names:
            if not name.startswith(prefix) or name.endswith("/"):
                continue
            rel = name[len(prefix) :]
            if not (rel.startswith("meta/") or rel.startswith("audio/")):
                continue
            target = (tmp / rel).resolve()
            if not target.is_relative_to(tmp.resolve()):
                raise DatasetError(f"{archive}: member {name!r} escapes the destination folder")
            target.parent.mkdir(parents=True, exist_ok=True)
            with zf.open(name) as src, target.open("wb") as dst:
                shutil.copyfileobj(src, dst)
    root = dest / ESC50_DIRNAME
    shutil.rmtree(root, ignore_errors=True)
    tmp.rename(root)
    return root


def download_esc50(dest: Path | None = None, *, url: str = ESC50_URL) -> Path:
    """Download and unpack the official ESC-50 archive into dest (default: the user cache)."""
    dest = Path(dest) if dest is not None else cache_root()
    found = _find_esc50_root(dest)
    if found is not None:
        return found
    dest.mkdir(parents=True, exist_ok=True)
    archive = dest / "ESC-50-master.zip"
    if not archive.is_file():
        part = archive.with_suffix(".zip.part")
        try:
            with urllib.request.urlopen(url, timeout=60) as resp, part.open("wb") as out:
                shutil.copyfileobj(resp, out, length=1 << 20)
        except OSError as exc:  # URLError, timeouts and socket errors are OSErrors
            part.unlink(missing_ok=True)
            raise DatasetError(
                f"could not download ESC-50 from {url} ({exc}). Download the archive yourself, "
                f"unzip it and pass --data esc50:/path/to/{ESC50_DIRNAME}, or place the zip at {archive}"
            ) from None
        part.rename(archive)
    root = extract_esc50_archive(archive, dest)
    archive.unlink()
    return root


def _resolve_esc50(root: Path | None) -> Path:
    if root is None:
        return download_esc50()
    root = Path(root).expanduser()
    if root.is_file() and root.suffix == ".zip":
        return extract_esc50_archive(root, root.parent / (root.stem + "-extracted"))
    found = _find_esc50_root(root)
    if found is None:
        raise DatasetError(f"{root}: no meta/esc50.csv (expected the ESC-50-master folder or its parent)")
    return found


def load_esc50(root: Path | None = None, *, subset: str | None = None, check_files: bool = True) -> Dataset:
    """ESC-50 from its meta CSV; `subset="esc10"` keeps the rows marked esc10 (10 classes)."""
    root = _resolve_esc50(root)
    meta_csv = root / "meta" / "esc50.csv"
    rows = read_csv_rows(meta_csv)
    line, header = next(rows, (1, []))
    if header != ESC50_COLUMNS:
        raise DatasetError(f"{meta_csv}:{line}: header {header} is not {','.join(ESC50_COLUMNS)}")
    clips: list[Clip] = []
    names: dict[int, str] = {}
    for line, cells in rows:
        where = f"{meta_csv}:{line}"
        if len(cells) != len(ESC50_COLUMNS):
            raise DatasetError(f"{where}: expected {len(ESC50_COLUMNS)} fields, got {len(cells)}")
        filename, fold, target, category, esc10, src_file, take = cells
        m = _ESC50_NAME.match(filename)
        if not m:
            raise DatasetError(f"{where}: file name {filename!r} is not fold-src-take-target.wav")
        try:
            fold_i, target_i = int(fold), int(target)
        except ValueError:
            raise DatasetError(f"{where}: fold {fold!r} / target {target!r} are not integers") from None
        if int(m.group(1)) != fold_i or int(m.group(4)) != target_i:
            raise DatasetError(f"{where}: fold/target columns disagree with the file name {filename}")
        if esc10 not in ("True", "False"):
            raise DatasetError(f"{where}: esc10 column {esc10!r} is not True/False")
        if names.setdefault(target_i, category) != category:
            raise DatasetError(f"{where}: target {target_i} named {category!r}, earlier {names[target_i]!r}")
        if subset == "esc10" and esc10 != "True":
            continue
        path = root / "audio" / filename
        if check_files and not path.is_file():
            raise DatasetError(f"{where}: audio file not found: {path}")
        meta = {"target": target_i, "esc10": esc10 == "True", "src_file": src_file, "take": take}
        clips.append(Clip(path=path, labels=(category,), fold=fold_i, meta=meta))
    if not clips:
        raise DatasetError(f"{meta_csv}: no clips" + (f" in subset {subset}" if subset else ""))
    present = {c.labels[0] for c in clips}
    classes = [names[t] for t in sorted(names) if names[t] in present]
    return Dataset(name="esc50" if subset is None else subset, root=root, clips=clips, classes=classes)


def load_esc10(root: Path, *, check_files: bool = True) -> Dataset:
    """ESC-10 in its own release layout (`NNN - Class name/fold-src-take.ogg`), or an ESC-50 root."""
    if root is None:
        return load_esc50(None, subset="esc10")
    root = Path(root).expanduser()
    if _find_esc50_root(root) is not None:
        return load_esc50(root, subset="esc10", check_files=check_files)
    root = require_dir(root, "ESC-10")
    entries = []
    for d in root.iterdir():
        m = _ESC10_CLASS_DIR.match(d.name) if d.is_dir() else None
        if m:
            entries.append((int(m.group(1)), m.group(2), d))
    if not entries:
        raise DatasetError(f"{root}: no 'NNN - Class name' folders (ESC-10 release layout)")
    entries.sort()
    clips: list[Clip] = []
    for category_id, name, d in entries:
        for path in sorted(p for p in d.iterdir() if is_audio(p)):
            m = _ESC10_NAME.match(path.stem)
            if not m:
                raise DatasetError(f"{path}: file name is not fold-freesoundid-take.ext (ESC-10 layout)")
            meta = {"category_id": category_id, "src_file": m.group(2), "take": m.group(3)}
            clips.append(Clip(path=path, labels=(name,), fold=int(m.group(1)), meta=meta))
    if not clips:
        raise DatasetError(f"{root}: class folders contain no audio")
    return Dataset(name="esc10", root=root, clips=clips, classes=[name for _, name, _ in entries])
