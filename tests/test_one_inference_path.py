"""One model description, one key check, one inference path, one raw-audio validation.

`AudioClassifier`, `calm predict` and `calm serve`'s app load the model a classifier file describes
(`LoadSpec.from_metadata`) and label clips through the same pipeline (`calm.inference.Predictor`),
whose single validation (`calm.audio_inputs`) refuses the same clips with the same message. A
stand-in model (band energies at 16 kHz) keeps most of these fast; the windowed round trip runs
the embedded whisper-tiny.en.
"""

from __future__ import annotations

import math
import re
import warnings
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from click.testing import CliRunner

import calm.audio_inputs
from calm.audio_classifier import AudioClassifier, ClipWarning
from calm.audio_inputs import ClipError
from calm.cli import main
from calm.clip_features import FeaturePipeline
from calm.inference import load_predictor
from calm.models import MODELS, register_model
from calm.models.base import Extractor, HeadName
from calm.models.spec import LoadSpec, ModelMismatchError, check_key

SR = 16000
SRC = Path(__file__).resolve().parents[1] / "src" / "calm"
TOO_SHORT = "too short (0.000 s; at least 0.1 s needed)"


class Bands16k(Extractor):
    """6 "heads" x 4 dims of log band energies of 16 kHz audio, a 30 s window like Whisper's (the
    default `load_input`, so `long="windows"` wraps it as it wraps Whisper)."""

    sample_rate = SR
    max_seconds = 30.0
    head_names = [HeadName(layer, head, "decoder") for layer in range(2) for head in range(3)]

    def __init__(self, spec: LoadSpec):
        self.model_id = spec.label
        self.extracted: list[int] = []

    @property
    def key(self) -> dict:
        return {"model": self.model_id, "revision": "r1", "prompt": None, "heads": "all", "options": {}}

    def extract(self, inputs):
        self.extracted += [np.shape(x)[-1] for x in inputs]
        spectra = [np.abs(np.fft.rfft(np.atleast_2d(x)[0], n=2048))[:960] for x in inputs]
        return np.stack([np.log1p(s.reshape(24, -1).sum(1)).reshape(6, 4) for s in spectra]).astype(
            np.float32
        )


def load_bands16k(spec):
    return Bands16k(spec)


@pytest.fixture(autouse=True)
def fake_model():
    register_model("fake-bands16k", None, "tests.test_one_inference_path:load_bands16k")
    yield
    MODELS.pop("fake-bands16k", None)


def tone(freq: float, seconds: float = 0.5, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * SR)) / SR
    x = np.sin(2 * np.pi * freq * (1 + 0.03 * rng.standard_normal()) * t) + 0.05 * rng.standard_normal(len(t))
    return (0.3 * x / np.abs(x).max()).astype(np.float32)


@pytest.fixture
def fitted() -> AudioClassifier:
    waves = [tone(f, seed=i) for i, f in enumerate([300, 300, 300, 2000, 2000, 2000])]
    clf = AudioClassifier("fake-bands16k", "sav", device="cpu", k=3)
    return clf.fit(waves, ["low"] * 3 + ["high"] * 3, sample_rate=SR)


# -- one description of a model -------------------------------------------------------------------


def test_a_load_spec_round_trips_through_classifier_metadata():
    spec = LoadSpec.from_options(
        "some/model",
        {"long": "windows", "attn_implementation": "eager", "dtype": "bf16", "encoder_length": "clip"},
        prompt="What is it?",
        layers=[0, 2],
        heads="decoder",
        revision="abc",
    )
    assert spec.options == {"encoder_length": "clip"} and spec.long == "windows"
    assert spec.dtype is torch.bfloat16 and spec.attn_implementation == "eager"
    assert LoadSpec.from_metadata(spec.to_metadata()) == spec
    # another kind of device: its own default dtype; the rest as fitted
    on_gpu = LoadSpec.from_metadata({**spec.to_metadata(), "device": "cuda"})
    assert on_gpu.dtype == torch.float32 and on_gpu.long == "windows" and on_gpu.layers == (0, 2)
    # an older AudioClassifier file: the load options in `model_options`
    old = {"model": "m", "model_options": {"long": "windows", "encoder_length": "clip", "prompt": "p"}}
    assert LoadSpec.from_metadata(old) == LoadSpec(
        "m", long="windows", prompt="p", options={"encoder_length": "clip"}
    )
    with pytest.raises(ModelMismatchError, match="names no model"):
        LoadSpec.from_metadata({"method": "calm"})


