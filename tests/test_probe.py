"""The linear probe as a head classifier (`calm.LinearProbe`, issue 24): one implementation (the
evaluation's baseline is it, scikit-learn's logistic regression to the bit), a classifier file like
SAV's and CALM's, calibration on held-out folds, explain, and a candidate of ``auto`` that
`calm fit`, `calm predict`, `calm serve` and `AudioClassifier` carry through."""

from __future__ import annotations

import json

import numpy as np
import pytest
import soundfile as sf
import torch
from click.testing import CliRunner
from sklearn.linear_model import LogisticRegression

import calm
from calm import _calibration as cal
from calm import methods
from calm.audio_classifier import AudioClassifier
from calm.classifiers.auto import AutoHead
from calm.classifiers.probe import fit_probe, held_out_folds, probe_logits
from calm.models.base import HeadName
from calm.serialization import read_classifier
from tests.test_one_inference_path import SR, fake_model, tone  # noqa: F401 (fake_model: the fixture)

torch.set_num_threads(1)

K, D = 4, 6


def blobs(n_per: int, seed: int, C: int = 3, dtype=np.float32) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    centres = np.random.default_rng(99).normal(size=(C, K, D))
    y = np.repeat(np.arange(C), n_per)
    X = centres[y] + 1.2 * rng.normal(size=(len(y), K, D))
    return X.astype(dtype), np.array([f"c{i}" for i in range(C)])[y]


