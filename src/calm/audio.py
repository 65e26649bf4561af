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

Untrusted files are decoded safely (docs/reliability.md, "What a client can make `calm serve` do"):
the container is detected from the bytes (libsndfile's format, ffmpeg's probe), never the name, and
must be on an allow-list of audio containers and codecs (`SOUNDFILE_FORMATS`, `PYAV_CONTAINERS`,
`AUDIO_CODECS`); anything else, playlists (HLS / m3u, concat) included, raises
`UnsupportedAudioError` before the demuxer reads a header, so nothing a file names is opened.
PyAV reads the file through a Python file object with no ffmpeg protocol allowed. Each decode has a
wall-clock deadline and a cap on decoded seconds (`DecodeLimits`; `decode_limits(...)` sets them
for the current thread / task, e.g. tighter ones for `calm serve`).
"""

from __future__ import annotations

import io
import logging
import math
import time
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

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


#: libsndfile formats (`SoundFile.format`) decoded with soundfile
SOUNDFILE_FORMATS = frozenset({"WAV", "WAVEX", "W64", "RF64", "FLAC", "OGG", "AIFF", "AU", "CAF", "MP3"})
#: ffmpeg demuxers PyAV may use (matched against `container.format.name`, e.g. "mov,mp4,m4a,3gp,3g2,mj2")
PYAV_CONTAINERS = ("wav", "w64", "flac", "ogg", "mp3", "mov", "matroska", "aac", "aiff", "au", "caf")
#: audio codecs PyAV may decode (plus every `pcm_*`)
AUDIO_CODECS = frozenset(
    {
        "flac",
        "vorbis",
        "opus",
        "mp3",
        "mp3float",
        "mp2",
        "mp2float",
        "aac",
        "aac_fixed",
        "alac",
        "ac3",
        "eac3",
    }
)
#: containers `calm.video` may open (its audio track is then decoded as above)
VIDEO_CONTAINERS = (*PYAV_CONTAINERS, "avi")
#: what the refusal message lists as accepted
ALLOWED_SHOWN = (
    "WAV, FLAC, Ogg (Vorbis / Opus), MP3, MP4 / M4A (AAC, ALAC), WebM / Matroska, AAC, AIFF, AU, CAF"
)


@dataclass(frozen=True)
class DecodeLimits:
    """Bounds of one decode: wall-clock seconds (`timeout_s`) and seconds of audio decoded
    (`max_seconds`; a longer clip is refused unless the caller truncates it below that); None: no bound."""

    timeout_s: float | None = 120.0
    max_seconds: float | None = 3 * 3600.0


DEFAULT_LIMITS = DecodeLimits()
_LIMITS: ContextVar[DecodeLimits | None] = ContextVar("calm_decode_limits", default=None)


def current_limits() -> DecodeLimits:
    """The `DecodeLimits` in force here (`DEFAULT_LIMITS` outside `decode_limits`)."""
    return _LIMITS.get() or DEFAULT_LIMITS


@contextmanager
def decode_limits(limits: DecodeLimits) -> Iterator[DecodeLimits]:
    """Decode with `limits` inside the block (this thread / task only)."""
    token = _LIMITS.set(limits)
    try:
        yield limits
    finally:
        _LIMITS.reset(token)


class AudioError(CalmError, ValueError):
    """An audio file that cannot be used: the message names the file and the reason."""

    def __init__(self, path: str | Path, reason: str):
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")


class UnsupportedAudioError(AudioError):
    """A container or codec outside the allow-list (a playlist, a video-only or unknown format)."""


def _refusal(head: bytes, what: str, accepted: str = ALLOWED_SHOWN) -> str:
    kind = (
        "a playlist" if head.lstrip().upper().startswith((b"#EXTM3U", b"[PLAYLIST]", b"FFCONCAT")) else what
    )
    return f"unsupported format: {kind}; accepted: {accepted}"


def open_container(
    fh: BinaryIO,
    source: str | Path,
    *,
    timeout_s: float | None = None,
    formats: tuple[str, ...] = PYAV_CONTAINERS,
    accepted: str = ALLOWED_SHOWN,
) -> Any:
    """PyAV container of the open file `fh` (`source` names it in messages) if ffmpeg probes it as
    one of `formats`, else `UnsupportedAudioError` (`accepted`: the formats as the message lists
    them). No ffmpeg protocol is allowed, so nothing is opened from inside the container; blocking
    reads are bounded by `timeout_s`. Also for video (`calm.video`, `VIDEO_CONTAINERS`)."""
    import av

    options = {"format_whitelist": ",".join(formats), "protocol_whitelist": "none"}
    try:
        return av.open(fh, options=options, timeout=timeout_s)
    except av.error.FFmpegError as exc:
        fh.seek(0)
        refused = _refusal(fh.read(64), "not an allowed container", accepted)
        # EINVAL: probed as a demuxer not on the whitelist; a playlist may also match none at all
        if isinstance(exc, av.error.ArgumentError) or "a playlist" in refused:
            raise UnsupportedAudioError(source, refused) from exc
        raise


def open_audio_container(fh: BinaryIO, source: str | Path, timeout_s: float | None) -> Any:
    """`open_container` for audio: the first audio stream's codec must be on the allow-list."""
    container = open_container(fh, source, timeout_s=timeout_s)
    streams = [s for s in container.streams if s.type == "audio"]
    codec = streams[0].codec_context.name if streams else None
    if codec is None or not (codec in AUDIO_CODECS or codec.startswith("pcm_")):
        container.close()
        what = f"{codec} audio" if codec else f"no audio stream in {container.format.name}"
        raise UnsupportedAudioError(source, _refusal(b"", what))
    return container


