"""Sound event detection on long recordings: sliding windows -> per-window class probabilities ->
smoothed scores -> events `(onset, offset, label, score)`.

`detect(predictor, source, window=1.0, hop=0.5, ...)` (and `calm.AudioClassifier.detect`, `calm
detect`) streams the recording from disk (`calm.audio_stream`: blocks of `BLOCK_SECONDS`, never the
whole file in memory), cuts windows of `window` seconds every `hop` seconds (plus one window ending
at the recording's end when the hops do not reach it), and runs them in batches through the one
inference path (`calm.inference.Predictor.forward`: features, then the classifier's probabilities).

- Smoothing: a running median over `median` consecutive windows, class by class (odd; 1: none).
- Decision: a window holds an event of its top class c when c's smoothed probability reaches the
  class's threshold (`threshold`, default `DEFAULT_THRESHOLD` = 0.5: the class must be at least as
  likely as all others together; `thresholds={label: t}` overrides it per class; a threshold of 1
  turns the class off, since calibrated probabilities can round to exactly 1) and c is not a
  `background` label (a class fitted on "nothing happening" clips, never reported). Otherwise the
  window is "no known event". A window the model fails on is no event either (`failed` counts them).
- Events: consecutive windows with the same decision merge into one. Each window stands for the
  stretch of time closest to its centre (boundaries halfway between neighbouring centres; the
  first starts at 0, the last ends at the recording's end), so the time resolution is `hop`, not
  `window`. An event's score is the mean smoothed probability of its label over its windows.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from calm.audio import AudioError
from calm.audio_inputs import MIN_SECONDS, as_input, check_rate, mono_wave
from calm.audio_stream import BLOCK_SECONDS, stream_audio, stream_waveform
from calm.errors import ParameterError
from calm.inference import Predictor

DEFAULT_WINDOW = 1.0
DEFAULT_HOP = 0.5
DEFAULT_THRESHOLD = 0.5
DEFAULT_MEDIAN = 3
__all__ = [
    "Detection",
    "DetectProgress",
    "Event",
    "EventMerger",
    "decisions",
    "detect",
    "events_of",
    "smooth",
]


class Event(NamedTuple):
    """One detected event: seconds from the start of the recording, its label and score."""

    onset: float
    offset: float
    label: Any
    score: float

    def as_dict(self) -> dict[str, Any]:
        return {"onset": self.onset, "offset": self.offset, "label": self.label, "score": self.score}


@dataclass(frozen=True)
class DetectProgress:
    """How far detection is: seconds of audio done and wall-clock seconds spent on `source`."""

    source: str
    audio_seconds: float
    wall_seconds: float

    @property
    def realtime_factor(self) -> float:
        """Seconds of audio done per wall-clock second (20: twenty times faster than real time)."""
        return self.audio_seconds / self.wall_seconds if self.wall_seconds > 0 else float("inf")


@dataclass
class Detection:
    """The result of `detect` on one recording: events and the per-window scores behind them.

    `starts` (n,) window onsets in seconds; `probabilities` (n, C) the classifier's (NaN rows for
    windows the model failed on); `smoothed` (n, C) after the median filter; `thresholds` (C,).
    """

    source: str
    duration: float
    window: float
    hop: float
    classes: list[Any]
    starts: np.ndarray
    probabilities: np.ndarray
    smoothed: np.ndarray
    thresholds: np.ndarray
    events: list[Event] = field(default_factory=list)
    background: tuple[Any, ...] = ()
    failed: int = 0
    wall_seconds: float = 0.0

    @property
    def realtime_factor(self) -> float:
        return self.duration / self.wall_seconds if self.wall_seconds > 0 else float("inf")

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready summary (the events, not the per-window scores)."""
        return {
            "source": self.source,
            "duration": self.duration,
            "window": self.window,
            "hop": self.hop,
            "windows": int(len(self.starts)),
            "failed_windows": self.failed,
            "thresholds": {str(c): float(t) for c, t in zip(self.classes, self.thresholds, strict=True)},
            "background": [str(b) for b in self.background],
            "events": [e.as_dict() for e in self.events],
            "realtime_factor": self.realtime_factor,
        }


def check_settings(
    predictor: Predictor,
    window: float,
    hop: float,
    median: int,
    batch_size: int,
    background: Sequence[Any] = (),
) -> None:
    """Raise `ParameterError` for settings `detect` refuses (also checked by `calm serve`'s /stream)."""
    if not MIN_SECONDS <= window:
        raise ParameterError(f"window must be at least {MIN_SECONDS:g} s, got {window:g}")
    limit = predictor.extractor.max_seconds
    if limit is not None and window > limit:
        raise ParameterError(f"window={window:g} s is longer than the model's {limit:g} s input")
    if not 0 < hop <= window:
        raise ParameterError(f"hop must be in (0, window={window:g}] s, got {hop:g}")
    if int(median) != median or median < 1 or median % 2 == 0:
        raise ParameterError(f"median must be an odd number of windows >= 1, got {median}")
    if batch_size < 1:
        raise ParameterError(f"batch_size must be at least 1, got {batch_size}")
    classes = list(predictor.classes)
    unknown = [b for b in background if str(b) not in {str(c) for c in classes}]
    if unknown:
        raise ParameterError(f"background label(s) {unknown} are not classes; classes: {classes}")


