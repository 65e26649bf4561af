"""What `calm.AudioClassifier` accepts as audio, turned into model inputs with per-clip errors.

An item of X is one of:

- a path (`str` or `os.PathLike`): decoded by the extractor (`Extractor.load_input`) and, when the
  classifier has a `cache`, looked up in / added to the feature store by path and content hash;
- a `(waveform, sample_rate)` tuple: a 1-D float array (or 2-D with a channel axis, mixed down);
- a bare 1-D array, with `sample_rate=` given to the call (a 2-D array X with `sample_rate=` is
  one clip per row);
- a Hugging Face audio dict: `{"array", "sampling_rate"}` (decoded; `"path"` only names it) or
  `{"path"}` alone (a file, as above).

Waveforms are checked like files (empty, NaN, silent), resampled to the model's rate (soxr) and cut
to its window (`max_seconds`) or split into windows when the extractor averages windows. They are
never cached: the store keys features by file path and content hash, so arrays are extracted on
every call. Errors name the clip: its path, else `X[i]`.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from calm.audio import SILENCE_PEAK, AudioError, resample, split_windows


class AudioInput(NamedTuple):
    """One clip: its name (for errors and reports), and a path or a waveform with its rate."""

    name: str
    path: Path | None = None
    wave: np.ndarray | None = None
    rate: int | None = None


def _is_path(item: Any) -> bool:
    return isinstance(item, str | os.PathLike)


def as_input(item: Any, index: int, sample_rate: int | None = None) -> AudioInput:
    """One item of X as an `AudioInput`; a ValueError names `X[index]` when it is not audio."""
    name = f"X[{index}]"
    if _is_path(item):
        return AudioInput(str(item), path=Path(item))
    if isinstance(item, dict):
        if item.get("array") is not None:
            rate = item.get("sampling_rate")
            if rate is None:
                raise ValueError(f"{name}: an audio dict with 'array' needs 'sampling_rate'")
            return AudioInput(str(item.get("path") or name), wave=np.asarray(item["array"]), rate=int(rate))
        if item.get("path"):
            return AudioInput(str(item["path"]), path=Path(item["path"]))
        raise ValueError(f"{name}: an audio dict needs 'array' and 'sampling_rate', or 'path'")
    if isinstance(item, tuple) and len(item) == 2 and isinstance(item[1], int | float | np.number):
        return AudioInput(name, wave=np.asarray(item[0]), rate=int(item[1]))
    if isinstance(item, np.ndarray | list):
        if sample_rate is None:
            raise ValueError(f"{name}: a bare waveform needs sample_rate= (or pass (array, sample_rate))")
        return AudioInput(name, wave=np.asarray(item), rate=int(sample_rate))
    raise ValueError(
        f"{name}: {type(item).__name__} is not audio (use a path, (array, sample_rate) or an audio dict)"
    )


def as_inputs(X: Any, sample_rate: int | None = None) -> list[AudioInput]:
    """Every clip of X (a sequence of items, or a 2-D array of waveforms with `sample_rate`)."""
    if _is_path(X) or isinstance(X, dict):
        raise ValueError("X must be a sequence of clips (wrap a single clip in a list)")
    if isinstance(X, np.ndarray) and X.ndim == 1 and X.dtype.kind == "f":
        raise ValueError("X is one waveform: pass a list of clips, e.g. [(wave, sample_rate)]")
    items: Sequence[Any] = list(X)
    return [as_input(item, i, sample_rate) for i, item in enumerate(items)]


def _mono(wave: np.ndarray, name: str) -> np.ndarray:
    x = np.asarray(wave, dtype=np.float32)
    if x.ndim == 2:  # (channels, n) or (n, channels): average the shorter axis
        x = x.mean(axis=0 if x.shape[0] <= x.shape[1] else 1)
    if x.ndim != 1:
        raise AudioError(name, f"waveform of shape {np.shape(wave)}: expected 1-D (or 2-D with channels)")
    return x


def prepare_wave(clip: AudioInput, sample_rate: int, max_seconds: float | None, windows: bool) -> np.ndarray:
    """A waveform clip as the model's input: mono float32 at `sample_rate`, cut to `max_seconds`
    (or (windows, n) when `windows`); AudioError naming the clip for unusable audio."""
    assert clip.wave is not None and clip.rate is not None
    if clip.rate <= 0:
        raise AudioError(clip.name, f"sample rate must be positive, got {clip.rate}")
    x = _mono(clip.wave, clip.name)
    if x.size == 0:
        raise AudioError(clip.name, "empty (no audio samples)")
    if not np.isfinite(x).all():
        raise AudioError(clip.name, "contains NaN or infinite samples")
    if float(np.abs(x).max()) <= SILENCE_PEAK:
        raise AudioError(clip.name, "silent (peak amplitude below -100 dBFS)")
    y = resample(x, clip.rate, sample_rate)
    if max_seconds is None:
        return y[None, :] if windows else y
    n = int(round(max_seconds * sample_rate))
    return split_windows(y, n) if windows else y[:n]


def error_reason(exc: BaseException) -> str:
    """The reason of a per-clip failure without the clip's name (the caller adds it)."""
    reason = getattr(exc, "reason", None)  # AudioError
    if isinstance(reason, str):
        return reason
    if isinstance(exc, FileNotFoundError):
        return "file not found"
    return f"{type(exc).__name__}: {exc}"
