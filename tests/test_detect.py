"""Detection on long recordings (calm.detection, calm.audio_stream, `calm detect`): a synthetic
recording of noise with tone bursts of two classes at known times, a classifier fitted on short
clips with a model-free band-energies extractor (docs/extending.md), events found within a
tolerance; the file is decoded in pieces; the CLI writes CSV / JSON; bad input gives one line."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from click.testing import CliRunner

import calm
from calm.audio import AudioError
from calm.cli import main
from calm.detection import events_of, smooth, windows_of
from calm.errors import ParameterError
from calm.models import MODELS, Extractor, HeadName, register_model

RATE = 16000
FREQS = {"low": 500.0, "high": 3000.0}
#: (onset, offset, label) of the bursts in the synthetic recording
BURSTS = [(8.0, 11.0, "low"), (20.0, 22.0, "high"), (35.0, 39.0, "low"), (50.0, 53.0, "high")]
TOLERANCE = 0.6  # seconds: about a hop plus the median filter's reach


class BandEnergies(Extractor):
    """K = 8 bands x 16 bins of a clip's time-averaged log power spectrum (no model)."""

    sample_rate = RATE
    max_seconds = 10.0
    head_names = [HeadName(0, band, "spectrum") for band in range(8)]

    def __init__(self, spec=None):
        self.model_id = "band-energies-test"

    @property
    def key(self) -> dict:
        return {
            "model": self.model_id,
            "revision": "1",
            "prompt": None,
            "heads": "all",
            "layers": None,
            "dtype": "float32",
            "options": {},
        }

    def extract(self, inputs) -> np.ndarray:
        out = []
        for wave in inputs:
            wave = np.pad(np.asarray(wave, np.float32), (0, max(0, 256 - len(wave))))
            frames = np.lib.stride_tricks.sliding_window_view(wave, 256)[::128]
            power = np.abs(np.fft.rfft(frames * np.hanning(256), axis=-1)) ** 2
            out.append(np.log1p(power.mean(axis=0))[:128].reshape(8, 16))
        return np.stack(out).astype(np.float32)


def load_band_energies(spec):
    return BandEnergies(spec)


@pytest.fixture(autouse=True)
def band_model():
    register_model("band-energies-test", None, "tests.test_detect:load_band_energies")
    yield
    MODELS.pop("band-energies-test", None)


def noise(seconds: float, rng) -> np.ndarray:
    return (0.02 * rng.standard_normal(int(seconds * RATE))).astype(np.float32)


