"""Dynamic batching: clips from concurrent requests grouped into one model batch, one worker thread.

`Batcher.submit(waveform)` returns a `concurrent.futures.Future` resolved by the worker thread with
`(output, batch_size)`, where `output` is what `forward` gave for that clip. The worker takes the
first waiting clip, then waits at most `max_wait_s` for more (up to `max_batch`), and calls
`forward` once on the group. The model therefore only ever runs in this one thread, and requests
never race on it. A future cancelled before its batch starts (client gone) is skipped.

`Replicas` is such a `forward` over several copies of the model: a batch is cut into one part per
replica and the parts run at once, each replica in one thread. On a CPU, where a clip runs alone
through the model (batch-invariant features) and a small model's matrix products keep only one
core busy, this is what lets a batch use every core; on a GPU one replica batches the clips.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

log = logging.getLogger("calm.serve")

#: `calm serve --replicas auto` keeps the weights of all copies of the model within this budget
REPLICA_BUDGET_BYTES = 2 * 2**30


def auto_replicas(weight_bytes: int | None, device: str, cores: int) -> int:
    """Copies of the model for `--replicas auto`: on a CPU one per core (`cores`: torch's intra-op
    threads) as long as all copies' weights fit in REPLICA_BUDGET_BYTES; one on other devices (a
    GPU batches the clips itself), or when the model's size is unknown. On a 2-core CPU two copies
    of whisper-tiny.en doubled concurrent throughput and left one-at-a-time latency unchanged
    (docs/serve.md)."""
    if device.split(":")[0] != "cpu" or not weight_bytes or weight_bytes <= 0:
        return 1
    return max(1, min(int(cores), REPLICA_BUDGET_BYTES // int(weight_bytes)))


class Batcher:
    """One worker thread running `forward` on batches of up to `max_batch` waveforms."""

    def __init__(
        self,
        forward: Callable[[Sequence[Any]], list[Any]],
        *,
        max_batch: int = 16,
        max_wait_s: float = 0.01,
    ):
        if max_batch < 1 or max_wait_s < 0:
            raise ValueError("max_batch must be >= 1 and max_wait_s >= 0")
        self.forward = forward
        self.max_batch, self.max_wait_s = int(max_batch), float(max_wait_s)
        self._queue: deque[tuple[Any, Future]] = deque()
        self._cv = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self.seconds_per_clip = 0.0  # moving average of model time per clip (for Retry-After)
        self.batches = 0
        self.clips = 0

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="calm-model", daemon=True)
        self._thread.start()

    def stop(self, timeout: float | None = None) -> None:
        """Finish every clip already submitted, then end the worker thread."""
        with self._cv:
            self._stopping = True
            self._cv.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)

    def submit(self, waveform: Any) -> Future:
        future: Future = Future()
        with self._cv:
            if self._stopping:
                raise RuntimeError("the batcher is stopped")
            self._queue.append((waveform, future))
            self._cv.notify()
        return future

    @property
    def waiting(self) -> int:
        return len(self._queue)

    def _next_batch(self) -> list[tuple[Any, Future]] | None:
        with self._cv:
            while not self._queue:
                if self._stopping:
                    return None
                self._cv.wait()
            batch = [self._queue.popleft()]
            deadline = time.monotonic() + self.max_wait_s
            while len(batch) < self.max_batch:
                if self._queue:
                    batch.append(self._queue.popleft())
                    continue
                left = deadline - time.monotonic()
                if left <= 0 or self._stopping:
                    break
                self._cv.wait(left)
        return batch

    def _run(self) -> None:
        while (batch := self._next_batch()) is not None:
            live = [(w, f) for w, f in batch if f.set_running_or_notify_cancel()]
            if not live:
                continue
            start = time.perf_counter()
            try:
                outputs = self.forward([w for w, _ in live])
            except BaseException as exc:  # forward isolates clip errors; this is a bug: fail the batch only
                log.exception("model batch of %d clips failed", len(live))
                for _, f in live:
                    f.set_exception(exc)
                continue
            per_clip = (time.perf_counter() - start) / len(live)
            self.seconds_per_clip = (
                per_clip if not self.batches else 0.8 * self.seconds_per_clip + 0.2 * per_clip
            )
            self.batches += 1
            self.clips += len(live)
            for (_, f), out in zip(live, outputs, strict=True):
                f.set_result((out, len(live)))


class Replicas:
    """`forward` over `replicas` (callables of the same model, e.g. `Predictor.forward` of
    `Predictor.replicate()` copies): a batch of n clips is cut into min(n, R) contiguous parts of
    near-equal size, run in parallel threads, and the outputs returned in the batch's order."""

    def __init__(self, replicas: Sequence[Callable[[Sequence[Any]], list[Any]]]):
        if not replicas:
            raise ValueError("Replicas needs at least one forward")
        self.replicas = list(replicas)
        self._pool = (
            ThreadPoolExecutor(len(self.replicas), thread_name_prefix="calm-replica")
            if len(self.replicas) > 1
            else None
        )

    def __len__(self) -> int:
        return len(self.replicas)

    def __call__(self, batch: Sequence[Any]) -> list[Any]:
        parts = min(len(batch), len(self.replicas))
        if parts <= 1 or self._pool is None:
            return self.replicas[0](batch)
        bounds = [len(batch) * i // parts for i in range(parts + 1)]
        futures = [
            self._pool.submit(forward, batch[a:b])
            for forward, a, b in zip(self.replicas, bounds[:-1], bounds[1:], strict=False)
        ]
        return [out for future in futures for out in future.result()]

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
