import logging
from fractions import Fraction

import numpy as np
import pytest
import soundfile as sf

from calm.audio import AudioError, load_audio, split_windows


def tone(seconds: float, rate: int, freq: float = 440.0, channels: int = 1) -> np.ndarray:
    t = np.arange(int(round(seconds * rate))) / rate
    x = 0.5 * np.sin(2 * np.pi * freq * t).astype(np.float32)
    if channels == 1:
        return x
    return np.stack([x * (c + 1) / channels for c in range(channels)], axis=1)


def write_pyav(path, x: np.ndarray, rate: int, codec: str) -> None:
    import av

    with av.open(str(path), "w") as out:
        stream = out.add_stream(codec, rate=rate, layout="mono")
        frame_len = 1024
        pts = 0
        for s in range(0, len(x), frame_len):
            chunk = x[s : s + frame_len].astype(np.float32)[None, :]
            frame = av.AudioFrame.from_ndarray(chunk, format="fltp", layout="mono")
            frame.sample_rate = rate
            frame.pts = pts
            frame.time_base = Fraction(1, rate)
            pts += chunk.shape[1]
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode(None):
            out.mux(packet)


def corr(a: np.ndarray, b: np.ndarray) -> float:
    n = min(len(a), len(b))
    return float(np.corrcoef(a[:n], b[:n])[0, 1])


@pytest.mark.parametrize(("suffix", "subtype"), [(".wav", "PCM_16"), (".flac", "PCM_24"), (".ogg", "VORBIS")])
def test_soundfile_formats_resampled(tmp_path, suffix, subtype):
    x = tone(1.0, 22050)
    path = tmp_path / f"a{suffix}"
    sf.write(path, x, 22050, subtype=subtype)
    y = load_audio(path, 16000)
    assert y.dtype == np.float32 and y.ndim == 1
    assert abs(len(y) - 16000) <= 2
    assert corr(y, tone(1.0, 16000)) > 0.99


@pytest.mark.parametrize(("suffix", "codec"), [(".mp3", "mp3"), (".m4a", "aac")])
def test_pyav_formats(tmp_path, suffix, codec):
    av = pytest.importorskip("av")
    path = tmp_path / f"a{suffix}"
    try:
        write_pyav(path, tone(1.0, 16000), 16000, codec)
    except (av.error.FFmpegError, ValueError) as exc:  # encoder missing from this ffmpeg build
        pytest.skip(f"cannot encode {codec}: {exc}")
    y = load_audio(path, 16000)
    assert y.dtype == np.float32 and y.ndim == 1
    assert 0.9 * 16000 < len(y) < 1.2 * 16000  # encoder priming may add a few ms
    # codec delay shifts the signal a little: compare spectra, not samples
    spec = np.abs(np.fft.rfft(y[:8000]))
    assert abs(np.argmax(spec) * 16000 / 8000 - 440) <= 4


def test_stereo_mixed_down_by_averaging(tmp_path):
    x = tone(0.5, 16000, channels=2)  # right channel twice the left
    path = tmp_path / "s.wav"
    sf.write(path, x, 16000, subtype="FLOAT")
    y = load_audio(path, 16000)
    np.testing.assert_allclose(y, x.mean(axis=1), atol=1e-6)


def test_same_rate_is_bit_exact(tmp_path):
    x = tone(0.3, 16000)
    path = tmp_path / "a.wav"
    sf.write(path, x, 16000, subtype="FLOAT")
    np.testing.assert_array_equal(load_audio(path, 16000), x)


def test_truncation_logs_a_warning(tmp_path, caplog):
    path = tmp_path / "long.wav"
    sf.write(path, tone(3.0, 8000), 8000)
    with caplog.at_level(logging.WARNING, logger="calm.audio"):
        y = load_audio(path, 16000, max_seconds=2.0)
    assert y.shape == (32000,)
    assert "long.wav" in caplog.text and "truncated" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="calm.audio"):
        z = load_audio(path, 16000, max_seconds=5.0)
    assert abs(len(z) - 48000) <= 2 and caplog.text == ""


def test_windows(tmp_path):
    path = tmp_path / "long.wav"
    x = tone(2.5, 16000)
    sf.write(path, x, 16000, subtype="FLOAT")
    w = load_audio(path, 16000, max_seconds=1.0, long="windows")
    assert w.shape == (3, 16000)
    np.testing.assert_array_equal(w[0], x[:16000])
    np.testing.assert_array_equal(w[1], x[16000:32000])
    np.testing.assert_array_equal(w[2], x[-16000:])  # last window ends at the clip's end
    short = load_audio(path, 16000, max_seconds=10.0, long="windows")
    assert short.shape == (1, len(x))


def test_split_windows_exact_multiple():
    x = np.arange(10, dtype=np.float32)
    np.testing.assert_array_equal(split_windows(x, 5), x.reshape(2, 5))


def test_bad_files_name_file_and_reason(tmp_path):
    garbage = tmp_path / "garbage.wav"
    garbage.write_bytes(b"this is not audio at all" * 10)
    with pytest.raises(AudioError, match="garbage.wav.*unreadable"):
        load_audio(garbage, 16000)

    empty = tmp_path / "empty.wav"
    sf.write(empty, np.zeros(0, np.float32), 16000)
    with pytest.raises(AudioError, match="empty.wav.*empty"):
        load_audio(empty, 16000)

    silent = tmp_path / "silent.flac"
    sf.write(silent, np.zeros(16000, np.float32), 16000)
    with pytest.raises(AudioError, match="silent.flac.*silent"):
        load_audio(silent, 16000)

    with pytest.raises(AudioError, match="missing.mp3.*not found"):
        load_audio(tmp_path / "missing.mp3", 16000)

    zero_bytes = tmp_path / "zero.mp3"
    zero_bytes.write_bytes(b"")
    with pytest.raises(AudioError, match="zero.mp3"):
        load_audio(zero_bytes, 16000)


def test_quiet_but_not_silent_is_kept(tmp_path):
    path = tmp_path / "quiet.wav"
    sf.write(path, tone(0.2, 16000) * 0.002, 16000, subtype="PCM_16")  # about -60 dBFS
    assert np.abs(load_audio(path, 16000)).max() > 0


def test_argument_errors(tmp_path):
    path = tmp_path / "a.wav"
    sf.write(path, tone(0.2, 16000), 16000)
    with pytest.raises(ValueError, match="long"):
        load_audio(path, 16000, long="average")
    with pytest.raises(ValueError, match="sample_rate"):
        load_audio(path, 0)


@pytest.mark.slow
def test_real_esc10_clip(esc10_root):
    clip = sorted(esc10_root.glob("*/*.ogg"))[0]
    y = load_audio(clip, 16000, max_seconds=30)
    assert y.dtype == np.float32 and abs(len(y) - 80000) < 100