def class_thresholds(
    classes: Sequence[Any], threshold: float, thresholds: Mapping[Any, float] | None
) -> np.ndarray:
    """(C,) thresholds: `threshold` for every class, `thresholds[label]` where given."""
    names = {str(c): i for i, c in enumerate(classes)}
    out = np.full(len(classes), float(threshold))
    for label, value in (thresholds or {}).items():
        if str(label) not in names:
            raise ParameterError(f"threshold for unknown class {label!r}; classes: {list(names)}")
        out[names[str(label)]] = float(value)
    if not np.all((out >= 0) & (out <= 1)):
        raise ParameterError(f"thresholds must lie in [0, 1], got {out.tolist()}")
    return out


def windows_of(
    blocks: Iterator[np.ndarray], n_window: int, hop: float, rate: int
) -> Iterator[tuple[int, np.ndarray]]:
    """(start sample, window of `n_window` samples) every `hop` seconds over streamed blocks, and one
    last window ending at the end of the signal when the hops stop short of it. Keeps at most one
    block plus one window in memory. Yields nothing for a signal shorter than one window."""
    buf = np.zeros(0, np.float32)
    buf_start = i = 0
    last_end = 0
    for block in blocks:
        buf = np.concatenate([buf, block])
        while (start := round(i * hop * rate)) + n_window <= buf_start + len(buf):
            yield start, buf[start - buf_start : start + n_window - buf_start]
            last_end, i = start + n_window, i + 1
        keep = max(0, min(round(i * hop * rate) - buf_start, len(buf) - n_window))
        buf, buf_start = buf[keep:], buf_start + keep
    end = buf_start + len(buf)
    if last_end and last_end < end:
        yield end - n_window, buf[len(buf) - n_window :]


def smooth(probabilities: np.ndarray, median: int) -> np.ndarray:
    """Running median over `median` windows (odd), class by class; edges repeat the end windows."""
    if median <= 1 or len(probabilities) == 0:
        return probabilities.copy()
    from scipy.ndimage import median_filter

    return median_filter(np.nan_to_num(probabilities), size=(median, 1), mode="nearest")


def decisions(
    smoothed: np.ndarray,
    thresholds: np.ndarray,
    classes: Sequence[Any],
    background: Sequence[Any] = (),
    failed: np.ndarray | None = None,
) -> np.ndarray:
    """Each window's decision (n,): the index of the class it holds an event of, or -1 (no known
    event); see the module docstring."""
    top = np.argmax(smoothed, axis=1)
    best = smoothed[np.arange(len(top)), top]
    skip = {i for i, c in enumerate(classes) if str(c) in {str(b) for b in background}}
    thr = thresholds[top]
    keep = (best >= thr) & (thr < 1.0) & ~np.isin(top, list(skip))
    if failed is not None:
        keep &= ~failed
    return np.where(keep, top, -1)


class EventMerger:
    """Merges consecutive windows with the same decision into events, one window at a time (the
    batch `events_of` and the live `/stream` share it). A window stands for the time between the
    midpoints to its neighbours' centres; the first starts at 0, the last ends at `finish`'s end."""

    def __init__(self, classes: Sequence[Any], window: float):
        self.classes, self.window = classes, window
        self.centre: float | None = None  # centre of the last window pushed
        self.decision, self.onset = -1, 0.0
        self.scores: list[float] = []

    def _close(self, offset: float) -> Event | None:
        if self.decision < 0:
            return None
        score = float(np.mean(np.asarray(self.scores)))
        return Event(self.onset, offset, self.classes[self.decision], score)

    def push(self, start: float, decision: int, smoothed: np.ndarray) -> Event | None:
        """Add the next window (onset seconds, decision, smoothed row); the event it closes, if any."""
        centre = start + self.window / 2
        bound = 0.0 if self.centre is None else (self.centre + centre) / 2
        closed = None
        if self.centre is None or decision != self.decision:
            closed = None if self.centre is None else self._close(bound)
            self.decision, self.onset, self.scores = int(decision), bound, []
        if decision >= 0:
            self.scores.append(float(smoothed[decision]))
        self.centre = centre
        return closed

    def finish(self, duration: float) -> Event | None:
        """The event still open at the end of the recording (`duration` seconds), if any."""
        return None if self.centre is None else self._close(duration)


