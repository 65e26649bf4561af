"""Per-request deadlines on the event loop: the body deadline, the request deadline and the drain.

`Deadlines.watch(seconds, code)` is a context manager for the running request: when the deadline
passes, the request's task is cancelled and the block raises `ApiError(code)` instead (the request
answers, e.g. 408 `body_timeout`), so no `CancelledError` escapes. `Deadline.set(seconds, code)`
moves it (the body deadline, then the request deadline). `Deadlines.drain(seconds)` pulls every
live deadline in to at most `seconds` from now with code `draining`, so that requests still in
flight answer 503 before uvicorn's graceful-shutdown timeout would cancel them.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from contextlib import contextmanager

from calm.serve.api_errors import CODES, ApiError


class Deadline:
    """One request's deadline (event loop only)."""

    def __init__(self, task: asyncio.Task, loop: asyncio.AbstractEventLoop, owner: Deadlines):
        self.task, self.loop, self.owner = task, loop, owner
        self.when = float("inf")
        self.code: str | None = None
        self.expired: str | None = None
        self._handle: asyncio.TimerHandle | None = None

    def set(self, seconds: float | None, code: str) -> None:
        """Expire `seconds` from now with `code` (None: no deadline)."""
        self.at(float("inf") if seconds is None else self.loop.time() + seconds, code)

    def at(self, when: float, code: str) -> None:
        """Expire at loop time `when` with `code`; never later than the drain (code `draining`)."""
        drain_at = self.owner.drain_at
        if drain_at is not None and drain_at < when:
            when, code = drain_at, "draining"
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
        self.when, self.code = when, code
        if when != float("inf"):
            self._handle = self.loop.call_at(when, self._expire)

    def _expire(self) -> None:
        if self.expired is None and not self.task.done():
            self.expired = self.code
            self.task.cancel()

    def cancel(self) -> None:
        if self._handle is not None:
            self._handle.cancel()


class Deadlines:
    """The live deadlines of the requests in flight."""

    def __init__(self) -> None:
        self.live: set[Deadline] = set()
        self.drain_at: float | None = None

    @contextmanager
    def watch(self, seconds: float | None, code: str) -> Iterator[Deadline]:
        task = asyncio.current_task()
        if task is None:
            raise RuntimeError("Deadlines.watch needs a running task")
        deadline = Deadline(task, asyncio.get_running_loop(), self)
        deadline.set(seconds, code)
        self.live.add(deadline)
        try:
            yield deadline
        except asyncio.CancelledError:
            if deadline.expired is None:  # cancelled by someone else: not ours to answer
                raise
            uncancel = getattr(task, "uncancel", None)  # Python 3.11+: the cancel is handled here
            if uncancel is not None:
                uncancel()
            headers = {"Retry-After": "5"} if CODES[deadline.expired][0] == 503 else None
            raise ApiError(deadline.expired, _message(deadline.expired), headers=headers) from None
        finally:
            deadline.cancel()
            self.live.discard(deadline)

    def drain(self, seconds: float) -> None:
        """Answer every request still in flight `seconds` from now at the latest (event loop only)."""
        loop = asyncio.get_running_loop()
        self.drain_at = loop.time() + max(0.0, seconds)
        for deadline in list(self.live):
            deadline.at(deadline.when, deadline.code or "draining")


def _message(code: str) -> str:
    return {
        "body_timeout": "the request body did not arrive in time (--body-timeout)",
        "request_timeout": "the answer took longer than --request-timeout; retry later",
        "draining": "the server is shutting down: the request could not finish within --drain-timeout",
    }.get(code, CODES[code][1])
