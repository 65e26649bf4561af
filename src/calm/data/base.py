"""What every dataset loader yields: clips with labels, folds or splits, and metadata."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from calm.errors import CalmError

LABEL_SEP = ";"  # multi-label clips store their labels joined by this in flat tables


class DatasetError(CalmError, ValueError):
    """A dataset layout problem, naming the file (and line) at fault."""


@dataclass(frozen=True)
class Clip:
    path: Path
    labels: tuple[str, ...]
    fold: int | None = None
    split: str | None = None  # "train" / "test" / "dev" / None
    meta: Mapping[str, Any] = field(default_factory=dict)

    @property
    def label(self) -> str:
        """The single label, or all labels joined by `;` for multi-label clips."""
        return LABEL_SEP.join(self.labels)


@dataclass
class Dataset:
    name: str
    root: Path
    clips: list[Clip]
    classes: list[str]  # class names in a fixed, documented order (class index = position)
    multi_label: bool = False
    # rows whose audio was absent and skipped on request (`missing="skip"`): "file:line: reason";
    # `folder:` entries that are not readable audio files and empty class folders: "path: reason"
    skipped: list[str] = field(default_factory=list)
