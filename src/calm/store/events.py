"""What an extraction reports: the final `ExtractReport` and the `ExtractProgress` events.

One job: describe an extraction's progress and outcome. Events go to a callback; the CLI draws
them as a bar (`calm.commands._progress`), `TextProgress` prints plain lines; nothing here knows
about terminals beyond that.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO


@dataclass(frozen=True)
class ExtractProgress:
    """One progress event of an extraction (sent at the start and after every clip or batch)."""

    done: int  # clips finished by this run, stored or failed
    total: int  # clips this run has to extract (those already stored are not counted)
    failed: int  # clips of this run that failed so far
    stored: int  # clips of this run stored so far
    skipped: int  # clips already in the store (same path and content)
    seconds: float  # since the extraction of the pending clips started
    clips_per_second: float  # done / seconds


ProgressCallback = Callable[[ExtractProgress], None]


@dataclass
class ExtractReport:
    """What one `extract_to_store` run did."""

    store: Path  # the key folder the features went to
    digest: str
    total: int = 0  # clips considered (after `limit` and de-duplication)
    stored: int = 0  # extracted and stored by this run
    skipped: int = 0  # already in the store with the same content hash
    redone: int = 0  # rows dropped at start because their shard was damaged or orphaned
    failed: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)
    seconds: float = 0.0

    @property
    def clips_per_second(self) -> float:
        return self.stored / self.seconds if self.seconds > 0 else 0.0

    @property
    def ok(self) -> bool:
        return not self.failed

    def summary(self) -> str:
        text = (
            f"{self.stored} stored, {self.skipped} already stored, {len(self.failed)} failed "
            f"of {self.total} clips in {self.seconds:.1f} s ({self.clips_per_second:.2f} clips/s) "
            f"-> {self.store}"
        )
        if self.redone:
            text += f"; {self.redone} clips of damaged shards redone"
        return text


class TextProgress:
    """A plain progress printer: one line to `stream` (default stderr) at most every `interval`
    seconds, and one when the last clip is done. What `progress=True` means."""

    def __init__(self, stream: IO[str] | None = None, interval: float = 10.0):
        self.stream = stream
        self.interval = interval
        self._last = -float("inf")

    def __call__(self, event: ExtractProgress) -> None:
        now = time.monotonic()
        if event.done < event.total and now - self._last < self.interval:
            return
        self._last = now
        failed = f", {event.failed} failed" if event.failed else ""
        print(
            f"extracting: {event.done}/{event.total} clips{failed}, {event.clips_per_second:.2f} clips/s",
            file=self.stream or sys.stderr,
            flush=True,
        )


def as_callback(progress: bool | ProgressCallback | None) -> ProgressCallback | None:
    if progress is True:
        return TextProgress()
    if progress is False or progress is None:
        return None
    if not callable(progress):
        raise TypeError(f"progress must be a bool or a callable taking ExtractProgress, got {progress!r}")
    return progress
