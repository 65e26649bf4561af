"""`calm predict` and `calm.inference`: a row per clip, per-clip errors, exit status, --model.

A stand-in model (band energies of the spectrum) keeps these fast; it gives NaN features for a
clip that clips at full scale, the crafted input standing for a model that overflows.
"""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from click.testing import CliRunner

from calm import CALM
from calm.cli import main
from calm.inference import ModelMismatchError, Predictor, load_predictor
from calm.models import MODELS, register_model
from calm.models.base import HeadName

SR = 8000
FREQS = {"low": 300.0, "mid": 900.0, "high": 2100.0}


class BandExtractor:
    """6 "heads" x 4 dims of log band energies; NaN for a clip whose peak reaches full scale."""

    sample_rate = SR
    max_seconds = None
    head_names = [HeadName(layer, head, "decoder") for layer in range(2) for head in range(3)]

    def __init__(self, model_id="fake-bands", revision="r1", prompt=None, heads="all", **_):
        self.model_id, self.revision, self.prompt, self.heads = model_id, revision, prompt, heads
        self.batches: list[int] = []

    @property
    def key(self) -> dict:
        return {"model": self.model_id, "revision": self.revision, "prompt": self.prompt, "heads": self.heads}

    def load_input(self, path):
        x, sr = sf.read(path, dtype="float32")
        if sr != SR:
            raise ValueError(f"{path}: rate {sr}")
        return x

    def extract(self, inputs):
        self.batches.append(len(inputs))
        out = []
        for x in inputs:
            bands = np.log1p(np.abs(np.fft.rfft(x, n=2048))[:960].reshape(24, -1).sum(1)).reshape(6, 4)
            out.append(np.full_like(bands, np.nan) if np.abs(x).max() >= 0.999 else bands)
        return np.stack(out).astype(np.float32)


@pytest.fixture(autouse=True)
def fake_models():
    names = {
        "fake-bands": "tests.test_predict:load_bands",
        "fake-bands-copy": "tests.test_predict:load_bands_copy",
        "fake-other": "tests.test_predict:load_other",
    }
    for name, loader in names.items():
        register_model(name, None, loader)
    yield
    for name in names:
        MODELS.pop(name, None)


def load_bands(spec):
    return BandExtractor(prompt=spec.prompt, heads=spec.heads)


def load_bands_copy(spec):  # the same weights under another name (same revision)
    return BandExtractor(model_id="fake-bands-copy", prompt=spec.prompt, heads=spec.heads)


def load_other(spec):
    return BandExtractor(model_id="fake-other", revision="r2", prompt=spec.prompt, heads=spec.heads)


def tone(path: Path, freq: float, seed: int, peak: float = 0.35) -> Path:
    rng = np.random.default_rng(seed)
    t = np.arange(int(0.25 * SR)) / SR
    x = np.sin(2 * np.pi * freq * (1 + 0.05 * rng.standard_normal()) * t) + 0.1 * rng.standard_normal(len(t))
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(path, (peak * x / np.abs(x).max()).astype(np.float32), SR)
    return path


@pytest.fixture
def model(tmp_path) -> Path:
    ext = BandExtractor()
    clips = [
        (tone(tmp_path / "fit" / f"{n}{i}.wav", f, 10 * c + i), n)
        for c, (n, f) in enumerate(FREQS.items())
        for i in range(3)
    ]
    X = ext.extract([ext.load_input(p) for p, _ in clips])
    clf = CALM(k=4).fit(X, [n for _, n in clips])
    path = tmp_path / "model.safetensors"
    clf.save(path, metadata={"model": "fake-bands", "heads": "all", "extraction_key": {"extractor": ext.key}})
    return path


def queries(tmp_path: Path) -> list[Path]:
    return [tone(tmp_path / "q" / f"{n}.wav", f, 500 + i) for i, (n, f) in enumerate(FREQS.items())]