def linear_only(n_per: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Three classes that differ only on one quiet dimension of every head, under loud noise on
    the others: the cosines to the class centroids barely see it, a standardised linear model does."""
    rng = np.random.default_rng(seed)
    y = np.repeat(np.arange(3), n_per)
    X = 3.0 * rng.standard_normal((len(y), K, D))
    X[:, :, 0] = (y[:, None] - 1) * 0.5 + 0.05 * rng.standard_normal((len(y), K))
    return X.astype(np.float32), np.array(["a", "b", "c"])[y]


def test_one_probe_and_it_is_scikit_learns_logistic_regression():
    from calm.evaluate.estimators import LinearProbe as evaluated

    assert evaluated is calm.LinearProbe is type(methods.build("linear-probe"))
    for C in (2, 3):
        X, y = blobs(5, seed=C, C=C, dtype=np.float16)  # float16 is widened exactly, as before
        Xq, _ = blobs(7, seed=10 + C, C=C, dtype=np.float16)
        clf = calm.LinearProbe(C=0.5).fit(X, y)
        flat, flat_q = X.reshape(len(X), -1).astype(np.float32), Xq.reshape(len(Xq), -1).astype(np.float32)
        mean, scale = flat.mean(0), flat.std(0)
        ref = LogisticRegression(C=0.5, max_iter=2000).fit((flat - mean) / scale, y)
        decision = ref.decision_function((flat_q - mean) / scale)
        np.testing.assert_array_equal(clf.decision_function(Xq), decision)  # to the bit
        np.testing.assert_array_equal(clf.predict(Xq), ref.predict((flat_q - mean) / scale))
        uncalibrated = calm.LinearProbe(C=0.5, calibration=None).fit(X, y)
        np.testing.assert_allclose(
            uncalibrated.predict_proba(Xq), ref.predict_proba((flat_q - mean) / scale), rtol=0, atol=1e-6
        )
        assert clf.k_ == clf.n_heads_ == K and clf.coef_.shape == (C, K, D) and clf.n_iter_ >= 1


def test_a_probe_file_round_trips_to_the_bit(tmp_path):
    X, y = blobs(6, seed=1)
    Xq, _ = blobs(9, seed=2)
    for params in (
        {},
        {"unknown": 0.9, "keep_support": True},
        {"unknown": 0.8, "unknown_score": "top-proba"},
    ):
        clf = calm.LinearProbe(**params).fit(X, y)
        clf.save(tmp_path / "p.safetensors", {"model": "m"})
        back = calm.load(tmp_path / "p.safetensors")
        assert type(back) is calm.LinearProbe and back.get_params() == clf.get_params()
        assert back.metadata_ == {"model": "m"}
        for method in ("predict", "predict_proba", "decision_function", "known_score"):
            np.testing.assert_array_equal(getattr(back, method)(Xq), getattr(clf, method)(Xq), err_msg=method)
        assert back.predict_set(Xq, 0.2) == clf.predict_set(Xq, 0.2)
        tensors = read_classifier(tmp_path / "p.safetensors").tensors
        assert {"mean", "scale", "coef", "intercept", "temperature", "centroids"} <= set(tensors)
        assert tensors["coef"].shape == (3, K, D) and tensors["mean"].shape == (K, D)


def test_calibration_is_a_temperature_on_held_out_fold_scores():
    X, y = blobs(7, seed=3)
    clf = calm.LinearProbe().fit(X, y)
    y_idx = np.searchsorted(clf.classes_, y)
    folds = held_out_folds(y_idx, np.ones(len(y), bool))
    assert sorted(np.bincount(folds).tolist()) == [3, 3, 3, 6, 6]  # each class's 7 clips over 5 folds
    flat = X.reshape(len(X), -1)
    logits = np.zeros((len(y), 3))
    for f in range(5):
        probe, _ = fit_probe(flat[folds != f], y_idx[folds != f], 3, 1.0, 2000)
        logits[folds == f] = probe_logits(flat[folds == f], probe)
    log_p = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
    assert clf.calibrated_ and clf.temperature_ == cal.fit_temperature(log_p, y_idx)
    np.testing.assert_allclose(
        clf.nonconformity_, cal.nonconformity(cal.calibrated_proba(log_p, clf.temperature_), y_idx)
    )
    one_shot = calm.LinearProbe().fit(*blobs(1, seed=3))
    assert not one_shot.calibrated_ and one_shot.temperature_ == 1.0  # nothing to hold out


def test_explain_splits_each_score_over_the_heads():
    X, y = blobs(5, seed=4)
    Xq, _ = blobs(2, seed=5)
    clf = calm.LinearProbe().fit(X, y)
    clf.metadata_ = {"head_names": [[j // 2, j % 2, "encoder"] for j in range(K)]}
    xq = torch.from_numpy(Xq.astype(np.float64))
    parts = clf._head_parts(xq, torch.zeros(len(Xq), K, 3)).numpy()  # (n, K, C)
    np.testing.assert_allclose(parts.sum(axis=1) + clf.intercept_, clf.class_scores(Xq), rtol=1e-5, atol=1e-5)
    out = clf.explain(Xq, top=K)
    assert json.loads(json.dumps(out)) == out
    for row, p, pred in zip(out, parts, clf.predict(Xq), strict=True):
        assert row["prediction"] == pred
        for c, name in enumerate(clf.classes_):
            heads = row["heads"][name]
            positive = sorted((v for v in p[:, c] if v > 0), reverse=True)
            assert [h["contribution"] for h in heads] == pytest.approx(positive, rel=1e-5)
            assert all(h["weight"] == 1 / K and h["layer"] == h["head"] // 2 for h in heads)
            assert all(h["source"] == "encoder" for h in heads)


def test_auto_chooses_the_probe_where_only_a_linear_boundary_separates(tmp_path):
    X, y = linear_only(8, seed=0)
    Xq, yq = linear_only(30, seed=1)
    auto = AutoHead().fit(X, y)
    assert "linear-probe" in methods.AUTO_CANDIDATES and auto.chosen_ == "linear-probe"
    assert (
        auto.cv_scores_["linear-probe"]
        > max(v for m, v in auto.cv_scores_.items() if m != "linear-probe") + 20
    )
    assert auto.score(Xq, yq) > calm.CALM().fit(X, y).score(Xq, yq) + 0.2
    auto.save(tmp_path / "auto.safetensors")
    back = calm.load(tmp_path / "auto.safetensors")
    assert type(back) is calm.LinearProbe and back.metadata_["selection"] == json.loads(
        json.dumps(auto.selection_)
    )
    np.testing.assert_array_equal(back.predict_proba(Xq), auto.predict_proba(Xq))


class LinearOnly:
    """A `FeatureExtractor` whose .npy "clips" hold their own (K, D) features."""

    model_id, sample_rate, max_seconds = "linear-only", 100, None
    head_names = [HeadName(j // 2, j % 2, "decoder") for j in range(K)]

    @property
    def key(self) -> dict:
        return {"model": self.model_id, "heads": "all", "prompt": None, "layers": None}

    def load_input(self, path):
        return np.load(path)

    def extract(self, inputs):
        return np.stack([np.asarray(x, np.float32).reshape(K, D) for x in inputs])


def test_calm_fit_auto_writes_a_probe_file_that_calm_predict_reads(tmp_path, monkeypatch):
    from calm.cli import main
    from calm.data.base import Clip
    from calm.store import extract_to_store

    X, y = linear_only(8, seed=0)
    Xq, _ = linear_only(2, seed=1)
    (tmp_path / "clips").mkdir()
    paths = []
    for i, x in enumerate(np.concatenate([X, Xq])):
        paths.append(tmp_path / "clips" / f"{i}.npy")
        np.save(paths[-1], x.reshape(-1))  # 24 "samples": 0.24 s
    fake = LinearOnly()
    clips = [Clip(path=p, labels=(label,)) for p, label in zip(paths, y, strict=False)]
    extract_to_store(fake, clips, tmp_path / "store", dtype="float32", progress=False, allow_failures=False)
    monkeypatch.setattr("calm.models.load_extractor", lambda *a, **k: fake)
    out = tmp_path / "auto.safetensors"
    res = CliRunner().invoke(main, ["fit", str(tmp_path / "store"), "--method", "auto", "--out", str(out)])
    assert res.exit_code == 0, res.output
    saved = calm.load(out)
    assert type(saved) is calm.LinearProbe and saved.metadata_["selection"]["chosen"] == "linear-probe"
    queries = paths[len(X) :]
    res = CliRunner().invoke(
        main,
        ["predict", str(out), *map(str, queries), "--json", str(tmp_path / "p.json"), "--trust-file-model"],
    )
    assert res.exit_code == 0, res.output
    rows = json.loads((tmp_path / "p.json").read_text())
    assert [r["label"] for r in rows] == saved.predict(Xq).tolist()
    np.testing.assert_allclose(
        [r["probability"] for r in rows], saved.predict_proba(Xq).max(axis=1), atol=1e-5
    )


def test_audio_classifier_calm_predict_and_serve_run_the_probe(tmp_path):
    from fastapi.testclient import TestClient

    from calm.cli import main
    from calm.inference import load_predictor
    from calm.serve import create_app

    waves = [tone(f, seed=i) for i, f in enumerate([300, 320, 310, 2000, 2100, 1900])]
    fitted = AudioClassifier("fake-bands16k", "linear-probe", device="cpu", C=0.5)
    fitted.fit(waves, ["low"] * 3 + ["high"] * 3, sample_rate=SR)
    assert type(fitted.classifier_) is calm.LinearProbe and fitted.classifier_.C == 0.5
    files = []
    for i, f in enumerate([300, 2000, 305, 1950]):
        files.append(tmp_path / f"q{i}.wav")
        sf.write(files[-1], tone(f, seed=40 + i), SR)
    model = tmp_path / "m.safetensors"
    fitted.save(model)
    loaded = AudioClassifier.load(model, device="cpu")
    assert loaded.method == "linear-probe" and loaded.get_params()["C"] == 0.5
    want = list(fitted.predict(files))
    assert want == ["low", "high", "low", "high"] == list(loaded.predict(files))
    res = CliRunner().invoke(
        main, ["predict", str(model), *map(str, files), "--json", str(tmp_path / "p.json")]
    )
    assert res.exit_code == 0, res.output
    assert [r["label"] for r in json.loads((tmp_path / "p.json").read_text())] == want
    with TestClient(create_app(load_predictor(model))) as client:
        info = client.get("/info").json()
        answer = client.post(
            "/predict?explain=true", content=files[0].read_bytes(), headers={"Content-Type": "audio/wav"}
        ).json()
    assert info["estimator"] == "LinearProbe" and info["method"] == "linear-probe" and info["calibrated"]
    assert answer["label"] == "low"


def test_tune_scores_its_folds_without_the_probes_calibration(monkeypatch):
    import calm.classifiers.probe as probe
    from calm.evaluate.estimators import fewshot_methods, tune

    X, y = blobs(6, seed=6)
    fits: list[int] = []
    real = probe.fit_probe
    monkeypatch.setattr(probe, "fit_probe", lambda *a, **k: fits.append(1) or real(*a, **k))
    method = fewshot_methods()["linear-probe"]
    params, report = tune(method, X, y, seed=0)
    assert report["tuned"] and report["cv_folds"] == 5 and params["C"] in method.grid["C"]
    assert len(fits) == len(method.grid["C"]) * 5  # one probe a fold and grid point: no held-out refits
