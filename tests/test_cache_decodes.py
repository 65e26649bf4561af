"""`AudioClassifier(cache=...)` / `FeaturePipeline.features(cache=...)` decode each file at most once:
a file whose features the store holds (same path and content hash) is not decoded at all (its
duration comes from the store's index row), a cache miss is decoded once, by the store, which
refuses a bad clip with the same `ClipError` reason as the uncached path (one check:
`calm.audio_inputs.checked_clip`)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

import calm.audio
from calm.audio_classifier import AudioClassifier
from calm.audio_inputs import ClipError
from calm.clip_features import FeaturePipeline
from calm.models import MODELS, register_model
from calm.models.base import Extractor, HeadName
from calm.models.spec import LoadSpec

SR = 16000


class Bands(Extractor):
    """6 "heads" x 4 dims of log band energies (the default `load_input`: `calm.audio.load_audio`)."""

    sample_rate = SR
    max_seconds = 30.0
    head_names = [HeadName(layer, head, "decoder") for layer in range(2) for head in range(3)]

    def __init__(self, spec: LoadSpec | None = None):
        self.model_id = spec.label if spec is not None else "fake-bands-cache"

    @property
    def key(self) -> dict:
        return {"model": self.model_id, "revision": "r1", "prompt": None, "heads": "all", "options": {}}

    def extract(self, inputs):
        spectra = [np.abs(np.fft.rfft(np.atleast_2d(x)[0], n=2048))[:960] for x in inputs]
        return np.stack([np.log1p(s.reshape(24, -1).sum(1)).reshape(6, 4) for s in spectra]).astype(
            np.float32
        )


def load_bands(spec):
    return Bands(spec)


@pytest.fixture(autouse=True)
def fake_model():
    register_model("fake-bands-cache", None, "tests.test_cache_decodes:load_bands")
    yield
    MODELS.pop("fake-bands-cache", None)


@pytest.fixture
def decodes(monkeypatch) -> list[str]:
    """Every file decoded (`calm.audio.load_audio`, behind every extractor's `load_input`)."""
    seen: list[str] = []
    real = calm.audio.load_audio

    def counting(path, *args, **kwargs):
        seen.append(Path(path).name)
        return real(path, *args, **kwargs)

    monkeypatch.setattr(calm.audio, "load_audio", counting)
    return seen


def tone(freq: float, seconds: float = 0.5, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * SR)) / SR
    x = np.sin(2 * np.pi * freq * t) + 0.05 * rng.standard_normal(len(t))
    return (0.3 * x / np.abs(x).max()).astype(np.float32)


def write(folder: Path, name: str, wave: np.ndarray) -> str:
    path = folder / name
    sf.write(path, wave, SR)
    return str(path)


@pytest.fixture
def files(tmp_path) -> dict[str, list[str]]:
    audio = tmp_path / "audio"
    audio.mkdir()
    freqs = [300, 320, 340, 2000, 2100, 2200]
    train = [write(audio, f"train{i}.wav", tone(f, seed=i)) for i, f in enumerate(freqs)]
    new = [write(audio, f"new{i}.wav", tone(f, 0.7, seed=10 + i)) for i, f in enumerate([310, 2050])]
    return {"train": train, "new": new, "labels": ["low"] * 3 + ["high"] * 3}


def test_cached_files_are_not_decoded_again_and_a_miss_is_decoded_once(files, tmp_path, decodes):
    clf = AudioClassifier("fake-bands-cache", "sav", device="cpu", k=3, cache=tmp_path / "cache")
    clf.fit(files["train"], files["labels"])
    assert sorted(decodes) == sorted(Path(p).name for p in files["train"])  # fit: one decode each
    decodes.clear()
    first = clf.predict(files["new"])
    assert sorted(decodes) == ["new0.wav", "new1.wav"]  # (b) a first predict on new files: one each
    decodes.clear()
    again = clf.predict(files["new"] + files["train"])
    assert decodes == []  # (a) every file is in the store: none is decoded
    assert list(again[:2]) == list(first)
    plain = AudioClassifier("fake-bands-cache", "sav", device="cpu", k=3).fit(files["train"], files["labels"])
    assert list(plain.predict(files["new"] + files["train"])) == list(again)


