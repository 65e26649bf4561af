"""The reject option through the product: `calm fit --unknown`, `calm predict` ("unknown", --sets),
`calm.AudioClassifier(..., unknown=)` and `calm serve` (/predict, /predict/batch, /info), on tone
clips and a stand-in model (`tests.test_cli_eval`): fitted on "low" and "mid", a "high" tone is of
no known class."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import calm
from calm.methods import DEFAULTS
from tests.test_cli_errors import extract, fake_model, invoke, make_data  # noqa: F401 (a fixture)
from tests.test_cli_eval import FREQS, tone

torch.set_num_threads(1)


@pytest.fixture
def fitted(tmp_path):
    store = tmp_path / "store"
    res = extract(make_data(tmp_path / "data", classes=("low", "mid"), n=8), store)
    assert res.exit_code == 0, res.output
    out = tmp_path / "m.safetensors"
    res = invoke("fit", store, "--out", out, "--unknown", "0.8")
    assert res.exit_code == 0, res.output
    assert "reject option: accepts about 80 % of clips of the known classes; score centroid-z" in res.output
    known = [tone(tmp_path / "q" / f"{n}.wav", FREQS[n], 900 + i) for i, n in enumerate(("low", "mid"))]
    return out, known, tone(tmp_path / "q" / "high.wav", FREQS["high"], 999)


def test_fit_saves_the_option_and_predict_says_unknown(fitted, tmp_path):
    out, known, novel = fitted
    clf = calm.load(out)
    assert clf.unknown == 0.8 and clf.metadata_["params"]["unknown"] == 0.8
    assert np.isfinite(clf.reject_threshold_)
    rows_json = tmp_path / "p.json"
    res = invoke("predict", out, *known, novel, "--json", rows_json, "--csv", tmp_path / "p.csv")
    assert res.exit_code == 0, res.output
    rows = json.loads(rows_json.read_text())
    assert [r["label"] for r in rows] == ["low", "mid", "unknown"]
    assert "high.wav\tunknown\t" in res.output
    assert "calm predict: reject option: accepts about 80 %" in res.output and "centroid-z" in res.output
    assert all("set" not in r for r in rows)
    plain = invoke("fit", tmp_path / "store", "--out", tmp_path / "plain.safetensors")
    assert plain.exit_code == 0 and calm.load(tmp_path / "plain.safetensors").unknown is None


def test_predict_sets(fitted, tmp_path):
    out, known, novel = fitted
    rows_json, rows_csv = tmp_path / "p.json", tmp_path / "p.csv"
    res = invoke("predict", out, *known, novel, "--sets", "0.2", "--json", rows_json, "--csv", rows_csv)
    assert res.exit_code == 0, res.output
    rows = json.loads(rows_json.read_text())
    assert "low" in rows[0]["set"]
    assert "mid" in rows[1]["set"]
    assert "set" in rows_csv.read_text().splitlines()[0]
    assert invoke("predict", out, novel, "--sets", "1.5").exit_code == 2  # a usage error


def test_audio_classifier_passes_it_through(tmp_path):
    data = make_data(tmp_path / "data", classes=("low", "mid"), n=8)
    files = sorted(data.rglob("*.wav"))
    clf = calm.AudioClassifier("fake-tones", "calm", unknown=0.8).fit(files, [f.parent.name for f in files])
    assert clf.classifier_.unknown == 0.8
    novel = tone(tmp_path / "q" / "high.wav", FREQS["high"], 999)
    known = tone(tmp_path / "q" / "low.wav", FREQS["low"], 998)
    assert clf.predict([known, novel]).tolist() == ["low", "unknown"]
    assert calm.AudioClassifier("fake-tones", "calm").fit(files, [f.parent.name for f in files]).predict(
        [novel]
    ).tolist() != ["unknown"]


def test_serve_says_unknown_gives_sets_and_info(monkeypatch):
    httpx = pytest.importorskip("httpx")
    from calm import CALM
    from calm._calibration import ACCEPT_ALL
    from calm.inference import Predictor
    from calm.serve.app import create_app
    from tests.helpers.serve_app import LiveServer, ToneExtractor, wav_bytes

    rng = np.random.default_rng(0)
    X = rng.random((12, 2, 4)).astype(np.float32) + 0.1
    clf = CALM(k=2, unknown=0.9).fit(X, np.array(["low", "high"] * 6))
    monkeypatch.setattr(clf, "reject_threshold_", 1e6)  # every clip rejected: the plumbing
    audio = {"content": wav_bytes(), "headers": {"Content-Type": "audio/wav"}, "timeout": 30}
    with LiveServer(create_app(Predictor(clf, ToneExtractor()))) as live:
        info = httpx.get(live.url + "/info").json()
        assert info["calibrated"] is True
        assert info["reject"]["accept_rate"] == 0.9 and info["reject"]["label"] == "unknown"
        assert info["reject"]["threshold"] == 1e6 and info["reject"]["active"] is True
        assert (
            info["reject"]["score"] == DEFAULTS["unknown_score"]
            and "centroid" in info["reject"]["score_description"]
        )
        r = httpx.post(live.url + "/predict", **audio)
        assert r.status_code == 200, r.text
        assert r.json()["label"] == "unknown" and "prediction_set" not in r.json()
        assert r.json()["top_k"][0]["label"] in ("low", "high")
        r = httpx.post(live.url + "/predict", params={"alpha": 0.1}, **audio)
        assert isinstance(r.json()["prediction_set"], list)
        batch = httpx.post(
            live.url + "/predict/batch",
            params={"alpha": 0.5},
            files=[("files", ("a.wav", wav_bytes())), ("files", ("b.wav", wav_bytes()))],
            timeout=30,
        ).json()["results"]
        assert [x["label"] for x in batch] == ["unknown", "unknown"]
        assert all(isinstance(x["prediction_set"], list) for x in batch)
        assert httpx.post(live.url + "/predict", params={"alpha": 1.5}, **audio).status_code == 422
        monkeypatch.setattr(clf, "reject_threshold_", ACCEPT_ALL)
        assert httpx.post(live.url + "/predict", **audio).json()["label"] in ("low", "high")
        assert httpx.get(live.url + "/info").json()["reject"]["active"] is False
    with LiveServer(create_app(Predictor(CALM(k=2).fit(X, ["a", "b"] * 6), ToneExtractor()))) as live:
        assert httpx.get(live.url + "/info").json()["reject"] is None


def test_fit_store_refuses_a_parameter_the_method_has_not(tmp_path):
    from calm.evaluate.episodes import ProtocolError
    from calm.evaluate.fitting import fit_store

    store = tmp_path / "store"
    assert extract(make_data(tmp_path / "data", classes=("low", "mid"), n=4), store).exit_code == 0
    with pytest.raises(ProtocolError, match="sav has no parameter C$"):
        fit_store(store, method="sav", params={"C": 2.0})


def test_fit_gives_auto_the_reject_option(tmp_path):
    store = tmp_path / "store"
    assert extract(make_data(tmp_path / "data", classes=("low", "mid"), n=4), store).exit_code == 0
    out = tmp_path / "m.safetensors"
    res = invoke("fit", store, "--method", "auto", "--out", out, "--unknown", "0.9")
    assert res.exit_code == 0 and "reject option" in res.output, res.output
    assert calm.load(out).unknown == 0.9


def test_fit_takes_the_score_by_name(tmp_path):
    store = tmp_path / "store"
    assert extract(make_data(tmp_path / "data", classes=("low", "mid"), n=8), store).exit_code == 0
    out = tmp_path / "m.safetensors"
    res = invoke("fit", store, "--out", out, "--unknown", "0.8", "--unknown-score", "top-proba")
    assert res.exit_code == 0, res.output
    assert "score top-proba (log-odds of the calibrated top probability)" in res.output
    assert calm.load(out).unknown_score == "top-proba"
    assert invoke("fit", store, "--out", out, "--unknown", "0.8", "--unknown-score", "energy").exit_code == 2
    alone = invoke("fit", store, "--out", tmp_path / "n.safetensors", "--unknown-score", "top-proba")
    assert alone.exit_code == 2 and "give --unknown too" in alone.output  # not ignored in silence
    assert not (tmp_path / "n.safetensors").exists()


def test_audio_classifier_says_which_score_rejects(tmp_path):
    data = make_data(tmp_path / "data", classes=("low", "mid"), n=8)
    files = sorted(data.rglob("*.wav"))
    labels = [f.parent.name for f in files]
    clf = calm.AudioClassifier("fake-tones", "calm", unknown=0.8, unknown_score="top-proba").fit(
        files, labels
    )
    assert clf.reject_option_["score"] == "top-proba" and clf.reject_option_["accept_rate"] == 0.8
    assert calm.AudioClassifier("fake-tones", "calm").fit(files, labels).reject_option_ is None
