"""Why a clip got its label, through the product: `calm predict --json --explain`,
`calm.AudioClassifier.explain`, `calm.AutoHead.explain` and `calm serve` (`?explain=true&top=`), all
one function (`calm.inference.Predictor.explanation`); tone clips and a stand-in model
(`tests.test_cli_eval`)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import calm
from calm.classifiers.auto import AutoHead
from calm.methods import EXPLAIN_HEADS
from tests.test_cli_errors import extract, fake_model, invoke, make_data  # noqa: F401 (a fixture)
from tests.test_cli_eval import FREQS, tone

torch.set_num_threads(1)


@pytest.fixture
def fitted(tmp_path):
    store = tmp_path / "store"
    res = extract(make_data(tmp_path / "data", classes=("low", "mid", "high"), n=4), store)
    assert res.exit_code == 0, res.output
    out = tmp_path / "m.safetensors"
    assert invoke("fit", store, "--out", out).exit_code == 0
    queries = [tone(tmp_path / "q" / f"{n}.wav", FREQS[n], 900 + i) for i, n in enumerate(("low", "mid"))]
    return out, queries


def _check_heads(heads: list[dict], n: int, names: set) -> None:
    assert 0 < len(heads) <= n
    parts = [h["contribution"] for h in heads]
    assert parts == sorted(parts, reverse=True) and all(p > 0 for p in parts)
    for h in heads:
        assert (h["layer"], h["index"], h["source"]) in names
        assert -1 - 1e-9 <= h["similarity"] <= 1 + 1e-9 and h["weight"] > 0


def test_predict_json_explains_the_top_classes_with_the_models_head_names(fitted, tmp_path):
    out, queries = fitted
    names = {tuple(h) for h in calm.load(out).metadata_["head_names"]}
    rows_json = tmp_path / "p.json"
    res = invoke("predict", out, *queries, "--json", rows_json, "--explain", "2", "--top-k", "2")
    assert res.exit_code == 0, res.output
    rows = json.loads(rows_json.read_text())
    for row, want in zip(rows, ("low", "mid"), strict=True):
        why = row["explanation"]
        assert row["label"] == want == why["prediction"] == why["classes"][0]["label"]
        assert (
            len(why["classes"]) == 2 and why["classes"][0]["probability"] >= why["classes"][1]["probability"]
        )
        assert abs(why["classes"][0]["probability"] - row["probability"]) < 1e-9
        for c in why["classes"]:
            _check_heads(c["heads"], 2, names)
    res = invoke("predict", out, queries[0], "--json", rows_json, "--explain")  # N defaults
    assert res.exit_code == 0, res.output
    (row,) = json.loads(rows_json.read_text())
    assert [c["label"] for c in row["explanation"]["classes"]] == ["low"]
    assert 0 < len(row["explanation"]["classes"][0]["heads"]) <= EXPLAIN_HEADS
    plain = invoke("predict", out, queries[0], "--json", rows_json)
    assert plain.exit_code == 0 and "explanation" not in json.loads(rows_json.read_text())[0]
    no_json = invoke("predict", out, queries[0], "--explain", "3")
    assert no_json.exit_code == 2 and "--explain writes its explanations to the --json file" in no_json.output


def test_audio_classifier_and_auto_explain(tmp_path):
    data = make_data(tmp_path / "data", classes=("low", "mid"), n=4)
    files = sorted(data.rglob("*.wav"))
    labels = [f.parent.name for f in files]
    clf = calm.AudioClassifier("fake-tones", "calm").fit(files, labels)
    query = tone(tmp_path / "q" / "mid.wav", FREQS["mid"], 998)
    (why,) = clf.explain([query], top=3)
    assert why["prediction"] == clf.predict([query])[0] == why["classes"][0]["label"]
    assert [c["label"] for c in why["classes"]] == ["mid", "low"]  # every class, most probable first
    names = {tuple(h) for h in clf.head_names_}  # the model's names, though classifier_ has no metadata
    assert not clf.classifier_.metadata_.get("head_names")
    _check_heads(why["classes"][0]["heads"], 3, names)
    auto = calm.AudioClassifier("fake-tones", "auto").fit(files, labels)
    (why,) = auto.explain([query])
    assert why["prediction"] == "mid" and why["classes"][0]["heads"]
    assert auto.selection_["chosen"] and not isinstance(auto.classifier_, AutoHead)  # the one it chose
    X = np.random.default_rng(0).random((8, 4, 3)).astype(np.float32)
    head = AutoHead().fit(X, ["a", "b"] * 4)
    assert head.explain(X[:2]) == head.estimator_.explain(X[:2])


def test_a_classifier_without_explain_is_refused_in_one_line():
    from calm.errors import ParameterError
    from calm.inference import Predictor
    from tests.helpers.serve_app import ToneExtractor

    class Plain:
        classes_ = np.array(["a", "b"])
        n_heads_ = 2

        def predict_proba(self, X):
            return np.full((len(X), 2), 0.5)

    predictor = Predictor(Plain(), ToneExtractor())
    with pytest.raises(
        ParameterError, match=r"^explain: a Plain classifier cannot say why a clip got its label$"
    ):
        predictor.explanation(np.zeros((2, 4)), ["a"], 3)
    httpx = pytest.importorskip("httpx")
    from calm.serve.app import create_app
    from tests.helpers.serve_app import LiveServer, wav_bytes

    audio = {"content": wav_bytes(), "headers": {"Content-Type": "audio/wav"}, "timeout": 30}
    with LiveServer(create_app(predictor)) as live:
        assert httpx.post(live.url + "/predict", **audio).json()["label"] == "a"
        r = httpx.post(live.url + "/predict", params={"explain": "true"}, **audio)
        assert r.status_code == 422 and r.json()["error"]["code"] == "invalid_parameter", r.text
        assert "cannot say why" in r.json()["error"]["message"]


def test_serve_explains_with_the_same_function_as_predict():
    httpx = pytest.importorskip("httpx")
    from calm import CALM
    from calm.inference import Predictor
    from calm.serve.app import create_app
    from tests.helpers.serve_app import LiveServer, ToneExtractor, wav_bytes

    rng = np.random.default_rng(0)
    X = rng.random((12, 2, 4)).astype(np.float32) + 0.1
    predictor = Predictor(CALM(k=2).fit(X, np.array(["low", "high"] * 6)), ToneExtractor())
    audio = {"content": wav_bytes(), "headers": {"Content-Type": "audio/wav"}, "timeout": 30}
    with LiveServer(create_app(predictor)) as live:
        plain = httpx.post(live.url + "/predict", **audio)
        assert plain.status_code == 200 and "explanation" not in plain.json()
        r = httpx.post(live.url + "/predict", params={"explain": "true", "top": 1, "top_k": 2}, **audio)
        assert r.status_code == 200, r.text
        why = r.json()["explanation"]
        assert why["prediction"] == r.json()["label"] and [c["label"] for c in why["classes"]] == [
            x["label"] for x in r.json()["top_k"]
        ]
        assert all(len(c["heads"]) <= 1 for c in why["classes"])
        assert {(h["layer"], h["index"], h["source"]) for c in why["classes"] for h in c["heads"]} <= {
            (0, 0, "encoder"),
            (0, 1, "encoder"),
        }
        # the one function: serve's answer is postprocess's on the same clip
        clip = predictor.preprocess(wav_bytes())
        (scored,) = predictor.forward_scored([clip.waveform])
        local = predictor.postprocess(
            clip, scored.probabilities, top_k=2, explain=1, features=scored.features
        ).explanation
        assert json.loads(json.dumps(local)) == why
        batch = httpx.post(
            live.url + "/predict/batch",
            params={"explain": "true"},
            files=[("files", ("a.wav", wav_bytes())), ("files", ("b.wav", wav_bytes()))],
            timeout=30,
        ).json()["results"]
        assert all(len(x["explanation"]["classes"]) == 1 for x in batch)
        assert (
            httpx.post(live.url + "/predict", params={"explain": "true", "top": 0}, **audio).status_code
            == 422
        )
        schema = httpx.get(live.url + "/openapi.json").json()
        params = {p["name"] for p in schema["paths"]["/predict"]["post"]["parameters"]}
        assert {"explain", "top"} <= params
