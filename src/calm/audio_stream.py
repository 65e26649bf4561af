"""Long recordings streamed from disk: float32 mono blocks at a model's rate, never the whole file.

`stream_audio(path, sample_rate, *, block_seconds=BLOCK_SECONDS)` yields blocks of about
`block_seconds` of audio, one after the other, so memory stays bounded however long the file is
(`calm.detection` slides its windows over them). The file goes through the same safety checks as
`calm.audio.load_audio`: the container is detected from the bytes and must be on the allow-list
(`calm.audio.probe`; playlists and unknown formats raise `UnsupportedAudioError`); libsndfile
formats are read block by block with soundfile, everything else frame by frame with PyAV opened by
`calm.audio.open_audio_container` (`open_container`: an ffmpeg format whitelist, no protocol).
Channels are averaged; the rate is converted with soxr's streaming resampler (high quality), so a
block boundary leaves no seam. There is no cap on the length (memory does not grow with it); each
blocking read is bounded by the current `DecodeLimits.timeout_s`.

`stream_waveform(wave, rate, sample_rate, ...)` gives the same blocks for a waveform already in
memory. Problems raise `AudioError` naming the file: missing, unreadable, empty, NaN samples.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np

from calm.audio import (
    SOUNDFILE_FORMATS,
    AudioError,
    current_limits,
    open_audio_container,
    probe,
    pyav_frames,
)

#: seconds of audio per decoded block
BLOCK_SECONDS = 10.0


def _soundfile_blocks(path: Path, block_seconds: float) -> Iterator[tuple[np.ndarray, int]]:
    import soundfile as sf

    with sf.SoundFile(str(path)) as f:
        rate = int(f.samplerate)
        frames = max(1, int(block_seconds * rate))
        while True:
            data = f.read(frames=frames, dtype="float32", always_2d=True)
            if not len(data):
                return
            yield (data.mean(axis=1, dtype=np.float32) if data.shape[1] > 1 else data[:, 0]), rate


def _pyav_blocks(path: Path, block_seconds: float) -> Iterator[tuple[np.ndarray, int]]:
    pending: list[np.ndarray] = []
    n = 0
    rate = 0
    with open(path, "rb") as fh, open_audio_container(fh, path, current_limits().timeout_s) as container:
        for arr, rate in pyav_frames(container):
            pending.append(arr.mean(axis=0))
            n += pending[-1].shape[0]
            if n >= block_seconds * rate:
                yield np.concatenate(pending), rate
                pending, n = [], 0
    if pending:
        yield np.concatenate(pending), rate


def _resampled(
    source: str | Path, blocks: Iterator[tuple[np.ndarray, int]], sample_rate: int
) -> Iterator[np.ndarray]:
    """The blocks at `sample_rate` (soxr's streaming resampler), each checked for NaN / infinity."""
    import soxr

    stream = None
    seconds = 0.0
    for block, rate in blocks:
        if rate <= 0:
            raise AudioError(source, f"invalid sample rate {rate}")
        if not np.isfinite(block).all():
            raise AudioError(source, f"contains NaN or infinite samples (after {seconds:.1f} s)")
        seconds += block.shape[0] / rate
        if rate == sample_rate:
            yield np.ascontiguousarray(block, dtype=np.float32)
            continue
        if stream is None:
            stream = soxr.ResampleStream(rate, sample_rate, 1, dtype="float32", quality="HQ")
        out = stream.resample_chunk(np.ascontiguousarray(block, dtype=np.float32))
        if out.size:
            yield out
    if stream is not None:
        tail = stream.resample_chunk(np.zeros(0, np.float32), last=True)
        if tail.size:
            yield tail
    if seconds == 0:
        raise AudioError(source, "empty (no audio samples)")


def stream_audio(
    path: str | Path, sample_rate: int, *, block_seconds: float = BLOCK_SECONDS
) -> Iterator[np.ndarray]:
    """Float32 mono blocks of the file `path` at `sample_rate`, about `block_seconds` each."""
    path = Path(path)
    if not path.is_file():
        raise AudioError(path, "file not found" if not path.exists() else "not a regular file")
    fmt = probe(path)  # the allow-list: refuses playlists and unknown containers before decoding
    raw = (
        _soundfile_blocks(path, block_seconds)
        if fmt in SOUNDFILE_FORMATS
        else _pyav_blocks(path, block_seconds)
    )
    blocks = _resampled(path, raw, sample_rate)
    while True:
        try:
            block = next(blocks)
        except StopIteration:
            return
        except AudioError:
            raise
        except Exception as exc:  # a decoder error part way through the file
            raise AudioError(path, f"unreadable ({type(exc).__name__}: {exc})") from exc
        yield block


def stream_waveform(
    wave: np.ndarray,
    rate: int,
    sample_rate: int,
    *,
    name: str = "waveform",
    block_seconds: float = BLOCK_SECONDS,
) -> Iterator[np.ndarray]:
    """The blocks of a mono waveform already in memory (resampled block by block, like a file)."""
    step = max(1, int(block_seconds * rate))
    raw = ((wave[i : i + step], rate) for i in range(0, wave.shape[0], step))
    yield from _resampled(name, raw, sample_rate)
