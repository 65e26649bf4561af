"""Saying so when a run that waits on others (a Ray cluster) has finished no clip for a while.

One job: `StallWatch`, a watchdog thread beside a driver's loop: with no result for `minutes` it
reports how long and what the caller says about the wait (e.g. the cluster's free resources),
then again after each such period. The run goes on; the report only makes a wait visible.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable


class StallWatch:
    """Says so when no clip has finished for `minutes` (and again after each such period): the
    run goes on, but a wait for resources (or a stuck actor) is not silent. Use as a context
    manager around the driver's loop and call `tick()` for each result."""

    def __init__(self, minutes: float, notify: Callable[[str], None], status: Callable[[], str]):
        self.seconds = minutes * 60
        self.notify, self.status = notify, status
        self.last = time.monotonic()
        self.done = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="calm-stall-watch", daemon=True)

    def tick(self, n: int = 1) -> None:
        self.done += n
        self.last = time.monotonic()

    def _watch(self) -> None:
        said = self.last
        while not self._stop.wait(min(self.seconds / 4, 5.0)):
            now = time.monotonic()
            if now - max(self.last, said) >= self.seconds:
                said = now
                minutes = (now - self.last) / 60
                self.notify(f"no clip finished in {minutes:.1f} min ({self.done} done); {self.status()}")

    def __enter__(self) -> StallWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