def test_every_clip_gets_a_row_and_the_exit_status_says_some_failed(tmp_path, model):
    good = queries(tmp_path)
    broken = tmp_path / "q" / "broken.wav"
    broken.write_bytes(b"not audio at all")
    loud = tone(tmp_path / "q" / "loud.wav", 900.0, 7, peak=1.0)  # NaN features
    files = [good[0], broken, good[1], loud, tmp_path / "q" / "missing.wav", good[2]]
    out_csv, out_json = tmp_path / "p.csv", tmp_path / "p.json"
    args = ["predict", str(model), *map(str, files), "--csv", str(out_csv), "--json", str(out_json)]
    res = CliRunner().invoke(main, [*args, "--batch-size", "2"])
    assert res.exit_code == 1, res.output
    assert "loading model fake-bands (named by the classifier)" in res.output
    assert "3 of 6 files failed" in res.output
    rows = json.loads(out_json.read_text())
    assert [r["path"] for r in rows] == list(map(str, files))
    assert [r["label"] for r in rows] == ["low", None, "mid", None, None, "high"]
    assert "non-finite features" in rows[3]["error"] and "missing.wav" in rows[4]["error"]
    assert rows[1]["error"] and all(0 < r["probability"] <= 1 for r in rows if r["label"])
    assert [r["label"] or "" for r in csv.DictReader(out_csv.open())] == ["low", "", "mid", "", "", "high"]
    assert "loud.wav\tERROR\tnon-finite features" in res.output
    ok = CliRunner().invoke(main, ["predict", str(model), *map(str, good), "--json", str(out_json)])
    assert ok.exit_code == 0, ok.output
    assert [r["label"] for r in json.loads(out_json.read_text())] == list(FREQS)


def test_model_override_and_a_different_model_refused_with_how_to_refit(tmp_path, model):
    q = str(queries(tmp_path)[0])
    same = CliRunner().invoke(main, ["predict", str(model), q, "--model", "fake-bands-copy"])
    assert same.exit_code == 0, same.output
    assert "loading model fake-bands-copy (given with --model)" in same.output and "\tlow\t" in same.output
    other = CliRunner().invoke(main, ["predict", str(model), q, "--model", "fake-other"])
    assert other.exit_code == 1 and "Traceback" not in other.output
    assert "revision: fitted on 'r1', now 'r2'" in other.output
    assert "calm extract --model fake-other" in other.output and "calm fit STORE" in other.output
    with pytest.raises(ModelMismatchError, match="Refit"):
        load_predictor(model, model="fake-other")


def test_a_classifier_naming_no_model_is_refused(tmp_path, model):
    import calm

    bare = tmp_path / "bare.safetensors"
    calm.load(model).save(bare, metadata={"method": "calm"})
    res = CliRunner().invoke(main, ["predict", str(bare), str(queries(tmp_path)[0])])
    assert res.exit_code == 1 and "names no model" in res.output and "Traceback" not in res.output


def test_forward_isolates_a_failing_clip_from_its_batch(tmp_path, model):
    import calm

    class Fragile(BandExtractor):
        def extract(self, inputs):
            if any(len(x) == 100 for x in inputs):
                raise RuntimeError("boom")
            return super().extract(inputs)

    ext = Fragile()
    pred = Predictor(calm.load(model), ext)
    waves = [ext.load_input(p) for p in queries(tmp_path)]
    alone = [pred.forward([w])[0] for w in waves]
    mixed = pred.forward([waves[0], np.ones(100, np.float32), waves[1], np.ones(SR, np.float32), waves[2]])
    assert mixed[1].startswith("model error: RuntimeError: boom") and mixed[3].startswith("non-finite")
    for got, want in zip([mixed[0], mixed[2], mixed[4]], alone, strict=True):
        np.testing.assert_allclose(got, want, atol=1e-7)
    top = pred.postprocess(pred.preprocess(queries(tmp_path)[1]), mixed[2], top_k=5)
    assert top.label == "mid" and len(top.top_k) == 3 and abs(sum(p for _, p in top.top_k) - 1) < 1e-6
    with pytest.raises(ValueError, match="too short"):
        sf.write(tmp_path / "tiny.wav", np.full(40, 0.5, np.float32), SR)
        pred.preprocess(tmp_path / "tiny.wav")


