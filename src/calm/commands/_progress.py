"""Progress bars of the CLI: the one rich bar builder, and its adapter for extraction events.

One job: draw the library's progress reports on the terminal (stderr). The library itself only
sends events (`calm.store.ExtractProgress`, or per-step callbacks); rich is used here and
nowhere below the commands.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from rich.progress import Progress, TaskID

    from calm.store import ExtractProgress


def progress_bar(enabled: bool = True, *, transient: bool = True) -> Progress:
    """A rich progress bar on stderr: description, bar, done/total, rate, elapsed time and ETA.

    The rate column shows a task's `rate` field with its `unit` (e.g. `unit="clips"`), or rich's
    own estimate when only `unit` is given, and nothing for tasks without a unit. Use it as a
    context manager; `enabled=False` draws nothing.
    """
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        ProgressColumn,
        Task,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )
    from rich.text import Text

    class Rate(ProgressColumn):
        def render(self, task: Task) -> Text:
            unit = task.fields.get("unit")
            if not unit:
                return Text("")
            rate = task.fields.get("rate", task.speed)
            return Text(f"{rate:.2f} {unit}/s" if rate else f"- {unit}/s")

    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        Rate(),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
        console=Console(stderr=True),
        transient=transient,
        disable=not enabled,
    )


class ExtractionBar:
    """A `calm.store` progress callback that draws `ExtractProgress` events as one task of `bar`."""

    def __init__(self, bar: Progress, description: str = "extracting"):
        self.bar = bar
        self.description = description
        self.task: TaskID | None = None

    def __call__(self, event: ExtractProgress) -> None:
        if self.task is None:
            self.task = self.bar.add_task(self.description, total=event.total, unit="clips")
        failed = f" ({event.failed} failed)" if event.failed else ""
        self.bar.update(
            self.task,
            completed=event.done,
            total=event.total,
            description=f"{self.description}{failed}",
            rate=event.clips_per_second,
        )


@contextmanager
def extraction_progress(enabled: bool = True, **bar_options: Any) -> Iterator[ExtractionBar | None]:
    """`with extraction_progress(enabled) as callback:` pass `progress=callback` to
    `calm.store.extract_to_store`; the callback is None (no bar) when not enabled."""
    if not enabled:
        yield None
        return
    bar_options.setdefault("transient", False)
    with progress_bar(**bar_options) as bar:
        yield ExtractionBar(bar)
