"""Every accepted audio input as one checked clip: the one validation of raw audio behind
`calm predict`, `calm serve` and `calm.AudioClassifier` (`calm.clip_features.FeaturePipeline`).

An input is one of:

- a path (`str` or `os.PathLike`): decoded by the extractor (`Extractor.load_input`, `calm.audio`);
- the bytes of one audio file (an upload): written to a temporary file and decoded like a path;
- a `(waveform, sample_rate)` tuple: a 1-D float array (or 2-D with a channel axis, mixed down);
- a bare 1-D array, with a declared `sample_rate=` (a 2-D array X with `sample_rate=` is one clip
  per row);
- a Hugging Face audio dict: `{"array", "sampling_rate"}` (`"path"` only names it) or `{"path"}`.

A waveform's rate must be an integer number of Hz (not a bool) in `MIN_RATE..MAX_RATE`; it is cut
to the model's window (`max_seconds`) BEFORE it is resampled, so a long array costs no more than the
window; one taken whole (windows, or a model without a window) may last at most `MAX_SECONDS`.
Every decoded clip, file or waveform, must hold samples, all finite, and last at least
`MIN_SECONDS`. Any problem with one clip is a `ClipError(source, reason)`: the caller records it
for that clip and goes on with the others.
"""

from __future__ import annotations

import math
import os
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from numbers import Real
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from calm.audio import SILENCE_PEAK, resample, split_windows
from calm.errors import CalmError

#: clips shorter than this (seconds, after decoding) are refused: too little audio to label
MIN_SECONDS = 0.1
#: a waveform taken whole (no window to cut it to) may last at most this long (seconds)
MAX_SECONDS = 3600.0
#: the sample rates (Hz) a waveform may declare
MIN_RATE, MAX_RATE = 1_000, 384_000
# magic bytes -> file suffix, so that uploaded bytes take the same decoder as the file on disk
_MAGIC = ((b"RIFF", ".wav"), (b"fLaC", ".flac"), (b"OggS", ".ogg"), (b"FORM", ".aiff"))


class ClipError(CalmError, ValueError):
    """Clips that cannot be used: `source` and `reason` of the first, `failures` ("source: reason")
    of all of them (one for a single clip; `ClipError.of(errors)` gathers several)."""

    def __init__(self, source: str, reason: str, *, failures: Sequence[str] | None = None):
        self.source, self.reason = str(source), reason
        self.failures = list(failures) if failures else [f"{self.source}: {reason}"]
        head = (
            self.failures[0]
            if len(self.failures) == 1
            else f"{len(self.failures)} clips failed:\n  " + "\n  ".join(self.failures)
        )
        super().__init__(head)

    @classmethod
    def of(cls, errors: Sequence[ClipError]) -> ClipError:
        """One error naming every clip of `errors` (at least one)."""
        return cls(errors[0].source, errors[0].reason, failures=[f for e in errors for f in e.failures])


@dataclass(frozen=True)
class DecodedClip:
    """One decoded clip: `waveform` as the extractor takes it, `duration` in seconds."""

    source: str
    waveform: np.ndarray
    duration: float


class AudioInput(NamedTuple):
    """One input: its name (for errors and reports), and a path or a waveform with its declared rate."""

    name: str
    path: Path | None = None
    wave: Any = None
    rate: Any = None


def _is_path(item: Any) -> bool:
    return isinstance(item, str | os.PathLike)


def as_input(item: Any, name: str, sample_rate: Any = None) -> AudioInput:
    """One input as an `AudioInput` (rates are checked later, by `prepare_wave`); ClipError when it is
    not audio."""
    if _is_path(item):
        return AudioInput(str(item), path=Path(item))
    if isinstance(item, dict):
        if item.get("array") is not None:
            if item.get("sampling_rate") is None:
                raise ClipError(name, "an audio dict with 'array' needs 'sampling_rate'")
            return AudioInput(str(item.get("path") or name), wave=item["array"], rate=item["sampling_rate"])
        if item.get("path"):
            return AudioInput(str(item["path"]), path=Path(item["path"]))
        raise ClipError(name, "an audio dict needs 'array' and 'sampling_rate', or 'path'")
    if isinstance(item, tuple) and len(item) == 2:
        return AudioInput(name, wave=item[0], rate=item[1])
    if isinstance(item, np.ndarray | list):
        if sample_rate is None:
            raise ClipError(name, "a bare waveform needs sample_rate= (or pass (array, sample_rate))")
        return AudioInput(name, wave=item, rate=sample_rate)
    raise ClipError(
        name, f"{type(item).__name__} is not audio (use a path, (array, sample_rate) or an audio dict)"
    )


def input_name(item: Any, index: int) -> str:
    """How messages call input `index` of X: its path, an audio dict's path, else `X[index]`."""
    if _is_path(item):
        return str(item)
    if isinstance(item, dict) and item.get("path"):
        return str(item["path"])
    return f"X[{index}]"


def as_inputs(X: Any, sample_rate: Any = None) -> list[AudioInput | ClipError]:
    """Every clip of X (a sequence of inputs, or a 2-D array of waveforms, one per row): its
    `AudioInput`, or the `ClipError` of an item that is not audio. ValueError when X is not a list."""
    if _is_path(X) or isinstance(X, dict | bytes):
        raise ValueError("X must be a sequence of clips (wrap a single clip in a list)")
    if isinstance(X, np.ndarray) and X.ndim == 1 and X.dtype.kind == "f":
        raise ValueError("X is one waveform: pass a list of clips, e.g. [(wave, sample_rate)]")
    out: list[AudioInput | ClipError] = []
    for i, item in enumerate(X):
        try:
            out.append(as_input(item, input_name(item, i), sample_rate))
        except ClipError as exc:
            out.append(exc)
    return out