def test_a_file_name_that_is_not_utf8_gets_its_row_byte_for_byte(tmp_path, model):
    src = queries(tmp_path)[0]
    odd = os.path.join(os.fsencode(tmp_path), b"caf\xe9.wav")
    os.link(src, odd)
    out = tmp_path / "p.csv"
    res = CliRunner().invoke(main, ["predict", str(model), os.fsdecode(odd), "--csv", str(out)])
    assert res.exit_code in (0, 1) and "Traceback" not in res.output  # labelled, or its own error
    rows = out.read_bytes().splitlines()
    assert len(rows) == 2 and b"caf\xe9.wav" in rows[1]


@pytest.mark.parametrize("nested", [True, False])
def test_calm_fit_metadata_keeps_the_key_that_predict_checks(nested):
    from types import SimpleNamespace

    from calm.evaluate.fitting import store_metadata
    from calm.models.spec import check_key

    fitted = BandExtractor()
    key = {"dtype": "float16", "extractor": fitted.key} if nested else dict(fitted.key)
    meta = SimpleNamespace(attrs={"key": key, "head_names": []})
    metadata = store_metadata(meta)
    assert metadata["extraction_key"]["extractor"] == fitted.key and metadata["model"] == "fake-bands"
    check_key(metadata, BandExtractor().key, model="fake-bands")  # same model: accepted
    other = BandExtractor(model_id="fake-other", revision="r2")
    with pytest.raises(ModelMismatchError, match="revision: fitted on 'r1', now 'r2'"):
        check_key(metadata, other.key, model="fake-other", override=True)


def test_a_classifier_fitted_on_windowed_features_is_served_with_windows():
    from calm.models.spec import LoadSpec

    key = {"model": "whisper-tiny.en", "revision": "r", "options": {}, "long": "windows"}
    metadata = {"model": "whisper-tiny.en", "extraction_key": {"extractor": key}, "options": {}}
    assert LoadSpec.from_metadata(metadata).long == "windows"  # files written before `long` was a field
    del key["long"]
    assert LoadSpec.from_metadata(metadata).long == "truncate"
    assert LoadSpec.from_metadata({**metadata, "long": "windows"}).load_kwargs()["long"] == "windows"


@pytest.mark.slow
def test_extract_fit_predict_round_trip_keeps_the_extraction_options(tmp_path):
    """`calm extract -o long=windows -o encoder_length=clip` -> `calm fit` -> `calm predict`: the
    classifier file carries the full key, and predict rebuilds the same extractor (the key check
    would refuse any other)."""
    import shutil

    from tests.helpers import shared_data

    root = shared_data() / "speech_commands_mini"
    if not root.is_dir():
        pytest.skip(f"real speech_commands_mini audio not found at {root} (set CALM_TEST_DATA)")
    data = tmp_path / "data"
    for word in ("yes", "no"):
        (data / word).mkdir(parents=True)
        for f in sorted((root / word).glob("*.wav"))[:3]:
            shutil.copy(f, data / word / f.name)
    store, model = tmp_path / "store", tmp_path / "m.safetensors"
    options = ["-o", "long=windows", "-o", "encoder_length=clip"]
    run = CliRunner().invoke
    res = run(main, ["extract", "--data", f"folder:{data}", "--out", str(store), *options, "--no-progress"])
    assert res.exit_code == 0, res.output
    res = run(main, ["fit", str(store), "--out", str(model)])
    assert res.exit_code == 0, res.output
    import calm

    stored = calm.load(model).metadata_["extraction_key"]["extractor"]
    assert stored["long"] == "windows" and stored["options"]["encoder_length"] == "clip"
    queries = [str(p) for p in sorted(data.glob("*/*.wav"))]
    res = run(main, ["predict", str(model), *queries, "--json", str(tmp_path / "p.json")])
    assert res.exit_code == 0, res.output
    rows = json.loads((tmp_path / "p.json").read_text())
    assert [r["label"] for r in rows] == ["no"] * 3 + ["yes"] * 3  # its own support clips