def test_one_key_check_refuses_another_model_saying_how_to_refit(fitted, tmp_path):
    stored = {"extraction_key": {"extractor": fitted.extraction_key_}}
    check_key(stored, {**fitted.extraction_key_, "dtype": "bfloat16"}, model="fake-bands16k")  # dtype aside
    with pytest.raises(ModelMismatchError, match=r"long: fitted on None, now 'windows'.*calm fit STORE"):
        check_key(stored, {**fitted.extraction_key_, "long": "windows"}, model="fake-bands16k")
    fitted.model_options = {"long": "windows"}  # the same classifier asked to run another model
    with pytest.raises(ModelMismatchError):
        fitted.predict([(tone(300), SR)])


def test_only_one_clip_error_and_one_key_check_remain_in_src():
    text = {p: p.read_text() for p in SRC.rglob("*.py")}
    clip_errors = [p for p, t in text.items() if re.search(r"^class ClipError\b", t, re.M)]
    key_checks = [p for p, t in text.items() if re.search(r"^def (_?check_(extraction_)?key)\b", t, re.M)]
    assert [p.name for p in clip_errors] == ["audio_inputs.py"]
    assert [p.name for p in key_checks] == ["spec.py"]
    assert not any(
        re.search(r"\b(ExtractorChoice|ExtractorRecipe|class ModelSpec)\b", t) for t in text.values()
    )


# -- one validation of raw audio (issue 23, item 4) -----------------------------------------------


def test_a_long_array_is_cut_to_the_window_before_it_is_resampled(monkeypatch):
    seen: list[int] = []
    real = calm.audio_inputs.resample
    monkeypatch.setattr(calm.audio_inputs, "resample", lambda x, a, b: seen.append(len(x)) or real(x, a, b))
    pipeline = FeaturePipeline(Bands16k(LoadSpec("fake-bands16k")))
    ten_minutes = np.tile(tone(300, seconds=1.0)[:8000], 1200)  # 600 s at 8 kHz
    clip = pipeline.preprocess((ten_minutes, 8000))
    assert seen == [30 * 8000 + 1] and clip.waveform.shape == (30 * SR,)
    seen.clear()
    for rate in (1, 1.0):  # (w[:32000], 1) took 2.8 GB; 200,000 samples at 1 Hz ~12.8 GB
        with pytest.raises(ClipError, match=r"X: sample rate 1 Hz is outside 1000\.\.384000 Hz"):
            pipeline.preprocess((np.ones(200_000, np.float32), rate), name="X")
    assert seen == []  # refused before any resampling


@pytest.mark.parametrize(
    ("rate", "reason"),
    [
        (True, "sample rate True is not an integer number of Hz"),
        (np.bool_(True), "sample rate True is not an integer number of Hz"),
        (float("nan"), "sample rate nan is not an integer number of Hz"),
        (16000.5, "sample rate 16000.5 is not an integer number of Hz"),
        ("16000", "sample rate '16000' is not an integer number of Hz"),
        (10**12, "sample rate 1000000000000 Hz is outside 1000..384000 Hz"),
        (0, "sample rate 0 Hz is outside 1000..384000 Hz"),
    ],
)
def test_a_declared_rate_must_be_an_integer_in_a_sane_range(rate, reason):
    pipeline = FeaturePipeline(Bands16k(LoadSpec("fake-bands16k")))
    with pytest.raises(ClipError) as caught:
        pipeline.preprocess((tone(300), rate), name="clip")
    assert caught.value.reason.startswith(reason.split(" is ")[0]) and str(caught.value) == f"clip: {reason}"


def test_a_nan_rate_with_errors_skip_skips_that_clip_only(fitted):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        labels = fitted.predict(
            [
                (tone(2000, seed=9), float("nan")),
                (tone(300, seed=8), SR),
                (tone(300), 10**12),
                (tone(300), True),
            ],
            errors="skip",
        )
        proba = fitted.predict_proba([(tone(300), float("nan")), (tone(2000, seed=7), SR)], errors="skip")
    assert list(labels) == [None, "low", None, None]
    assert np.isnan(proba[0]).all() and np.isclose(proba[1].sum(), 1)
    message = next(str(w.message) for w in caught if issubclass(w.category, ClipWarning))
    assert "X[0]: sample rate nan is not an integer number of Hz" in message
    with pytest.raises(ClipError, match=r"X\[0\]: sample rate nan"):
        fitted.predict([(tone(300), float("nan"))])


