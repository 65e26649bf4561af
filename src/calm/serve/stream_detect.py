"""Incremental detection for the WebSocket `/stream`: samples in, closed events out, as they arrive.

`StreamDetector` cuts the same windows as `calm.detection.windows_of` (window i starts at
`round(i * hop * rate)`, plus one last window ending at the end of the stream), takes each window's
class probabilities from the caller (the service runs them through its model thread), and reports
an event as soon as it is final: the median filter of a window needs `median // 2` windows after
it, and an event is closed once a following window has another decision. The events, their times
and scores are those `calm.detection.detect` gives on the same samples (the same `smooth` and
`events_of`), only sooner.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from calm.detection import Event, events_of, smooth


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
        self.next_index = 0  # index of the next window
        self.last_end = 0  # end sample of the last window cut
        self.starts: list[int] = []
        self.rows: list[np.ndarray] = []
        self.sent = 0  # events already reported
        self.ended = False

    @property
    def samples(self) -> int:
        """Samples fed so far."""
        return self.buffer_start + len(self.buffer)

    def feed(self, samples: np.ndarray) -> list[tuple[int, np.ndarray]]:
        """Append `samples`; the (start sample, window) pairs now complete, in order."""
        self.buffer = np.concatenate([self.buffer, np.asarray(samples, np.float32)])
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
        if self.last_end and self.last_end < self.samples:
            return [(self.samples - self.n_window, self.buffer[len(self.buffer) - self.n_window :].copy())]
        return []

    def add(self, start: int, probabilities: Any) -> None:
        """Record a window's class probabilities (a str: the model failed on it)."""
        row = np.full(len(self.classes), np.nan) if isinstance(probabilities, str) else probabilities
        self.starts.append(start)
        self.rows.append(np.asarray(row, np.float64))

    def _scores(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        starts = np.asarray(self.starts, np.float64) / self.rate
        proba = np.asarray(self.rows, np.float64).reshape(len(self.rows), len(self.classes))
        failed = np.asarray(~np.isfinite(proba).all(axis=1), dtype=bool)
        return starts, proba, smooth(proba, self.median), failed

    @property
    def duration(self) -> float:
        """Seconds the windows cover (the recording's duration for `detect`)."""
        return self.starts[-1] / self.rate + self.window if self.starts else 0.0

    def closed(self) -> list[Event]:
        """Events that became final since the last call (all the rest once `end` was called)."""
        if not self.rows:
            return []
        starts, _, smoothed, failed = self._scores()
        final = len(starts) if self.ended else len(starts) - self.median // 2
        if final <= 0:
            return []
        # the run holding the last final window may go on: duration=inf marks it, and it waits
        duration = self.duration if self.ended else float("inf")
        events = events_of(
            starts[:final],
            smoothed[:final],
            self.thresholds,
            self.classes,
            window=self.window,
            duration=duration,
            background=self.background,
            failed=failed[:final],
        )
        if not self.ended and events and events[-1].offset == float("inf"):
            events.pop()
        new = events[self.sent :]
        self.sent += len(new)
        return new

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
