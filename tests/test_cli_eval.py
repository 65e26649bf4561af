"""`calm evaluate`, `calm fit` and `calm predict` end to end on a tiny synthetic extractor and store."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from click.testing import CliRunner

from calm.cli import main
from calm.models import MODELS, register_model
from calm.models.base import HeadName

SR = 8000
FREQS = {"low": 300.0, "mid": 900.0, "high": 2100.0}


class ToneExtractor:
    """A stand-in model: 6 "heads" x 4 dims of log band energies of the clip's spectrum."""

    model_id = "fake-tones"
    sample_rate = SR
    max_seconds = None
    head_names = [HeadName(layer, head, "decoder") for layer in range(2) for head in range(3)]

    def __init__(self, prompt=None, heads="all", **_):
        self.prompt, self.heads = prompt, heads

    @property
    def key(self) -> dict:
        return {
            "model": self.model_id,
            "prompt": self.prompt,
            "heads": self.heads,
            "layers": None,
            "options": {},
            "dtype": "float32",
        }

    def load_input(self, path):
        x, sr = sf.read(path, dtype="float32")
        assert sr == SR
        return x

    def extract(self, inputs):
        out = []
        for x in inputs:
            spec = np.abs(np.fft.rfft(x, n=2048))[:960]
            bands = np.log1p(spec.reshape(24, -1).sum(1))
            out.append(bands.reshape(6, 4))
        return np.stack(out).astype(np.float32)


def load_tone_extractor(spec):
    return ToneExtractor(prompt=spec.prompt, heads=spec.heads)


@pytest.fixture(autouse=True)
def fake_model():
    register_model("fake-tones", None, "tests.test_cli_eval:load_tone_extractor")
    yield
    MODELS.pop("fake-tones", None)


def tone(path: Path, freq: float, seed: int) -> Path:
    rng = np.random.default_rng(seed)
    t = np.arange(int(0.25 * SR)) / SR
    x = 0.3 * np.sin(
        2 * np.pi * (freq * (1 + 0.05 * rng.standard_normal())) * t
    ) + 0.05 * rng.standard_normal(len(t))
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(path, x.astype(np.float32), SR)
    return path


@pytest.fixture
def tones(tmp_path):
    root = tmp_path / "tones"
    for ci, (name, f) in enumerate(FREQS.items()):
        for i in range(8):
            tone(root / name / f"{i}.wav", f, seed=100 * ci + i)
    return root


def is_png(path: Path) -> bool:
    data = path.read_bytes()
    return data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR" and len(data) > 1000


@pytest.mark.slow
def test_evaluate_fit_predict_end_to_end(tmp_path, tones):
    runner = CliRunner()
    run = tmp_path / "run"
    res = runner.invoke(
        main,
        [
            "evaluate",
            "--model",
            "fake-tones",
            "--data",
            f"folder:{tones}",
            "--shots",
            "1,3",
            "--seeds",
            "3",
            "--methods",
            "sav,calm-global,calm,linear-probe,zero-shot",
            "--out",
            str(run),
            "--no-progress",
            "--sweep-seeds",
            "1",
        ],
    )
    assert res.exit_code == 0, res.output + repr(res.exception)
    doc = json.loads((run / "results.json").read_text())
    cfg = doc["config"]
    assert cfg["model"] == "fake-tones" and cfg["dataset"] == f"folder:{tones}" and cfg["n_clips"] == 24
    assert cfg["head_source"] == "all" and "prompt" in cfg and cfg["version"]
    assert cfg["extraction"]["stored"] == 24 and cfg["defaults"]["calm"] == {
        "k": 0.25,
        "tau_p": 0.03,
        "tau_w": 0.5,
        "normalization": "softmax",
        "reliability": "in-sample",
        "scores": "loo",
    }
    assert "outside the support" in cfg["protocol"]
    assert (
        "zero-shot" in doc["skipped_methods"]
        and "not an audio-language model" in doc["skipped_methods"]["zero-shot"]
    )
    assert {(s["method"], s["shots"]) for s in doc["summary"] if s["metric"] == "accuracy"} == {
        (m, n) for m in ("sav", "calm-global", "calm", "linear-probe") for n in (1, 3)
    }
    assert all(s["n_seeds"] == 3 for s in doc["summary"])
    assert len(doc["runs"]) == 4 * 2 * 3 and all("params" in r for r in doc["runs"])
    calm3 = next(s for s in doc["summary"] if s["method"] == "calm" and s["shots"] == 3)
    assert calm3["mean"] > 80  # three well separated tones
    assert {(p["a"], p["b"]) for p in doc["paired"]} >= {("sav", "calm"), ("calm", "linear-probe")}
    assert doc["analyses"]["k_sweep"] and doc["analyses"]["top_heads"]
    assert (
        "| model | dataset | shots | SAV | CALM-global | CALM | linear probe |"
        in (run / "results.md").read_text()
    )
    assert "CALM" in res.output  # the table is printed
    figs = sorted(p.name for p in (run / "figures").glob("*.png"))
    confusion = [
        f"confusion_{m}_{n}shots.png" for m in ("calm-global", "calm", "linear-probe", "sav") for n in (1, 3)
    ]
    assert figs == sorted(confusion) + [
        "fig3_weight_survival.png",
        "fig4_conditional_vs_global.png",
        "fig5_shots_and_heads.png",
        "fig6_influential_heads.png",
    ]
    assert (run / "report.html").is_file() and (run / "predictions.jsonl").is_file()
    assert all(is_png(run / "figures" / f) for f in figs)

    # the same store again, without extraction: identical numbers (episodes only index the store)
    res2 = runner.invoke(
        main,
        [
            "evaluate",
            "--features",
            str(run / "features"),
            "--out",
            str(tmp_path / "run2"),
            "--shots",
            "1,3",
            "--seeds",
            "3",
            "--no-figures",
            "--no-progress",
        ],
    )
    assert res2.exit_code == 0, res2.output + repr(res2.exception)
    doc2 = json.loads((tmp_path / "run2" / "results.json").read_text())
    assert [s["mean"] for s in doc2["summary"]] == [s["mean"] for s in doc["summary"]]
    assert doc2["config"]["model"] == "fake-tones"

    model = tmp_path / "m.safetensors"
    res3 = runner.invoke(
        main,
        [
            "fit",
            str(run / "features"),
            "--method",
            "calm",
            "--shots",
            "3",
            "--seed",
            "1",
            "--out",
            str(model),
        ],
    )
    assert res3.exit_code == 0, res3.output + repr(res3.exception)
    import calm

    clf = calm.load(model)
    assert clf.metadata_["model"] == "fake-tones" and clf.metadata_["method"] == "calm"
    assert clf.metadata_["n_support"] == 9 and len(clf.metadata_["head_names"]) == 6
    new = [tone(tmp_path / "new" / f"{n}.wav", f, seed=999 + i) for i, (n, f) in enumerate(FREQS.items())]
    bad = tmp_path / "new" / "broken.wav"
    bad.write_bytes(b"not audio")
    res4 = runner.invoke(
        main,
        [
            "predict",
            str(model),
            *map(str, new),
            "--csv",
            str(tmp_path / "p.csv"),
            "--json",
            str(tmp_path / "p.json"),
        ],
    )
    assert res4.exit_code == 0, res4.output + repr(res4.exception)
    rows = list(csv.DictReader((tmp_path / "p.csv").open()))
    assert [r["label"] for r in rows] == list(FREQS) and all(0 < float(r["probability"]) <= 1 for r in rows)
    assert json.loads((tmp_path / "p.json").read_text())[0]["label"] == "low"
    assert "low" in res4.output
    res5 = runner.invoke(main, ["predict", str(model), str(new[0]), str(bad)])
    assert res5.exit_code == 1 and "broken.wav\tERROR" in res5.output