def tone(freq: float, seconds: float) -> np.ndarray:
    t = np.arange(int(seconds * RATE)) / RATE
    return (0.3 * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def recording(seconds: float = 60.0, seed: int = 0) -> np.ndarray:
    x = noise(seconds, np.random.default_rng(seed))
    for onset, offset, label in BURSTS:
        a, b = int(onset * RATE), int(offset * RATE)
        x[a:b] += tone(FREQS[label], offset - onset)
    return x


@pytest.fixture(scope="module")
def classifier() -> calm.AudioClassifier:
    register_model("band-energies-test", None, "tests.test_detect:load_band_energies")
    rng = np.random.default_rng(1)
    clips, labels = [], []
    for label, freq in FREQS.items():
        for k in range(3):
            clips.append((tone(freq * (1 + 0.02 * k), 1.0) + noise(1.0, rng), RATE))
            labels.append(label)
    for _ in range(3):
        clips.append((noise(1.0, rng), RATE))
        labels.append("noise")
    clf = calm.AudioClassifier("band-energies-test", method="calm", device="cpu")
    return clf.fit(clips, labels)


@pytest.fixture(scope="module")
def long_flac(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("rec") / "field.flac"
    sf.write(path, recording(), RATE, subtype="PCM_16")
    return path


def matched(events, bursts=BURSTS, tolerance=TOLERANCE) -> None:
    found = [(e.onset, e.offset, str(e.label)) for e in events]
    assert len(found) == len(bursts), found
    for (on, off, label), (t_on, t_off, t_label) in zip(found, bursts, strict=True):
        assert label == t_label and abs(on - t_on) <= tolerance and abs(off - t_off) <= tolerance, found


def test_detect_finds_the_bursts_of_a_streamed_flac(classifier, long_flac):
    result = classifier.detect(long_flac, background=["noise"])
    matched(result.events)
    assert result.duration == pytest.approx(60.0, abs=0.01)
    assert result.probabilities.shape == (len(result.starts), 3) and result.failed == 0
    assert np.all(np.diff(result.starts) == pytest.approx(0.5))
    assert all(0.5 <= e.score <= 1 for e in result.events)


def test_a_waveform_at_another_rate_gives_the_same_events(classifier):
    import soxr

    wave = soxr.resample(recording(), RATE, 44100)
    matched(classifier.detect((wave, 44100), background=["noise"], window=0.8, hop=0.25).events)


def test_without_a_background_class_noise_is_an_event_unless_the_threshold_says_no(classifier, long_flac):
    result = classifier.detect(long_flac)
    assert any(str(e.label) == "noise" for e in result.events)
    matched(classifier.detect(long_flac, thresholds={"noise": 1.0}).events)  # a threshold of 1: never


def test_the_file_is_decoded_in_pieces(classifier, long_flac, monkeypatch):
    """Streaming: soundfile reads blocks of at most BLOCK_SECONDS, never the whole minute."""
    import soundfile

    reads: list[int] = []
    original = soundfile.SoundFile.read

    def recording_read(self, frames=-1, *args, **kwargs):
        reads.append(frames)
        return original(self, frames, *args, **kwargs)

    monkeypatch.setattr(soundfile.SoundFile, "read", recording_read)
    monkeypatch.setattr("calm.detection.BLOCK_SECONDS", 5.0)
    matched(classifier.detect(long_flac, background=["noise"]).events)
    assert len(reads) >= 12 and 0 < max(reads) <= 5 * RATE, reads


def test_pyav_files_are_streamed_too(classifier, tmp_path, monkeypatch):
    """A container libsndfile does not read (M4A / ALAC, through PyAV) comes in pieces as well."""
    import av

    path = tmp_path / "field.m4a"
    with av.open(str(path), "w", format="mp4") as out:
        stream = out.add_stream("alac", rate=RATE, layout="mono")
        x = (recording() * 32767).astype(np.int16)
        for i in range(0, len(x), 4096):
            frame = av.AudioFrame.from_ndarray(x[None, i : i + 4096], format="s16", layout="mono")
            frame.sample_rate = RATE
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode(None):
            out.mux(packet)
    from calm import audio_stream

    sizes: list[int] = []
    blocks = audio_stream._pyav_blocks

    def recorded(*args):
        for block, rate in blocks(*args):
            sizes.append(len(block))
            yield block, rate

    monkeypatch.setattr(audio_stream, "_pyav_blocks", recorded)
    matched(classifier.detect(path, background=["noise"]).events)
    assert len(sizes) >= 6 and max(sizes) < 11 * RATE, sizes


def test_windows_cover_the_signal_and_end_at_its_end():
    x = np.arange(23, dtype=np.float32)
    got = list(windows_of(iter([x[:7], x[7:9], x[9:]]), 10, 0.5, 10))
    assert [s for s, _ in got] == [0, 5, 10, 13]
    assert all(np.array_equal(w, x[s : s + 10]) for s, w in got)
    assert list(windows_of(iter([x[:9]]), 10, 0.5, 10)) == []


def test_events_merge_consecutive_windows_and_take_the_hop_as_resolution():
    starts = np.arange(8) * 0.5
    scores = np.array([[0.9, 0.1]] * 3 + [[0.4, 0.6]] * 2 + [[0.55, 0.45]] * 3)
    events = events_of(starts, scores, np.array([0.5, 0.7]), ["a", "b"], window=1.0, duration=4.5)
    assert [(e.label, round(e.onset, 2), round(e.offset, 2)) for e in events] == [
        ("a", 0.0, 1.75),
        ("a", 2.75, 4.5),
    ]
    assert events[0].score == pytest.approx(0.9)
    assert smooth(np.array([[0.0], [1.0], [0.0], [0.0]]), 3)[:, 0].tolist() == [0.0, 0.0, 0.0, 0.0]


def test_bad_settings_and_short_recordings(classifier, tmp_path):
    with pytest.raises(ParameterError, match="hop"):
        classifier.detect((noise(5.0, np.random.default_rng(0)), RATE), hop=2.0)
    with pytest.raises(ParameterError, match="median"):
        classifier.detect((noise(5.0, np.random.default_rng(0)), RATE), median=2)
    with pytest.raises(ParameterError, match="unknown class 'cat'"):
        classifier.detect((noise(5.0, np.random.default_rng(0)), RATE), thresholds={"cat": 0.5})
    with pytest.raises(ParameterError, match=r"background label\(s\) \['cat'\] are not classes"):
        classifier.detect((noise(5.0, np.random.default_rng(0)), RATE), background=["cat"])
    with pytest.raises(ParameterError, match="longer than the model"):
        classifier.detect((noise(20.0, np.random.default_rng(0)), RATE), window=12.0)
    short = tmp_path / "short.wav"
    sf.write(short, noise(0.6, np.random.default_rng(0)), RATE)
    with pytest.raises(AudioError, match=r"short\.wav: too short: shorter than one window \(1 s\)"):
        classifier.detect(short)


# -- calm detect ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model_file(classifier, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("model") / "tones.safetensors"
    classifier.save(path)
    return path


def invoke(*args):
    return CliRunner().invoke(main, ["detect", *[str(a) for a in args]])


def test_cli_prints_events_and_writes_csv_json_and_a_timeline(model_file, long_flac, tmp_path):
    out_csv, out_json, plots = tmp_path / "ev.csv", tmp_path / "ev.json", tmp_path / "plots"
    res = invoke(
        model_file, long_flac, "--background", "noise", "--csv", out_csv, "--json", out_json, "--plot", plots
    )
    assert res.exit_code == 0, res.output
    rows = list(csv.DictReader(out_csv.open()))
    assert [r["label"] for r in rows] == [b[2] for b in BURSTS]
    assert abs(float(rows[0]["onset"]) - BURSTS[0][0]) <= TOLERANCE
    doc = json.loads(out_json.read_text())
    assert doc[0]["source"] == str(long_flac) and len(doc[0]["events"]) == len(BURSTS)
    assert doc[0]["error"] is None and doc[0]["window"] == 1.0
    assert (plots / "field.timeline.png").stat().st_size > 1000
    assert re.search(
        rf"^calm detect: {re.escape(str(long_flac))}: [\d.]+ s of audio, [\d.]+x real time$", res.output, re.M
    )
    assert f"{long_flac}\t" in res.output


def test_cli_threshold_per_class_and_median_are_passed(model_file, long_flac, tmp_path):
    out_json = tmp_path / "ev.json"
    res = invoke(
        model_file,
        long_flac,
        "--threshold",
        "0.5",
        "--threshold",
        "noise=1.0",
        "--median",
        "1",
        "--hop",
        "1.0",
        "--quiet",
        "--json",
        out_json,
    )
    assert res.exit_code == 0, res.output
    doc = json.loads(out_json.read_text())[0]
    assert doc["thresholds"] == {"high": 0.5, "low": 0.5, "noise": 1.0} and doc["hop"] == 1.0
    assert "real time" not in res.output.split("events in")[0]  # --quiet: no progress line


def test_cli_bad_files_get_one_line_each_and_the_good_ones_are_kept(model_file, long_flac, tmp_path):
    playlist = tmp_path / "list.m3u"
    playlist.write_text("#EXTM3U\n#EXTINF:1,x\nfile:///etc/passwd\n")
    short = tmp_path / "short.wav"
    sf.write(short, noise(0.5, np.random.default_rng(0)), RATE)
    out_csv = tmp_path / "ev.csv"
    res = invoke(
        model_file,
        tmp_path / "missing.wav",
        playlist,
        short,
        long_flac,
        "--background",
        "noise",
        "--csv",
        out_csv,
        "--quiet",
    )
    assert res.exit_code == 1
    errors = [ln for ln in res.output.splitlines() if "\tERROR\t" in ln]
    assert len(errors) == 3
    assert errors[0].startswith(f"{tmp_path / 'missing.wav'}\tERROR\tfile not found")
    assert errors[1].startswith(f"{playlist}\tERROR\tunsupported format: a playlist")
    assert errors[2].startswith(f"{short}\tERROR\ttoo short")
    rows = list(csv.DictReader(out_csv.open()))
    assert [r["label"] for r in rows if not r["error"]] == [b[2] for b in BURSTS]
    assert "3 of 4 files failed" in res.output


def test_cli_bad_option_is_one_error_line(model_file, long_flac):
    res = invoke(model_file, long_flac, "--hop", "3")
    assert res.exit_code == 1
    assert res.output.strip().splitlines()[-1].startswith("calm: error: hop must be in (0, window=1]")
    assert invoke(model_file, long_flac, "--threshold", "dog=high").exit_code == 2


def test_unreadable_and_nan_files_name_the_file(classifier, tmp_path):
    junk = tmp_path / "junk.wav"
    junk.write_bytes(b"not audio at all " * 100)
    with pytest.raises(AudioError, match=r"junk\.wav: "):
        classifier.detect(junk)
    bad = tmp_path / "nan.wav"
    x = noise(3.0, np.random.default_rng(0))
    x[RATE * 2] = np.nan
    sf.write(bad, x, RATE, subtype="FLOAT")
    with pytest.raises(AudioError, match=r"nan\.wav: contains NaN or infinite samples"):
        classifier.detect(bad)