def test_a_5_sample_clip_is_refused_by_all_three_front_ends_with_the_same_message(fitted, tmp_path):
    from fastapi.testclient import TestClient

    from calm.serve import create_app

    tiny = tone(300)[:5]
    sf.write(tmp_path / "tiny.wav", tiny, SR)
    model = tmp_path / "m.safetensors"
    fitted.save(model)
    with pytest.raises(ClipError) as caught:
        fitted.predict([(tiny, SR)])
    assert caught.value.reason == TOO_SHORT
    res = CliRunner().invoke(main, ["predict", str(model), str(tmp_path / "tiny.wav")])
    assert res.exit_code == 1 and f"\tERROR\t{TOO_SHORT}" in res.output
    with TestClient(create_app(load_predictor(model))) as client:
        answer = client.post(
            "/predict", content=(tmp_path / "tiny.wav").read_bytes(), headers={"Content-Type": "audio/wav"}
        )
    assert answer.status_code == 422 and answer.json()["error"]["message"] == f"body: {TOO_SHORT}"


def test_audio_classifier_calm_predict_and_serve_give_the_same_answer(fitted, tmp_path):
    from fastapi.testclient import TestClient

    from calm.serve import create_app

    files = []
    for i, f in enumerate([300, 2000, 310, 1900]):
        files.append(tmp_path / f"q{i}.wav")
        sf.write(files[-1], tone(f, seed=40 + i), SR)
    model = tmp_path / "m.safetensors"
    fitted.save(model)
    loaded = AudioClassifier.load(model, device="cpu")
    predictor = load_predictor(model)
    assert loaded._get_extractor().key == predictor.extractor.key == fitted.extraction_key_
    want = [p.label for p in predictor(files)]
    assert (
        want == ["low", "high", "low", "high"] == list(loaded.predict(files)) == list(fitted.predict(files))
    )
    arrays = [(sf.read(f, dtype="float32")[0], SR) for f in files]
    assert list(loaded.predict(arrays)) == want
    with TestClient(create_app(predictor)) as client:
        served = [
            client.post("/predict", content=f.read_bytes(), headers={"Content-Type": "audio/wav"}).json()[
                "label"
            ]
            for f in files
        ]
    assert served == want


# -- a windowed store, end to end with the embedded model ------------------------------------------


@pytest.mark.slow
def test_a_classifier_fitted_on_a_windowed_store_loads_the_same_model_everywhere(tmp_path):
    """`calm extract -o long=windows` -> `calm fit` -> `AudioClassifier.load`, `calm predict`,
    `create_app`: one model (the same key, windows included), the same labels."""
    from fastapi.testclient import TestClient

    from calm.serve import create_app

    data = tmp_path / "data"
    for label, freq in (("low", 250.0), ("high", 3000.0)):
        (data / label).mkdir(parents=True)
        for i in range(3):
            sf.write(data / label / f"{label}{i}.wav", tone(freq, seconds=0.6, seed=i), SR)
    store, model = tmp_path / "store", tmp_path / "m.safetensors"
    options = ["-o", "long=windows", "-o", "encoder_length=clip"]
    run = CliRunner().invoke
    res = run(main, ["extract", "--data", f"folder:{data}", "--out", str(store), *options, "--no-progress"])
    assert res.exit_code == 0, res.output
    res = run(main, ["fit", str(store), "--method", "sav", "--k", "5", "--out", str(model)])
    assert res.exit_code == 0, res.output
    files = sorted(data.glob("*/*.wav"))

    loaded = AudioClassifier.load(model, device="cpu")
    predictor = load_predictor(model)
    stored = loaded.extraction_key_
    assert stored["long"] == "windows" and loaded.model_spec().long == "windows"
    assert loaded._get_extractor().key == predictor.extractor.key == stored
    res = run(main, ["predict", str(model), *map(str, files), "--json", str(tmp_path / "p.json")])
    assert res.exit_code == 0, res.output
    assert (
        "loading model whisper-tiny.en (named by the classifier)" in res.output
        and '"long": "windows"' in res.output
    )
    import json

    cli = [r["label"] for r in json.loads((tmp_path / "p.json").read_text())]
    with TestClient(create_app(predictor)) as client:
        served = [
            client.post("/predict", content=f.read_bytes(), headers={"Content-Type": "audio/wav"}).json()[
                "label"
            ]
            for f in files
        ]
    assert cli == served == list(loaded.predict(files)) == [p.parent.name for p in files]
    assert not math.isnan(loaded.predict_proba(files).sum())
