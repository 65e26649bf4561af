"""`asvspoof2019-la:ROOT`: ASVspoof 2019 logical access, bonafide vs spoof.

ROOT is the folder holding `LA/` (or `LA/` itself). Protocols
`ASVspoof2019_LA_cm_protocols/ASVspoof2019.LA.cm.{train.trn,dev.trl,eval.trl}.txt` have
space-separated rows `SPEAKER_ID FILE_ID - SYSTEM_ID KEY`; audio is
`ASVspoof2019_LA_{train,dev,eval}/flac/{FILE_ID}.flac`. Splits: train, dev, and eval -> test.
Classes: `bonafide`, `spoof` (in that order; bonafide is the positive class for EER).
"""

from __future__ import annotations

from pathlib import Path

from calm.data._util import parse_missing, require_dir, skip_missing
from calm.data.base import Clip, Dataset, DatasetError

PARTS = {"train": ("train.trn", "train"), "dev": ("dev.trl", "dev"), "eval": ("eval.trl", "test")}
CLASSES = ["bonafide", "spoof"]


def load_asvspoof2019_la(root: Path, *, missing: str = "error") -> Dataset:
    root = require_dir(Path(root), "ASVspoof 2019")
    missing = parse_missing(missing)
    la = root / "LA" if (root / "LA").is_dir() else root
    protocols = la / "ASVspoof2019_LA_cm_protocols"
    if not protocols.is_dir():
        raise DatasetError(f"{la}: no ASVspoof2019_LA_cm_protocols folder")
    clips: list[Clip] = []
    skipped: list[str] = []
    found = []
    for part, (suffix, split) in PARTS.items():
        proto = protocols / f"ASVspoof2019.LA.cm.{suffix}.txt"
        if not proto.is_file():
            continue
        found.append(part)
        audio_dir = la / f"ASVspoof2019_LA_{part}" / "flac"
        with proto.open(encoding="utf-8") as f:
            for line, text in enumerate(f, start=1):
                if not text.strip():
                    continue
                where = f"{proto}:{line}"
                cells = text.split()
                if len(cells) != 5:
                    raise DatasetError(
                        f"{where}: expected SPEAKER_ID FILE_ID - SYSTEM_ID KEY, got {len(cells)} fields"
                    )
                speaker, file_id, _, system, key = cells
                if key not in CLASSES:
                    raise DatasetError(f"{where}: key {key!r} is not bonafide or spoof")
                if (key == "bonafide") != (system == "-"):
                    raise DatasetError(f"{where}: system {system!r} inconsistent with key {key!r}")
                path = audio_dir / f"{file_id}.flac"
                if not path.is_file():
                    skip_missing(f"{where}: audio file not found: {path}", missing, skipped)
                    continue
                meta = {"speaker": speaker, "file_id": file_id, "system": system}
                clips.append(Clip(path=path, labels=(key,), split=split, meta=meta))
    if not found:
        raise DatasetError(f"{protocols}: no ASVspoof2019.LA.cm.*.txt protocol files")
    if not clips:
        raise DatasetError(f"{la}: no clips")
    return Dataset(name="asvspoof2019-la", root=la, clips=clips, classes=CLASSES, skipped=skipped)
