"""Adding clips through the product (issue 25): `calm fit --keep-support` then `calm fit --add`
equals `calm fit` on all the clips; `calm.AudioClassifier.partial_fit` on waveforms equals `fit` on
all of them; the one-line refusals (no kept support, another model's key, options of a new fit).
On tone clips and the stand-in model of `tests.test_cli_eval`."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import soundfile as sf
import torch

import calm
from tests.test_cli_errors import extract, fake_model, invoke, make_data, one_error_line  # noqa: F401
from tests.test_cli_eval import FREQS, SR, tone

torch.set_num_threads(1)


def union_folder(root, *parts):
    """One dataset folder holding the files of ``parts`` (class folders), renamed to stay apart."""
    for i, part in enumerate(parts):
        for f in sorted(part.rglob("*.wav")):
            dest = root / f.parent.name / f"{i}-{f.name}"
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(f, dest)
    return root


def assert_same_classifier(a, b, X):
    assert a.classes_.tolist() == b.classes_.tolist()
    np.testing.assert_array_equal(a.class_counts_, b.class_counts_)
    np.testing.assert_allclose(a.centroids_, b.centroids_, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(a.heads_, b.heads_)
    np.testing.assert_allclose(a.weights_, b.weights_, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(a.temperature_, b.temperature_, rtol=1e-5)
    np.testing.assert_array_equal(a.predict(X), b.predict(X))
    np.testing.assert_allclose(a.predict_proba(X), b.predict_proba(X), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("method", ["calm", "sav"])
def test_fit_keep_support_then_add_equals_fit_on_all(tmp_path, method):
    old = make_data(tmp_path / "old", classes=("low", "mid"), n=4)
    new = tmp_path / "new"
    for i in range(3):  # more "low" clips and a new class
        tone(new / "low" / f"{i}.wav", FREQS["low"], 500 + i)
        tone(new / "high" / f"{i}.wav", FREQS["high"], 600 + i)
    assert extract(old, tmp_path / "store").exit_code == 0
    first = tmp_path / "first.safetensors"
    res = invoke("fit", tmp_path / "store", "--method", method, "--keep-support", "--out", first)
    assert res.exit_code == 0, res.output
    assert calm.load(first).support_features_.shape[0] == 8
    added = tmp_path / "added.safetensors"
    res = invoke("fit", "--add", first, "--data", f"folder:{new}", "--out", added)
    assert res.exit_code == 0, res.output
    assert f"added 6 clips to {first}: 14 clips, 3 classes -> {added}" in res.output
    both = union_folder(tmp_path / "all", old, new)
    assert extract(both, tmp_path / "store_all").exit_code == 0
    ref = tmp_path / "ref.safetensors"
    res = invoke("fit", tmp_path / "store_all", "--method", method, "--keep-support", "--out", ref)
    assert res.exit_code == 0, res.output
    a, b = calm.load(added), calm.load(ref)
    X, _, _ = calm.load_features(tmp_path / "store_all")
    X = np.asarray(X, dtype=np.float32)
    if method == "calm":
        assert_same_classifier(a, b, X)
    else:
        np.testing.assert_array_equal(a.heads_, b.heads_)
        np.testing.assert_array_equal(a.predict(X), b.predict(X))
        np.testing.assert_allclose(a.predict_proba(X), b.predict_proba(X), rtol=1e-5)
    assert a.metadata_["added"] == [{"data": f"folder:{new}", "clips": 6}] and a.metadata_["n_support"] == 14
    assert a.metadata_["extraction_key"] == calm.load(first).metadata_["extraction_key"]
    assert calm.load(first).classes_.tolist() == ["low", "mid"]  # the input file is unchanged
    # the added file predicts through `calm predict` like the reference
    query = tone(tmp_path / "q" / "high.wav", FREQS["high"], 999)
    for path in (added, ref):
        res = invoke("predict", path, query, "--json", tmp_path / "p.json")
        assert res.exit_code == 0, res.output
        assert json.loads((tmp_path / "p.json").read_text())[0]["label"] == "high"


def test_add_refuses_in_one_line(tmp_path):
    data = make_data(tmp_path / "data", classes=("low", "mid"), n=4)
    assert extract(data, tmp_path / "store").exit_code == 0
    plain = tmp_path / "plain.safetensors"
    assert invoke("fit", tmp_path / "store", "--out", plain).exit_code == 0
    res = invoke("fit", "--add", plain, "--data", f"folder:{data}", "--out", tmp_path / "x.safetensors")
    one_error_line(res, str(plain), "keeps no support set", "--keep-support")
    kept = tmp_path / "kept.safetensors"
    assert invoke("fit", tmp_path / "store", "--keep-support", "--out", kept).exit_code == 0
    auto = invoke("fit", tmp_path / "store", "--method", "auto", "--keep-support", "--out", tmp_path / "a.st")
    assert auto.exit_code == 0 and calm.load(tmp_path / "a.st").keep_support  # the chosen one keeps it
    # the features of another model (here: other heads) are refused before anything is added
    clf = calm.load(kept)
    meta = json.loads(json.dumps(clf.metadata_))
    meta["extraction_key"]["extractor"]["prompt"] = "another prompt"
    other = tmp_path / "other.safetensors"
    clf.save(other, metadata=meta)
    res = invoke("fit", "--add", other, "--data", f"folder:{data}", "--out", tmp_path / "x.safetensors")
    one_error_line(res, "gives different features", "prompt")
    assert not (tmp_path / "x.safetensors").exists()
    # usage: the method and its options come from the file; STORE or --add, not both
    for extra in (["--method", "sav"], ["--k", "3"], ["--unknown", "0.9"], [str(tmp_path / "store")]):
        res = invoke(
            "fit", "--add", kept, "--data", f"folder:{data}", "--out", tmp_path / "x.safetensors", *extra
        )
        assert res.exit_code == 2 and "--add MODEL.safetensors takes --data" in res.output, res.output
    assert invoke("fit", "--add", kept, "--out", tmp_path / "x.safetensors").exit_code == 2
    assert invoke("fit", "--out", tmp_path / "x.safetensors").exit_code == 2
    res = invoke("fit", tmp_path / "store", "--data", f"folder:{data}", "--out", tmp_path / "x.safetensors")
    assert res.exit_code == 2 and "--data goes with --add" in res.output
    # an unreadable clip: nothing is written, the input is unchanged
    bad = make_data(tmp_path / "bad", classes=("low",), n=1)
    (bad / "low" / "broken.wav").write_bytes(b"not audio")
    res = invoke("fit", "--add", kept, "--data", f"folder:{bad}", "--out", kept)
    assert res.exit_code == 1 and "broken.wav" in res.output, res.output
    assert calm.load(kept).support_features_.shape[0] == 8


def test_audio_classifier_partial_fit_on_waveforms_equals_fit_on_all(tmp_path):
    rng = np.random.default_rng(0)
    sr = SR

    def wave(freq):
        t = np.arange(sr // 4) / sr
        return (0.3 * np.sin(2 * np.pi * freq * (1 + 0.05 * rng.standard_normal()) * t)).astype(np.float32)

    names = ["low", "mid"] * 3 + ["high", "low", "high"]
    waves = [wave(FREQS[n]) for n in names]
    clf = calm.AudioClassifier("fake-tones", "calm", keep_support=True, k=2)
    clf.fit(waves[:6], names[:6], sample_rate=sr)
    assert clf.partial_fit(waves[6:], names[6:], sample_rate=sr) is clf
    ref = calm.AudioClassifier("fake-tones", "calm", keep_support=True, k=2).fit(waves, names, sample_rate=sr)
    assert clf.classes_.tolist() == ["high", "low", "mid"] and clf.n_support_ == 9
    X = clf._features(waves, sr)
    assert_same_classifier(clf.classifier_, ref.classifier_, X)
    np.testing.assert_array_equal(clf.predict(waves, sample_rate=sr), ref.predict(waves, sample_rate=sr))
    # saved and loaded: partial_fit goes on from the file; the file keeps its model
    clf.save(tmp_path / "m.safetensors")
    loaded = calm.AudioClassifier.load(tmp_path / "m.safetensors")
    sf.write(tmp_path / "extra.wav", wave(FREQS["mid"]), sr)
    loaded.partial_fit([tmp_path / "extra.wav"], ["mid"])
    assert loaded.n_support_ == 10 and loaded.classifier_.class_counts_.tolist() == [2, 4, 4]
    plain = calm.AudioClassifier("fake-tones", "calm", k=2).fit(waves, names, sample_rate=sr)
    with pytest.raises(ValueError, match="fit with keep_support=True"):
        plain.partial_fit(waves[:1], names[:1], sample_rate=sr)
    with pytest.raises(ValueError, match="one label per clip"):
        clf.partial_fit(waves[:2], names[:1], sample_rate=sr)
