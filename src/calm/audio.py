"""Decoding audio files into float32 mono waveforms at a model's sample rate.

`load_audio(path, sample_rate, *, max_seconds=None, long="truncate" | "windows")`:
- WAV / FLAC / OGG (and the other formats libsndfile reads) are decoded with soundfile; MP3, MP4,
  M4A, WebM and anything else with PyAV (ffmpeg). A file soundfile refuses is retried with PyAV.
- Channels are mixed down to mono by averaging; the rate is converted with soxr (high quality).
- Clips longer than `max_seconds` are truncated to their first `max_seconds` with a logged
  warning (`long="truncate"`), or cut into windows of exactly `max_seconds` (`long="windows"`,
  shape (windows, n); the last window is the clip's final `max_seconds`, so it overlaps the one
  before rather than being zero-padded; a clip that fits gives one window of its own length).
- Unreadable, empty, non-finite and silent-only files raise `AudioError` naming the file and the
  reason; callers (the feature store) record it and go on.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import numpy as np

from calm.errors import CalmError, ParameterError

log = logging.getLogger(__name__)

# Formats soundfile (libsndfile) decodes; everything else goes to PyAV.
SOUNDFILE_SUFFIXES = frozenset(
    {".wav", ".wave", ".flac", ".ogg", ".oga", ".opus", ".aif", ".aiff", ".au", ".snd"}
)
# Peak amplitude at or below which a clip counts as silent (-100 dBFS; 16-bit audio's step is 3e-5).
SILENCE_PEAK = 1e-5
LONG_MODES = ("truncate", "windows")
# Seconds past max_seconds cut without a warning (Ogg/MP3 frame padding).
TRUNCATE_TOLERANCE = 0.01


class AudioError(CalmError, ValueError):
    """An audio file that cannot be used: the message names the file and the reason."""

    def __init__(self, path: str | Path, reason: str):
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")


def _decode_soundfile(path: Path, max_seconds: float | None) -> tuple[np.ndarray, int, int]:
    """(samples (n, channels) float32, native rate, total frames in the file)."""
    import soundfile as sf

    with sf.SoundFile(str(path)) as f:
        rate, total = int(f.samplerate), int(f.frames)
        n = total if max_seconds is None else min(total, int(math.ceil(max_seconds * rate)) + 1)
        data = f.read(frames=n, dtype="float32", always_2d=True)
    return data, rate, total


def _decode_pyav(path: Path, max_frames_at: float | None) -> tuple[np.ndarray, int, int]:
    """Decode the first audio stream with PyAV; stops once `max_frames_at` seconds are decoded.

    Returns (samples (n, channels) float32, rate, total frames decoded or -1 when decoding stopped
    early, in which case the clip is known to be longer than what was returned).
    """
    import av

    chunks: list[np.ndarray] = []
    n = 0
    longer = False
    with av.open(str(path)) as container:
        streams = [s for s in container.streams if s.type == "audio"]
        if not streams:
            raise AudioError(path, "no audio stream")
        stream = streams[0]
        rate = int(stream.rate or stream.codec_context.sample_rate or 0)
        limit = None if max_frames_at is None or rate <= 0 else int(math.ceil(max_frames_at * rate))
        # planar float keeps every channel separate; mono mix-down is done here, not by ffmpeg
        resampler = None
        for frame in container.decode(stream):
            if resampler is None:
                rate = int(frame.sample_rate)
                limit = None if max_frames_at is None else int(math.ceil(max_frames_at * rate))
                resampler = av.AudioResampler(format="fltp", layout=frame.layout.name, rate=rate)
            for out in resampler.resample(frame):
                arr = out.to_ndarray().astype(np.float32, copy=False)  # (channels, samples)
                chunks.append(arr)
                n += arr.shape[1]
            if limit is not None and n > limit:
                longer = True
                break
        if resampler is not None and not longer:
            for out in resampler.resample(None):
                arr = out.to_ndarray().astype(np.float32, copy=False)
                chunks.append(arr)
                n += arr.shape[1]
    if not chunks:
        return np.zeros((0, 1), np.float32), max(rate, 1), 0
    data = np.concatenate(chunks, axis=1).T
    return data, rate, (-1 if longer else data.shape[0])


def decode(path: str | Path, *, max_seconds: float | None = None) -> tuple[np.ndarray, int, float]:
    """Decode a file to float32 mono at its own rate.

    Returns (samples, rate, duration in seconds of the whole file, or inf when decoding stopped
    early past `max_seconds`). Decodes only the first `max_seconds` (+ a little) when given.
    """
    path = Path(path)
    if not path.is_file():
        raise AudioError(path, "file not found" if not path.exists() else "not a regular file")
    errors = []
    data = None
    if path.suffix.lower() in SOUNDFILE_SUFFIXES:
        try:
            data, rate, total = _decode_soundfile(path, max_seconds)
        except AudioError:
            raise
        except Exception as exc:  # libsndfile refuses the file: let ffmpeg try
            errors.append(f"soundfile: {exc}")
            data = None
    if data is None:
        try:
            extra = None if max_seconds is None else max_seconds + 0.1
            data, rate, total = _decode_pyav(path, extra)
        except AudioError:
            raise
        except Exception as exc:
            errors.append(f"PyAV: {exc}")
            raise AudioError(path, "unreadable (" + "; ".join(errors) + ")") from exc
    if rate <= 0:
        raise AudioError(path, f"invalid sample rate {rate}")
    mono = data.mean(axis=1, dtype=np.float32) if data.shape[1] > 1 else data[:, 0]
    duration = math.inf if total < 0 else total / rate
    return np.ascontiguousarray(mono, dtype=np.float32), rate, duration


def resample(x: np.ndarray, rate_in: int, rate_out: int) -> np.ndarray:
    """soxr high-quality resampling of a 1-D float32 signal (identity when the rates agree)."""
    if rate_in == rate_out or x.size == 0:
        return x.astype(np.float32, copy=False)
    import soxr

    return soxr.resample(x, rate_in, rate_out, quality="HQ").astype(np.float32, copy=False)


def split_windows(x: np.ndarray, n: int) -> np.ndarray:
    """(windows, n) views of length-n windows covering x; the last one ends at x's end.

    A signal of at most n samples gives a single window of its own length.
    """
    if x.shape[0] <= n:
        return x[None, :]
    count = -(-x.shape[0] // n)
    starts = np.minimum(np.arange(count) * n, x.shape[0] - n)
    return np.stack([x[s : s + n] for s in starts])


def load_audio(
    path: str | Path,
    sample_rate: int,
    *,
    max_seconds: float | None = None,
    long: str = "truncate",
) -> np.ndarray:
    """Float32 mono waveform of `path` at `sample_rate`: shape (n,), or (windows, n) for windows."""
    if long not in LONG_MODES:
        raise ParameterError(f"long must be one of {LONG_MODES}, got {long!r}")
    if sample_rate <= 0:
        raise ParameterError(f"sample_rate must be positive, got {sample_rate}")
    if max_seconds is not None and max_seconds <= 0:
        raise ParameterError(f"max_seconds must be positive, got {max_seconds}")
    path = Path(path)
    x, rate, duration = decode(path, max_seconds=max_seconds if long == "truncate" else None)
    if x.size == 0:
        raise AudioError(path, "empty (no audio samples)")
    if not np.isfinite(x).all():
        raise AudioError(path, "contains NaN or infinite samples")
    if float(np.abs(x).max()) <= SILENCE_PEAK:
        part = (
            f" in its first {max_seconds:g} s"
            if long == "truncate" and max_seconds and duration > max_seconds
            else ""
        )
        raise AudioError(path, f"silent{part} (peak amplitude below -100 dBFS)")
    y = resample(x, rate, sample_rate)
    if max_seconds is None:
        return y if long == "truncate" else y[None, :]
    n = int(round(max_seconds * sample_rate))
    if long == "windows":
        return split_windows(y, n)
    if duration > max_seconds + TRUNCATE_TOLERANCE:  # a few ms of codec padding are cut silently
        shown = "" if math.isinf(duration) else f" ({duration:.2f} s)"
        log.warning(
            "%s%s is longer than %g s: truncated to its first %g s", path, shown, max_seconds, max_seconds
        )
    return y[:n]
