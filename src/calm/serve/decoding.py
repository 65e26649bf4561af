"""Decoding uploads off the event loop, within the service's limits (docs/reliability.md).

Each upload is first probed (`calm.audio.probe`: the container is read from its bytes and must be
on the allow-list, so a playlist is refused before anything it names is opened: 415
`unsupported_audio_format`), then decoded by `Predictor.preprocess` under `calm.audio.DecodeLimits`
(`--decode-timeout` wall-clock seconds, `--max-audio-seconds` of audio) in a pool of daemon threads:
a decode still running when the server exits does not hold the process up.
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

from calm.audio import AudioError, DecodeLimits, UnsupportedAudioError, decode_limits, probe
from calm.inference import ClipError, Predictor
from calm.serve.api_errors import ApiError


class DaemonPool:
    """`workers` daemon threads running submitted calls; `busy_since` says how long each has run."""

    def __init__(self, workers: int, name: str = "calm-decode"):
        self._jobs: queue.SimpleQueue[tuple[Callable[[], Any], Future] | None] = queue.SimpleQueue()
        self._started: dict[int, float] = {}
        self._lock = threading.Lock()
        self._threads = [
            threading.Thread(target=self._work, name=f"{name}-{i}", daemon=True) for i in range(workers)
        ]
        for t in self._threads:
            t.start()

    def submit(self, fn: Callable[[], Any]) -> Future:
        future: Future = Future()
        self._jobs.put((fn, future))
        return future

    def busy_since(self) -> list[float]:
        """`time.monotonic()` at which each busy worker took its current job."""
        with self._lock:
            return list(self._started.values())

    @property
    def workers(self) -> int:
        return len(self._threads)

    def shutdown(self, wait: bool = True, timeout: float | None = None) -> None:
        """Stop taking jobs (queued ones run first); with `wait`, join the workers (at most `timeout`)."""
        for _ in self._threads:
            self._jobs.put(None)
        if wait:
            end = None if timeout is None else time.monotonic() + timeout
            for t in self._threads:
                t.join(None if end is None else max(0.0, end - time.monotonic()))

    def _work(self) -> None:
        me = threading.get_ident()
        while (job := self._jobs.get()) is not None:
            fn, future = job
            if not future.set_running_or_notify_cancel():
                continue
            with self._lock:
                self._started[me] = time.monotonic()
            try:
                future.set_result(fn())
            except BaseException as exc:  # handed to the awaiting request
                future.set_exception(exc)
            finally:
                with self._lock:
                    self._started.pop(me, None)


class Decoder:
    """Probe and decode uploads for `predictor` in a `DaemonPool`, under `limits`."""

    def __init__(self, predictor: Predictor, limits: DecodeLimits, workers: int):
        self.predictor, self.limits = predictor, limits
        self.pool = DaemonPool(workers)

    def _decode(self, data: bytes, name: str) -> Any:
        with decode_limits(self.limits):
            if data:
                probe(data, name=name)  # allow-list first: nothing is written or opened before it
            return self.predictor.preprocess(data, name=name)

    async def decode(self, data: bytes, name: str) -> Any:
        """The `Clip` of one upload; raises `ApiError` (415 / 422) naming `name` and the reason."""
        try:
            return await asyncio.wrap_future(self.pool.submit(lambda: self._decode(data, name)))
        except UnsupportedAudioError as exc:
            raise ApiError("unsupported_audio_format", f"{name}: {exc.reason}") from None
        except AudioError as exc:
            raise ApiError("invalid_audio", f"{name}: {exc.reason}") from None
        except ClipError as exc:
            code = "empty_body" if not data else "invalid_audio"
            raise ApiError(code, f"{name}: {exc.reason}") from None

    def stalled(self) -> bool:
        """Every worker busy on a decode older than the decode deadline (+1 s)."""
        if self.limits.timeout_s is None:
            return False
        since = self.pool.busy_since()
        old = time.monotonic() - self.limits.timeout_s - 1.0
        return len(since) >= self.pool.workers and all(t < old for t in since)
