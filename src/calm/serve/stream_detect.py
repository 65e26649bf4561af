"""Incremental detection for the WebSocket `/stream`: samples in, closed events out, as they arrive.

`StreamDetector` cuts the same windows as `calm.detection.windows_of` (window i starts at
`round(i * hop * rate)`, plus one last window ending at the end of the stream), takes each window's
class probabilities from the caller (the service runs them through its model thread), and reports
an event as soon as it is final: the median filter of a window needs `median // 2` windows after
it, and an event is closed once a following window has another decision. The events, their times
and scores are those `calm.detection.detect` gives on the same samples (the same `smooth`,
`decisions` and `EventMerger`), only sooner, in time linear in the number of windows.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from calm.detection import Event, EventMerger, decisions, smooth


class StreamDetector:
    """Windows of a growing signal and the events that are final so far.

    Parameters
    ----------
    classes : sequence
        The classifier's classes, in the order of the probability rows.
    rate : int
        Samples per second of the fed signal (the model's rate).
    window, hop : float
        Window length and seconds between window starts (checked by the caller).
    thresholds : ndarray of shape (n_classes,)
        Per-class thresholds (`calm.detection.class_thresholds`).
    median : int
        Median filter length in windows (odd).
    background : sequence
        Labels that are never events.
    """

    def __init__(
        self,
        classes: Sequence[Any],
        rate: int,
        window: float,
        hop: float,
        thresholds: np.ndarray,
        median: int,
        background: Sequence[Any] = (),
    ):
        self.classes, self.rate, self.window, self.hop = list(classes), int(rate), float(window), float(hop)
        self.thresholds, self.median, self.background = thresholds, int(median), tuple(background)
        self.n_window = round(window * rate)
        self.buffer = np.zeros(0, np.float32)
        self.buffer_start = 0  # sample index of buffer[0]
        self.pieces: list[np.ndarray] = []  # fed after the buffer, not yet joined to it
        self.waiting = 0  # samples in pieces
        self.next_index = 0  # index of the next window
        self.last_end = 0  # end sample of the last window cut
        self.starts: list[int] = []
        self.rows: list[np.ndarray] = []
        self.merger = EventMerger(self.classes, self.window)
        self.final = 0  # windows already decided and merged
        self.sent = 0  # events already reported
        self.ended = self.finished = False

    @property
    def samples(self) -> int:
        """Samples fed so far."""
        return self.buffer_start + len(self.buffer) + self.waiting

    def _join(self) -> None:
        if self.pieces:
            self.buffer = np.concatenate([self.buffer, *self.pieces])
            self.pieces, self.waiting = [], 0

    def feed(self, samples: np.ndarray) -> list[tuple[int, np.ndarray]]:
        """Append `samples`; the (start sample, window) pairs now complete, in order. Small pieces
        wait in a list until they complete a window (no copy of the buffer per piece)."""
        self.pieces.append(np.asarray(samples, np.float32))
        self.waiting += len(samples)
        if round(self.next_index * self.hop * self.rate) + self.n_window > self.samples:
            return []
        self._join()
        out = []
        while (start := round(self.next_index * self.hop * self.rate)) + self.n_window <= self.samples:
            a = start - self.buffer_start
            out.append((start, self.buffer[a : a + self.n_window].copy()))
            self.last_end, self.next_index = start + self.n_window, self.next_index + 1
        nxt = round(self.next_index * self.hop * self.rate) - self.buffer_start
        keep = max(0, min(nxt, len(self.buffer) - self.n_window))
        self.buffer, self.buffer_start = self.buffer[keep:], self.buffer_start + keep
        return out

    def end(self) -> list[tuple[int, np.ndarray]]:
        """The stream is over: the last window, ending at its end, when the hops stopped short."""
        self.ended = True
        self._join()
        if self.last_end and self.last_end < self.samples:
            return [(self.samples - self.n_window, self.buffer[len(self.buffer) - self.n_window :].copy())]
        return []

    def add(self, start: int, probabilities: Any) -> None:
        """Record a window's class probabilities (a str: the model failed on it)."""
        row = np.full(len(self.classes), np.nan) if isinstance(probabilities, str) else probabilities
        self.starts.append(start)
        self.rows.append(np.asarray(row, np.float64))

    @property
    def duration(self) -> float:
        """Seconds the windows cover (the recording's duration for `detect`)."""
        return self.starts[-1] / self.rate + self.window if self.starts else 0.0

    def closed(self) -> list[Event]:
        """Events that became final since the last call (all the rest once `end` was called).

        Only the windows that became final are smoothed (with `median // 2` windows of context on
        each side), decided and pushed to the `EventMerger`, so a stream costs time linear in its
        windows."""
        n, reach = len(self.rows), self.median // 2
        upto = n if self.ended else max(self.final, n - reach)
        out: list[Event | None] = []
        if upto > self.final:
            first = max(0, self.final - reach)
            rows = np.asarray(self.rows[first:n], np.float64).reshape(n - first, len(self.classes))
            smoothed = smooth(rows, self.median)[self.final - first : upto - first]
            failed = np.asarray(~np.isfinite(rows[self.final - first : upto - first]).all(axis=1), bool)
            picked = decisions(smoothed, self.thresholds, self.classes, self.background, failed)
            for k, (d, row) in enumerate(zip(picked, smoothed, strict=True), start=self.final):
                out.append(self.merger.push(self.starts[k] / self.rate, int(d), row))
            self.final = upto
        if self.ended and not self.finished and self.rows:
            out.append(self.merger.finish(self.duration))
            self.finished = True
        events = [e for e in out if e is not None]
        self.sent += len(events)
        return events

    def window_scores(self, first: int) -> list[dict[str, Any]]:
        """Raw class probabilities of the windows from index `first` on."""
        return [
            {
                "onset": start / self.rate,
                "probabilities": {
                    str(c): (float(p) if np.isfinite(p) else None)
                    for c, p in zip(self.classes, row, strict=True)
                },
            }
            for start, row in zip(self.starts[first:], self.rows[first:], strict=True)
        ]

    def summary(self) -> dict[str, Any]:
        """The closing message: duration, window count, failed windows (as `Detection.as_dict`)."""
        failed = int(sum(1 for r in self.rows if not np.isfinite(r).all()))
        return {
            "duration": self.duration,
            "samples": self.samples,
            "window": self.window,
            "hop": self.hop,
            "windows": len(self.rows),
            "failed_windows": failed,
            "events": self.sent,
        }
