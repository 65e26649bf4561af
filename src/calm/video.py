"""Decoding video files for the audio-visual path: RGB frames sampled at a fixed rate (PyAV), plus
the mono audio track (`calm.audio`), as a `VideoClip`.

Frames are scaled by libswscale (PyAV), so no image library is needed; the patch layout a model's
vision encoder reads lives with the processors (`calm.models.processors`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from calm.audio import VIDEO_CONTAINERS, AudioError, load_audio, open_container
from calm.errors import ParameterError

DEFAULT_FPS = 2.0
#: the video containers the refusal message lists (`calm.audio.VIDEO_CONTAINERS`)
VIDEO_SHOWN = "MP4 / MOV, WebM / Matroska, AVI"
DEFAULT_FRAME_SIZE = (224, 224)


@dataclass(frozen=True)
class VideoClip:
    """A decoded video for the audio-visual path: RGB frames at `fps` plus the mono audio track."""

    frames: np.ndarray  # (T, H, W, 3) uint8
    fps: float
    audio: np.ndarray  # (n,) float32 at the model's sample rate


def frame_times(duration: float, fps: float, max_frames: int | None = None) -> np.ndarray:
    """Sampling instants 0, 1/fps, 2/fps, ... before `duration` (at least one frame)."""
    if fps <= 0:
        raise ParameterError(f"fps must be > 0, got {fps}")
    n = max(1, int(np.ceil(duration * fps - 1e-9)))
    if max_frames is not None:
        n = min(n, max_frames)
    return np.arange(n) / fps


def read_frames(
    path: str | Path,
    *,
    fps: float = 2.0,
    size: tuple[int, int] = (224, 224),
    max_seconds: float | None = None,
    max_frames: int | None = None,
) -> np.ndarray:
    """RGB frames (T, height, width, 3) uint8 of a video file, one every 1/fps seconds.

    Each sampling instant takes the last decoded frame shown at or before it; frames are scaled
    to `size` = (height, width) by libswscale (PyAV), so no image library is needed.
    """
    import av

    height, width = size
    try:
        fh = open(path, "rb")  # noqa: SIM115 - closed by the with block below
    except OSError as err:
        raise AudioError(path, f"cannot open video: {err}") from err
    with fh:
        # an allow-list of containers and no protocol: a playlist cannot make ffmpeg open other files
        try:
            container = open_container(fh, path, formats=VIDEO_CONTAINERS, accepted=VIDEO_SHOWN)
        except av.error.FFmpegError as err:
            raise AudioError(path, f"cannot open video: {err}") from err
        with container:
            if not container.streams.video:
                raise AudioError(path, "no video stream")
            stream = container.streams.video[0]
            decoded: list[tuple[float, np.ndarray]] = []
            for frame in container.decode(stream):
                if frame.time is None:
                    continue
                if max_seconds is not None and frame.time > max_seconds:
                    break
                decoded.append(
                    (
                        float(frame.time),
                        frame.reformat(width=width, height=height, format="rgb24").to_ndarray(),
                    )
                )
    if not decoded:
        raise AudioError(path, "no decodable video frames")
    starts = np.array([t for t, _ in decoded])
    duration = starts[-1] + (starts[-1] - starts[-2] if len(starts) > 1 else 1.0 / fps)
    if max_seconds is not None:
        duration = min(duration, max_seconds)
    times = frame_times(duration - starts[0], fps, max_frames) + starts[0]
    index = np.clip(np.searchsorted(starts, times + 1e-6, side="right") - 1, 0, len(decoded) - 1)
    return np.stack([decoded[i][1] for i in index])


def load_video(
    path: str | Path,
    *,
    sample_rate: int = 16000,
    fps: float = DEFAULT_FPS,
    frame_size: tuple[int, int] = DEFAULT_FRAME_SIZE,
    max_seconds: float | None = None,
    max_frames: int | None = None,
) -> VideoClip:
    """Frames (see `read_frames`) and the mono audio track of a video file."""
    frames = read_frames(path, fps=fps, size=frame_size, max_seconds=max_seconds, max_frames=max_frames)
    audio = load_audio(path, sample_rate, max_seconds=max_seconds)
    return VideoClip(frames=frames, fps=fps, audio=audio)