def test_features_and_durations_are_the_same_with_and_without_cache(files, tmp_path, decodes):
    pipe = FeaturePipeline(Bands())
    paths = files["new"] + files["train"]
    plain = pipe.features(paths)
    decodes.clear()
    miss = pipe.features(paths, cache=tmp_path / "cache")
    assert sorted(decodes) == sorted(Path(p).name for p in paths)
    decodes.clear()
    hit = pipe.features(paths, cache=tmp_path / "cache")
    assert decodes == []
    for got in (miss, hit):
        assert got.durations == plain.durations and got.durations[0] == pytest.approx(0.7)
        assert sorted(got.rows) == sorted(plain.rows)
        assert all(np.array_equal(got.rows[i], plain.rows[i]) for i in plain.rows)


@pytest.mark.parametrize(
    ("wave", "reason"),
    [
        (tone(300)[:5], "too short (0.000 s; at least 0.1 s needed)"),
        (np.zeros(0, dtype=np.float32), "empty (no audio samples)"),
    ],
)
def test_a_bad_file_gives_the_same_one_line_error_with_and_without_cache(
    files, tmp_path, decodes, wave, reason
):
    bad = write(tmp_path, "bad.wav", wave)
    plain = AudioClassifier("fake-bands-cache", "sav", device="cpu", k=3).fit(files["train"], files["labels"])
    cached = AudioClassifier("fake-bands-cache", "sav", device="cpu", k=3, cache=tmp_path / "cache")
    cached.fit(files["train"], files["labels"])
    errors = []
    for clf in (plain, cached):
        decodes.clear()
        with pytest.raises(ClipError) as caught:
            clf.predict([files["new"][0], bad])
        assert decodes.count("bad.wav") == 1  # (c) decoded once, cached or not
        errors.append((str(caught.value), caught.value.source, caught.value.reason))
    assert errors[0] == errors[1] and "\n" not in errors[0][0]
    assert errors[0][1] == bad and errors[0][2] == reason
    failures = [json.loads(line) for line in next((tmp_path / "cache").glob("*/failures.jsonl")).open()]
    assert [(f["path"], f["reason"]) for f in failures] == [(bad, errors[0][2])]


def test_a_stored_clip_below_a_higher_min_seconds_is_refused_without_decoding(files, tmp_path, decodes):
    short = write(tmp_path, "short.wav", tone(300, 0.15))
    cache = tmp_path / "cache"
    assert FeaturePipeline(Bands(), min_seconds=0.1).features([short], cache=cache).error() is None
    decodes.clear()
    feats = FeaturePipeline(Bands(), min_seconds=0.2).features([short], cache=cache)
    assert decodes == []
    assert str(feats.error()) == f"{short}: too short (0.150 s; at least 0.2 s needed)"
    assert str(FeaturePipeline(Bands(), min_seconds=0.2).features([short]).error()) == str(feats.error())


def test_a_store_written_before_durations_were_recorded_reads_back_without_decoding(
    files, tmp_path, decodes, monkeypatch
):
    import calm.store.writer as writer
    from calm.inference import Predictor

    real_row = writer._index_row

    def older_row(item, digest):  # an index row as stores wrote it before durations were recorded
        return {k: v for k, v in real_row(item, digest).items() if k != "duration"}

    monkeypatch.setattr(writer, "_index_row", older_row)
    cache = tmp_path / "cache"
    clf = AudioClassifier("fake-bands-cache", "sav", device="cpu", k=3, cache=cache)
    clf.fit(files["train"], files["labels"])
    (index,) = cache.glob("*/index.jsonl")
    assert not any("duration" in json.loads(line) for line in index.read_text().splitlines())
    monkeypatch.setattr(writer, "_index_row", real_row)
    decodes.clear()
    feats = FeaturePipeline(Bands()).features(files["train"], cache=cache)
    assert decodes == [] and feats.durations == {} and sorted(feats.rows) == list(range(6))
    predictor = Predictor(clf.classifier_, clf._get_extractor())
    assert [p.duration for p in predictor(files["train"][:2], cache=cache)] == [None, None]
    assert decodes == []