def events_of(
    starts: np.ndarray,
    smoothed: np.ndarray,
    thresholds: np.ndarray,
    classes: Sequence[Any],
    *,
    window: float,
    duration: float,
    background: Sequence[Any] = (),
    failed: np.ndarray | None = None,
) -> list[Event]:
    """Events from smoothed scores (n, C): see the module docstring (decision, merging, times)."""
    if len(starts) == 0:
        return []
    merger = EventMerger(classes, window)
    picked = decisions(smoothed, thresholds, classes, background, failed)
    events = [merger.push(float(t), int(d), row) for t, d, row in zip(starts, picked, smoothed, strict=True)]
    events.append(merger.finish(duration))
    return [e for e in events if e is not None]


def _blocks(predictor: Predictor, source: Any, sample_rate: Any) -> tuple[str, Iterator[np.ndarray]]:
    """(name, blocks at the model's rate) of a path, `(waveform, rate)`, audio dict or bare waveform."""
    rate_out = int(predictor.extractor.sample_rate)
    item = as_input(source, str(source) if isinstance(source, str | Path) else "waveform", sample_rate)
    if item.path is not None:
        return item.name, stream_audio(item.path, rate_out, block_seconds=BLOCK_SECONDS)
    rate = check_rate(item.rate, item.name)
    wave = mono_wave(item.wave, item.name)
    return item.name, stream_waveform(wave, rate, rate_out, name=item.name)


def window_scores(
    predictor: Predictor,
    name: str,
    blocks: Iterator[np.ndarray],
    *,
    window: float,
    hop: float,
    batch_size: int,
    progress: Callable[[DetectProgress], None] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """(window starts in seconds (n,), class probabilities (n, C), NaN rows for failed windows) of
    streamed blocks, windows run through `predictor.forward` `batch_size` at a time."""
    rate = int(predictor.extractor.sample_rate)
    n_window = round(window * rate)
    t0 = time.perf_counter()
    starts: list[int] = []
    rows: list[np.ndarray] = []
    batch: list[tuple[int, np.ndarray]] = []

    def run(batch: list[tuple[int, np.ndarray]]) -> None:
        for (start, _), p in zip(batch, predictor.forward([w for _, w in batch]), strict=True):
            starts.append(start)
            rows.append(np.full(len(predictor.classes), np.nan) if isinstance(p, str) else p)
        if progress is not None and batch:
            progress(DetectProgress(name, (batch[-1][0] + n_window) / rate, time.perf_counter() - t0))

    for item in windows_of(blocks, n_window, hop, rate):
        batch.append(item)
        if len(batch) == batch_size:
            run(batch)
            batch = []
    run(batch)
    if not starts:
        raise AudioError(name, f"too short: shorter than one window ({window:g} s)")
    return np.asarray(starts, dtype=np.float64) / rate, np.asarray(rows, dtype=np.float64)


def detect(
    predictor: Predictor,
    source: Any,
    *,
    window: float = DEFAULT_WINDOW,
    hop: float = DEFAULT_HOP,
    threshold: float = DEFAULT_THRESHOLD,
    thresholds: Mapping[Any, float] | None = None,
    median: int = DEFAULT_MEDIAN,
    background: Sequence[Any] = (),
    batch_size: int = 16,
    sample_rate: Any = None,
    progress: Callable[[DetectProgress], None] | None = None,
) -> Detection:
    """Events of the classifier's classes in one recording (see the module docstring).

    `source`: a path (streamed from disk), `(waveform, rate)`, an audio dict, or a bare waveform
    with `sample_rate=`. `progress` is called after every batch with a `DetectProgress`. Raises
    `AudioError` (or `ClipError`) naming the recording when it cannot be read or is shorter than
    one window, `ParameterError` for bad settings.
    """
    check_settings(predictor, window, hop, median, batch_size, background)
    classes = list(predictor.classes)
    thr = class_thresholds(classes, threshold, thresholds)
    t0 = time.perf_counter()
    name, blocks = _blocks(predictor, source, sample_rate)
    starts, proba = window_scores(
        predictor, name, blocks, window=window, hop=hop, batch_size=batch_size, progress=progress
    )
    failed = ~np.isfinite(proba).all(axis=1)
    smoothed = smooth(proba, int(median))
    duration = float(starts[-1] + window)
    events = events_of(
        starts, smoothed, thr, classes, window=window, duration=duration, background=background, failed=failed
    )
    return Detection(
        name,
        duration,
        float(window),
        float(hop),
        classes,
        starts,
        proba,
        smoothed,
        thr,
        events,
        tuple(background),
        int(failed.sum()),
        time.perf_counter() - t0,
    )