def probe(source: str | Path | bytes, *, name: str | None = None) -> str:
    """The container of a file or of bytes (`name` for messages) if it is on the allow-list, e.g.
    "WAV" (libsndfile) or "mov,mp4,m4a,3gp,3g2,mj2" (ffmpeg); raises `UnsupportedAudioError`
    (or `AudioError` for bytes no demuxer recognises) without decoding anything."""
    import soundfile as sf

    shown = name or ("upload" if isinstance(source, bytes) else str(source))
    fh = io.BytesIO(source) if isinstance(source, bytes) else open(source, "rb")  # noqa: SIM115
    with fh:
        try:
            fmt = str(sf.info(fh).format)
            if fmt in SOUNDFILE_FORMATS:
                return fmt
        except Exception:  # not a libsndfile format: ask ffmpeg
            pass
        fh.seek(0)
        try:
            container = open_audio_container(fh, shown, current_limits().timeout_s)
        except AudioError:
            raise
        except Exception as exc:  # no demuxer recognises the bytes
            raise AudioError(shown, f"unreadable (PyAV: {getattr(exc, 'strerror', None) or exc})") from exc
        with container:
            return str(container.format.name)


def _too_long(limit: float) -> str:
    return f"longer than {limit:g} s, the most audio decoded per file"


def _decode_soundfile(
    path: Path, max_seconds: float | None, cap: float | None
) -> tuple[np.ndarray, int, int]:
    """(samples (n, channels) float32, native rate, total frames in the file)."""
    import soundfile as sf

    with sf.SoundFile(str(path)) as f:
        if f.format not in SOUNDFILE_FORMATS:
            raise UnsupportedAudioError(path, _refusal(b"", f"libsndfile format {f.format}"))
        rate, total = int(f.samplerate), int(f.frames)
        n = total if max_seconds is None else min(total, int(math.ceil(max_seconds * rate)) + 1)
        if cap is not None and rate > 0 and n > cap * rate:
            raise AudioError(path, _too_long(cap))
        data = f.read(frames=n, dtype="float32", always_2d=True)
    return data, rate, total


def pyav_frames(container: Any) -> Iterator[tuple[np.ndarray, int]]:
    """Decoded audio of `container`'s first audio stream: ((channels, samples) float32, rate) pieces.

    Planar float keeps every channel separate (mono mix-down is the caller's, not ffmpeg's); the
    resampler is flushed after the last frame. The one PyAV decoding loop: `decode` and
    `calm.audio_stream` both read through it.
    """
    import av

    resampler = None
    rate = 0
    for frame in container.decode(container.streams.audio[0]):
        if resampler is None:
            rate = int(frame.sample_rate)
            resampler = av.AudioResampler(format="fltp", layout=frame.layout.name, rate=rate)
        for out in resampler.resample(frame):
            yield out.to_ndarray().astype(np.float32, copy=False), rate
    if resampler is not None:
        for out in resampler.resample(None):
            yield out.to_ndarray().astype(np.float32, copy=False), rate


def _decode_pyav(
    path: Path, max_frames_at: float | None, limits: DecodeLimits
) -> tuple[np.ndarray, int, int]:
    """Decode the first audio stream with PyAV; stops once `max_frames_at` seconds are decoded.

    Returns (samples (n, channels) float32, rate, total frames decoded or -1 when decoding stopped
    early, in which case the clip is known to be longer than what was returned). Past `limits`
    (wall clock, decoded seconds beyond `max_frames_at`) it raises `AudioError`.
    """
    deadline = None if limits.timeout_s is None else time.monotonic() + limits.timeout_s
    cap = limits.max_seconds
    stop_at = max_frames_at if cap is None or (max_frames_at is not None and max_frames_at <= cap) else None
    chunks: list[np.ndarray] = []
    n = 0
    longer = False
    with open(path, "rb") as fh, open_audio_container(fh, path, limits.timeout_s) as container:
        stream = container.streams.audio[0]
        rate = int(stream.rate or stream.codec_context.sample_rate or 0)
        for arr, rate in pyav_frames(container):
            chunks.append(arr)
            n += arr.shape[1]
            if stop_at is not None and n > math.ceil(stop_at * rate):
                longer = True
                break
            if cap is not None and n > cap * rate:
                raise AudioError(path, _too_long(cap))
            if deadline is not None and time.monotonic() > deadline:
                raise AudioError(path, f"decoding took longer than {limits.timeout_s:g} s")
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
    limits = current_limits()
    errors = []
    data = None
    if path.suffix.lower() in SOUNDFILE_SUFFIXES:
        try:
            data, rate, total = _decode_soundfile(path, max_seconds, limits.max_seconds)
        except AudioError:
            raise
        except Exception as exc:  # libsndfile refuses the file: let ffmpeg try
            errors.append(f"soundfile: {exc}")
            data = None
    if data is None:
        try:
            extra = None if max_seconds is None else max_seconds + 0.1
            data, rate, total = _decode_pyav(path, extra, limits)
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