def check_rate(rate: Any, name: str) -> int:
    """`rate` as an int; ClipError unless it is an integer number of Hz in `MIN_RATE..MAX_RATE`."""
    number = isinstance(rate, Real | np.integer | np.floating) and not isinstance(rate, bool | np.bool_)
    if not number or not math.isfinite(float(rate)) or float(rate) != int(rate):
        shown = repr(rate.item() if isinstance(rate, np.generic) else rate)
        raise ClipError(name, f"sample rate {shown} is not an integer number of Hz")
    if not MIN_RATE <= int(rate) <= MAX_RATE:
        raise ClipError(name, f"sample rate {int(rate)} Hz is outside {MIN_RATE}..{MAX_RATE} Hz")
    return int(rate)


def mono_wave(wave: Any, name: str) -> np.ndarray:
    """`wave` as 1-D float32 (channels averaged); ClipError naming `name` when it is not a waveform."""
    try:
        x = np.asarray(wave, dtype=np.float32)
    except (TypeError, ValueError) as exc:
        raise ClipError(name, f"waveform is not numeric ({exc})") from None
    if x.ndim == 2:  # (channels, n) or (n, channels): average the shorter axis
        x = x.mean(axis=0 if x.shape[0] <= x.shape[1] else 1)
    if x.ndim != 1:
        raise ClipError(name, f"waveform of shape {x.shape}: expected 1-D (or 2-D with channels)")
    return x


def too_short(duration: float, min_seconds: float) -> str:
    """The one message of a clip below `min_seconds`."""
    return f"too short ({duration:.3f} s; at least {min_seconds:g} s needed)"


def prepare_wave(
    clip: AudioInput,
    sample_rate: int,
    max_seconds: float | None,
    windows: bool,
    min_seconds: float = MIN_SECONDS,
) -> np.ndarray:
    """A waveform input as the model's input: mono float32 at `sample_rate`, cut to `max_seconds`
    before resampling (or (windows, n) when `windows`); ClipError naming the clip when unusable."""
    rate = check_rate(clip.rate, clip.name)
    x = mono_wave(clip.wave, clip.name)
    if x.size == 0:
        raise ClipError(clip.name, "empty (no audio samples)")
    seconds = x.shape[0] / rate
    if seconds < min_seconds:
        raise ClipError(clip.name, too_short(seconds, min_seconds))
    if max_seconds is not None and not windows:
        x = x[: math.ceil(max_seconds * rate) + 1]  # the window only: nothing past it is resampled
    elif seconds > MAX_SECONDS:
        raise ClipError(clip.name, f"too long ({seconds:.0f} s; at most {MAX_SECONDS:g} s taken whole)")
    if not np.isfinite(x).all():
        raise ClipError(clip.name, "contains NaN or infinite samples")
    if float(np.abs(x).max()) <= SILENCE_PEAK:
        raise ClipError(clip.name, "silent (peak amplitude below -100 dBFS)")
    y = resample(x, rate, sample_rate)
    if max_seconds is None:
        return y[None, :] if windows else y
    n = int(round(max_seconds * sample_rate))
    return split_windows(y, n) if windows else y[:n]


def checked_clip(source: str, wave: Any, sample_rate: int, min_seconds: float = MIN_SECONDS) -> DecodedClip:
    """A decoded model input (n,) or (windows, n) as a `DecodedClip`, after the checks every clip passes:
    samples, all finite, at least `min_seconds` long."""
    x = np.asarray(wave, dtype=np.float32)
    if x.size == 0:
        raise ClipError(source, "empty (no audio samples)")
    if not np.isfinite(x).all():
        raise ClipError(source, "contains NaN or infinite samples")
    return DecodedClip(source, x, long_enough(source, x.shape[-1] / float(sample_rate), min_seconds))


def long_enough(source: str, duration: float, min_seconds: float = MIN_SECONDS) -> float:
    """`duration` (seconds), or ClipError when it is below `min_seconds` (`checked_clip`'s length
    check, also applied to a clip whose features a store gives back with its recorded duration)."""
    if duration < min_seconds:
        raise ClipError(source, too_short(duration, min_seconds))
    return duration


def error_reason(exc: BaseException) -> str:
    """The reason of a per-clip failure without the clip's name (the caller adds it)."""
    reason = getattr(exc, "reason", None)  # AudioError, ClipError
    if isinstance(reason, str):
        return reason
    if isinstance(exc, FileNotFoundError):
        return "file not found"
    return f"{type(exc).__name__}: {exc}"


def _suffix_for(data: bytes, name: str | None) -> str:
    for magic, suffix in _MAGIC:
        if data.startswith(magic):
            return suffix
    suffix = Path(name or "").suffix.lower()
    return suffix if suffix.isascii() and suffix[1:].isalnum() and len(suffix) <= 6 else ".bin"


@contextmanager
def bytes_file(data: bytes, name: str) -> Iterator[str]:
    """The bytes of one uploaded file as a temporary file (its suffix from the magic bytes or
    `name`), removed afterwards; ClipError for an empty body."""
    if not data:
        raise ClipError(name, "empty body (no audio data)")
    fd, tmp = tempfile.mkstemp(prefix="calm-upload-", suffix=_suffix_for(data, name))
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        yield tmp
    finally:
        os.unlink(tmp)
