"""Decoding untrusted files (issue 23 items 1-2): the allow-list of containers and codecs detected
from the bytes, no playlist or protocol reaching other files, the decode deadline and the duration cap.

The file a playlist names is a unix FIFO watched by a thread: opening it for writing without
blocking succeeds only while some reader has it open, so the test sees any attempt to read it.
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from calm.audio import (
    DecodeLimits,
    UnsupportedAudioError,
    decode_limits,
    load_audio,
    probe,
)

RATE = 16000


def tone(seconds: float = 1.0, rate: int = RATE) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    return (0.2 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)


def encode(path: Path, codec: str, seconds: float = 1.0) -> Path:
    """A mono clip encoded with PyAV (mp3, aac in m4a, opus in webm)."""
    import av

    x = tone(seconds, 48000)
    with av.open(str(path), "w") as c:
        stream = c.add_stream(codec, rate=48000)
        frame = av.AudioFrame.from_ndarray(x[None, :], format="flt", layout="mono")
        frame.sample_rate = 48000
        ctx = stream.codec_context
        resampler = av.AudioResampler(format=ctx.format.name, layout="mono", rate=ctx.sample_rate)
        for f in resampler.resample(frame):
            for packet in stream.encode(f):
                c.mux(packet)
        for packet in stream.encode(None):
            c.mux(packet)
    return path


class FifoWatch:
    """A FIFO and a thread recording whether anyone opened it for reading."""

    def __init__(self, path: Path):
        self.path = path
        os.mkfifo(path)
        self.opened = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()

    def _watch(self) -> None:
        while not self._stop.is_set():
            try:
                fd = os.open(self.path, os.O_WRONLY | os.O_NONBLOCK)
            except OSError:  # ENXIO: no reader
                time.sleep(0.005)
                continue
            self.opened = True
            os.close(fd)  # the reader sees end of file and goes on
            return

    def close(self) -> bool:
        time.sleep(0.05)
        self._stop.set()
        self._thread.join(5)
        return self.opened


def playlist(target: Path, *, end: bool = True) -> str:
    lines = ["#EXTM3U", "#EXT-X-TARGETDURATION:10", "#EXT-X-MEDIA-SEQUENCE:0", "#EXTINF:1.0,", str(target)]
    return "\n".join(lines + (["#EXT-X-ENDLIST"] if end else [])) + "\n"


@pytest.mark.parametrize("suffix", [".m3u8", ".m3u", ".wav"])
def test_a_local_playlist_is_refused_without_opening_the_file_it_names(tmp_path, suffix):
    watch = FifoWatch(tmp_path / "secret.wav")
    (tmp_path / f"list{suffix}").write_text(playlist(watch.path))
    with pytest.raises(UnsupportedAudioError, match=f"list{suffix}: unsupported format: a playlist"):
        load_audio(tmp_path / f"list{suffix}", RATE)
    assert not watch.close(), "the decoder opened the file the playlist names"


def test_playlist_bytes_are_refused_by_probe(tmp_path):
    watch = FifoWatch(tmp_path / "secret.wav")
    for body in (playlist(watch.path), f"ffconcat version 1.0\nfile '{watch.path}'\n"):
        with pytest.raises(UnsupportedAudioError, match="x.m3u8: unsupported format"):
            probe(body.encode(), name="x.m3u8")
    assert not watch.close()


def test_a_never_ending_playlist_is_refused_at_once(tmp_path):
    sf.write(tmp_path / "a.wav", tone(), RATE)
    (tmp_path / "live.m3u8").write_text(playlist(tmp_path / "a.wav", end=False))
    start = time.monotonic()
    with pytest.raises(UnsupportedAudioError):
        load_audio(tmp_path / "live.m3u8", RATE)
    assert time.monotonic() - start < 2.0


def test_the_documented_formats_are_accepted_from_their_bytes(tmp_path):
    x = tone()
    files = {}
    for name in ("a.wav", "a.flac", "a.ogg"):
        sf.write(tmp_path / name, x, RATE)
        files[name] = tmp_path / name
    for name, codec in (("a.mp3", "mp3"), ("a.m4a", "aac"), ("a.webm", "libopus")):
        files[name] = encode(tmp_path / name, codec)
    for name, path in files.items():
        container = probe(path.read_bytes(), name="upload")  # no file name to go by
        assert container == probe(path)
        wave = load_audio(path, RATE)
        assert abs(wave.shape[0] - RATE) < 0.1 * RATE, name
    # a name promising audio does not matter: the bytes decide
    (tmp_path / "notes.wav").write_text("just text\n" * 50)
    with pytest.raises(ValueError, match="notes.wav: unreadable"):
        load_audio(tmp_path / "notes.wav", RATE)


def test_a_video_only_container_is_refused(tmp_path):
    import av

    path = tmp_path / "v.mp4"
    with av.open(str(path), "w") as c:
        stream = c.add_stream("mpeg4", rate=5)
        stream.width = stream.height = 16
        for _ in range(3):
            frame = av.VideoFrame.from_ndarray(np.zeros((16, 16, 3), np.uint8), format="rgb24")
            for packet in stream.encode(frame):
                c.mux(packet)
        for packet in stream.encode(None):
            c.mux(packet)
    with pytest.raises(UnsupportedAudioError, match="no audio stream"):
        load_audio(path, RATE)


def test_decode_deadline_and_duration_cap(tmp_path):
    mp3 = encode(tmp_path / "a.mp3", "mp3", seconds=2.0)
    sf.write(tmp_path / "a.wav", tone(2.0), RATE)
    with decode_limits(DecodeLimits(timeout_s=0.0)):
        with pytest.raises(ValueError, match="a.mp3: decoding took longer than 0 s"):
            load_audio(mp3, RATE)
    with decode_limits(DecodeLimits(max_seconds=1.0)):
        for path in (mp3, tmp_path / "a.wav"):
            with pytest.raises(ValueError, match="longer than 1 s, the most audio decoded per file"):
                load_audio(path, RATE)
            with pytest.raises(ValueError, match="longer than 1 s"):
                load_audio(path, RATE, max_seconds=0.5, long="windows")
            assert load_audio(path, RATE, max_seconds=0.5).shape == (RATE // 2,)  # truncated below the cap
    assert load_audio(mp3, RATE).shape[0] > RATE  # the limits hold inside the block only


def test_a_playlist_given_as_video_is_refused_without_opening_the_file_it_names(tmp_path):
    from calm.video import read_frames

    watch = FifoWatch(tmp_path / "secret.mp4")
    (tmp_path / "clip.m3u8").write_text(playlist(watch.path))
    with pytest.raises(
        UnsupportedAudioError, match="clip.m3u8: unsupported format: a playlist; accepted: MP4"
    ):
        read_frames(tmp_path / "clip.m3u8")
    assert not watch.close(), "the video decoder opened the file the playlist names"
