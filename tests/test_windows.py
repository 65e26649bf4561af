"""`long="windows"`: a clip longer than the model's window is cut into windows whose features are
averaged (calm.models.windows), instead of being truncated."""

from __future__ import annotations

import numpy as np
import pytest
import soundfile as sf

from calm.models import load_extractor
from calm.models.base import ExtractorError

SR = 16000
pytestmark = pytest.mark.slow  # the real Whisper tiny.en


@pytest.fixture(scope="module")
def extractors():
    plain = load_extractor("whisper-tiny.en", heads="encoder")
    return plain, load_extractor("whisper-tiny.en", heads="encoder", long="windows")


def _write(path, seconds, seed):
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * SR)) / SR
    x = 0.2 * np.sin(2 * np.pi * (300 + 500 * (t > seconds / 2)) * t) + 0.02 * rng.standard_normal(len(t))
    sf.write(path, x.astype(np.float32), SR)
    return sf.read(path, dtype="float32")[0]  # what the file holds (16-bit PCM)


def test_long_clip_is_the_mean_over_its_windows(tmp_path, extractors):
    plain, windowed = extractors
    x = _write(tmp_path / "long.wav", 40.0, 0)
    loaded = windowed.load_input(tmp_path / "long.wav")
    assert loaded.shape == (2, 30 * SR)
    np.testing.assert_allclose(loaded[1], x[-30 * SR :], atol=1e-4)  # the last window ends at the clip's end
    got = windowed.extract([loaded])
    by_hand = plain.extract([x[: 30 * SR], x[-30 * SR :]]).mean(axis=0, keepdims=True)
    np.testing.assert_allclose(got, by_hand, atol=1e-5)
    truncated = plain.extract([plain.load_input(tmp_path / "long.wav")])
    assert not np.allclose(got, truncated, atol=1e-3)  # the second half of the clip counts now


def test_short_clip_and_batches_with_mixed_window_counts(tmp_path, extractors):
    plain, windowed = extractors
    short = _write(tmp_path / "short.wav", 3.0, 1)
    _write(tmp_path / "long.wav", 45.0, 2)
    inputs = [windowed.load_input(tmp_path / "short.wav"), windowed.load_input(tmp_path / "long.wav")]
    batch = windowed.extract(inputs)
    assert batch.shape == (2, len(plain.head_names), 64)
    np.testing.assert_allclose(batch[0], plain.extract([short])[0], atol=1e-4)
    np.testing.assert_allclose(batch[1], windowed.extract(inputs[1:])[0], atol=1e-4)


def test_windows_change_the_key_and_bad_values_are_refused(extractors):
    plain, windowed = extractors
    assert windowed.key == {**plain.key, "long": "windows"} and windowed.head_names == plain.head_names
    with pytest.raises(ExtractorError, match="long='sometimes'"):
        load_extractor("whisper-tiny.en", long="sometimes")


def test_windowed_forwards_only_what_it_means_to(extractors):
    _, windowed = extractors
    assert windowed.model is windowed.inner.model and windowed.tokenizer is windowed.inner.tokenizer
    with pytest.raises(AttributeError):
        windowed.encoder_sites  # noqa: B018  (Whisper internals are not forwarded)
    with pytest.raises(AttributeError):
        windowed.build_inputs  # noqa: B018  (Whisper has no build_inputs: not an LALM)