def test_evaluate_errors(tmp_path, tones):
    runner = CliRunner()
    res = runner.invoke(main, ["evaluate", "--out", str(tmp_path / "r")])
    assert res.exit_code != 0 and "exactly one of --data" in res.output
    res = runner.invoke(
        main,
        [
            "evaluate",
            "--model",
            "fake-tones",
            "--data",
            f"folder:{tones}",
            "--shots",
            "8",
            "--seeds",
            "1",
            "--out",
            str(tmp_path / "r"),
            "--no-progress",
            "--no-figures",
        ],
    )
    assert res.exit_code != 0 and "no query clips left" in res.output
    res = runner.invoke(
        main,
        [
            "evaluate",
            "--model",
            "fake-tones",
            "--data",
            f"folder:{tones}",
            "--methods",
            "nope",
            "--out",
            str(tmp_path / "r"),
        ],
    )
    assert res.exit_code != 0 and "unknown method" in res.output


def test_evaluate_with_a_relative_data_root_through_dotdot(tmp_path, tones, monkeypatch):
    # README's main job passes `esc10:../shared/data/esc10`: every clip must still reach the episodes
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    res = CliRunner().invoke(
        main,
        [
            "evaluate",
            "--model",
            "fake-tones",
            "--data",
            "folder:../tones",
            "--shots",
            "2",
            "--seeds",
            "1",
            "--methods",
            "calm",
            "--out",
            "run",
            "--no-figures",
            "--no-progress",
        ],
    )
    assert res.exit_code == 0, res.output + repr(res.exception)
    doc = json.loads((work / "run" / "results.json").read_text())
    assert doc["config"]["n_clips"] == 24
    assert doc["summary"][0]["mean"] > 50  # chance is 33 %


def test_options_beyond_the_paper_reach_the_classifiers_and_the_record(tmp_path, tones):
    res = CliRunner().invoke(
        main,
        [
            "evaluate",
            "--model",
            "fake-tones",
            "--data",
            f"folder:{tones}",
            "--shots",
            "2",
            "--seeds",
            "2",
            "--methods",
            "sav,calm",
            "--sav-tie-break",
            "margin",
            "--normalization",
            "power",
            "--reliability",
            "leave-one-out",
            "--out",
            str(tmp_path / "run"),
            "--no-figures",
            "--no-progress",
        ],
    )
    assert res.exit_code == 0, res.output + repr(res.exception)
    runs = json.loads((tmp_path / "run" / "results.json").read_text())["runs"]
    assert {r["params"]["tie_break"] for r in runs if r["method"] == "sav"} == {"margin"}
    calm_params = [r["params"] for r in runs if r["method"] == "calm"]
    assert calm_params and all(
        p["normalization"] == "power" and p["reliability"] == "leave-one-out" for p in calm_params
    )
    model = tmp_path / "m.safetensors"
    res = CliRunner().invoke(
        main,
        [
            "fit",
            str(tmp_path / "run" / "features"),
            "--method",
            "sav",
            "--sav-tie-break",
            "margin",
            "--out",
            str(model),
        ],
    )
    assert res.exit_code == 0, res.output + repr(res.exception)
    import calm

    assert calm.load(model).tie_break == "margin"
