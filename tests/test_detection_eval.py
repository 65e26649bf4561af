"""The detection evaluation (`calm evaluate-detection`, calm.evaluate.detection_eval): soundscapes
reproducible from a seed whose annotations match their audio, the sed_eval wiring (a perfect
detector scores 100, an empty one 0), the naive baseline, the whole run through the real CLI on a
tiny ESC-10-layout folder of tone clips with the model-free band-energies extractor of
tests/test_detect.py, and one-line errors for bad input."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from click.testing import CliRunner

from calm.cli import main
from calm.detection import Detection
from calm.errors import ParameterError
from calm.evaluate.detection_eval import BACKGROUND, naive_events
from calm.evaluate.sed_metrics import MetricsUnavailable, SedScores
from calm.evaluate.soundscapes import SoundscapeSpec, generate, read_reference, sounding_span
from calm.models import MODELS, register_model

RATE = 16000
FREQS = {"Low": 500.0, "High": 3000.0}


def tone_clip(freq: float, rng) -> np.ndarray:
    """2 s: 0.5 s of silence, 1 s of tone (a little noise), 0.5 s of silence (ESC-style padding)."""
    x = np.zeros(2 * RATE, np.float32)
    t = np.arange(RATE) / RATE
    x[RATE // 2 : RATE // 2 + RATE] = 0.3 * np.sin(2 * np.pi * freq * t) + 0.01 * rng.standard_normal(RATE)
    return x


@pytest.fixture(scope="module")
def esc_root(tmp_path_factory) -> Path:
    """ESC-10 layout: `NNN - Class/{fold}-{id}-A.wav`, 3 clips a class in each of folds 1-3."""
    root = tmp_path_factory.mktemp("esc")
    rng = np.random.default_rng(0)
    for number, name in enumerate(["Low", "High", "Noise"], 1):
        folder = root / f"{number:03d} - {name}"
        folder.mkdir()
        for fold in (1, 2, 3):
            for k in range(3):
                if name == "Noise":
                    x = (0.05 * rng.standard_normal(2 * RATE)).astype(np.float32)
                else:
                    x = tone_clip(FREQS[name] * (1 + 0.03 * k), rng)
                sf.write(folder / f"{fold}-{number}{fold}{k}-A.wav", x, RATE, subtype="PCM_16")
    return root


@pytest.fixture
def sed_eval():
    """sed_eval is the optional `detect-eval` extra (in `dev`, so CI runs these tests)."""
    return pytest.importorskip("sed_eval")


@pytest.fixture(autouse=True)
def band_model():
    register_model("band-energies-test", None, "tests.test_detect:load_band_energies")
    yield
    MODELS.pop("band-energies-test", None)


def pools(root: Path, fold: int = 3):
    fg = {c: sorted((root).glob(f"*{c}/{fold}-*.wav")) for c in FREQS}
    return fg, sorted(root.glob("*Noise/2-*.wav"))


SPEC = SoundscapeSpec(duration=12.0, n_events=(2, 4))


def test_the_same_seed_gives_the_same_soundscapes_and_another_seed_others(esc_root, tmp_path):
    fg, bg = pools(esc_root)
    a = generate(fg, bg, tmp_path / "a", seed=3, count=2, spec=SPEC)
    b = generate(fg, bg, tmp_path / "b", seed=3, count=2, spec=SPEC)
    c = generate(fg, bg, tmp_path / "c", seed=4, count=2, spec=SPEC)
    for x, y in zip(a, b, strict=True):
        assert x.events == y.events and x.audio.read_bytes() == y.audio.read_bytes()
        assert read_reference(x.annotation) == list(x.events)
    assert [x.events for x in a] != [z.events for z in c]
    doc = json.loads(a[0].audio.with_suffix(".json").read_text())
    assert doc["spec"]["duration"] == 12.0 and len(doc["events"]) == len(a[0].events)
    assert all(Path(e["source"]).parent.name.endswith(e["label"]) for e in doc["events"])


def test_annotations_match_the_audio(esc_root, tmp_path):
    fg, bg = pools(esc_root)
    (scape,) = generate(fg, bg, tmp_path, seed=0, count=1, spec=SPEC)
    x, rate = sf.read(scape.audio, dtype="float32")
    assert rate == RATE and len(x) == 12 * RATE
    assert len(scape.events) >= 2
    inside = np.zeros(len(x), bool)
    for on, off, label in scape.events:
        assert off - on == pytest.approx(1.0, abs=0.02)  # the padding of the source clip was cut
        a, b = round(on * RATE), round(off * RATE)
        inside[a:b] = True
        spectrum = np.abs(np.fft.rfft(x[a + 800 : b - 800]))
        assert (
            abs(np.argmax(spectrum) * RATE / (b - a - 1600) - FREQS[label]) < 0.08 * FREQS[label]
        )  # sources: +0, 3, 6 %
    rms_out = np.sqrt(np.mean(x[~inside] ** 2))
    assert rms_out == pytest.approx(10 ** (-30 / 20), rel=0.2)  # the background level of the spec
    for on, off, _ in scape.events:
        seg = x[round(on * RATE) + 800 : round(off * RATE) - 800]
        assert np.sqrt(np.mean(seg**2)) > 10 ** (5 / 20) * rms_out  # SNR >= 6 dB


def test_sounding_span_cuts_leading_and_trailing_silence():
    x = tone_clip(500.0, np.random.default_rng(0))
    start, end = sounding_span(x, RATE, 40.0)
    assert start == pytest.approx(RATE // 2, abs=160) and end == pytest.approx(3 * RATE // 2, abs=160)


def test_a_perfect_detector_scores_100_and_an_empty_one_0(sed_eval):
    ref = [(1.0, 2.0, "Low"), (4.0, 6.5, "High"), (8.0, 9.0, "Low")]
    perfect, empty = SedScores(["Low", "High"]), SedScores(["Low", "High"])
    perfect.add(ref, ref, 10.0)
    empty.add(ref, [], 10.0)
    assert perfect.scores() == {
        "event_f1": 100,
        "event_onset_f1": 100,
        "segment_f1": 100,
        "segment_error_rate": 0,
    }
    s = empty.scores()
    assert s["event_f1"] == s["event_onset_f1"] == s["segment_f1"] == 0 and s["segment_error_rate"] == 100
    late = SedScores(["Low", "High"])  # right onsets, offsets 3 s late: only the onset-only F1 counts them
    late.add(ref, [(on, off + 3, lab) for on, off, lab in ref], 12.0)
    assert late.scores()["event_onset_f1"] == 100 and late.scores()["event_f1"] == 0


def test_the_naive_baseline_takes_every_window_argmax_and_skips_the_background_class():
    classes = ["Low", "High", BACKGROUND]
    proba = np.array([[0.4, 0.3, 0.3], [0.2, 0.5, 0.3], [0.1, 0.1, 0.8], [0.34, 0.33, 0.33]])
    starts = np.arange(4) * 0.5
    det = Detection("x", 2.5, 1.0, 0.5, classes, starts, proba, proba, np.full(3, 0.5), [], (BACKGROUND,))
    found = [(e.onset, e.offset, e.label) for e in naive_events(det)]
    assert found == [(0.0, 0.75, "Low"), (0.75, 1.25, "High"), (1.75, 2.5, "Low")]


def cli_args(root: Path, out: Path, *extra: str) -> list[str]:
    return [
        "evaluate-detection", "--data", f"esc10:{root}", "--out", str(out), "--model", "band-energies-test",
        "--seeds", "2", "--shots", "2", "--events", "Low,High", "--backgrounds", "Noise",
        "--soundscapes", "1", "--duration", "12", "--test-fold", "3", "--background-fold", "2",
        "--support-folds", "1,2", *extra,
    ]  # fmt: skip


def test_the_cli_runs_end_to_end_and_writes_json_markdown_and_html(esc_root, tmp_path, sed_eval):
    out = tmp_path / "run"
    result = CliRunner().invoke(main, cli_args(esc_root, out))
    assert result.exit_code == 0, result.output
    doc = json.loads((out / "results.json").read_text())
    assert [(r["seed"], r["method"]) for r in doc["runs"]] == [
        (0, "full"),
        (0, "naive"),
        (1, "full"),
        (1, "naive"),
    ]
    for r in doc["runs"]:
        assert set(r["metrics"]) >= {"event_f1", "event_onset_f1", "segment_f1"}
        assert all(0 <= r["metrics"][m] <= 100 for m in ("event_f1", "segment_f1"))
        assert r["n_reference"] >= 2 and r["support"] and not any("/3-" in p for p in r["support"])
    full = [r["metrics"]["segment_f1"] for r in doc["runs"] if r["method"] == "full"]
    assert max(full) > 60  # pure tones on noise: the detector finds them (2 shots: not always)
    paired = {p["metric"]: p for p in doc["paired"]}
    assert paired["event_f1"]["a"] == "full" and paired["event_f1"]["b"] == "naive"
    assert paired["event_f1"]["n_seeds"] == 2 and paired["event_f1"]["ci95_low"] is not None
    assert doc["config"]["test_fold"] == 3 and doc["config"]["shots"] == 2
    assert len(doc["soundscapes"]) == 2 and (out / "soundscapes" / "seed_1" / "soundscape_00.txt").is_file()
    md = (out / "results.md").read_text()
    assert "event-based F1 (%)" in md and "full − naive" in md and "segment-based F1 (%)" in md
    html = (out / "report.html").read_text()
    assert html.startswith("<!DOCTYPE html>") and 'id="paired"' in html and "<table" in html
    assert "event_f1\tfull - naive" in result.output
    assert (
        doc["command"].startswith("calm evaluate-detection --data esc10:") and "--seeds 2" in doc["command"]
    )
    assert "--window" not in doc["command"]  # defaults are left out


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--events", "Low,Nope"], "no class ['Nope']"),
        (["--support-folds", "1,3"], "test fold 3 is also a support fold"),
        (["--shots", "9"], "fewer than 9 support clips"),
        (["--backgrounds", "Low"], "both event and background"),
    ],
)
def test_bad_input_gives_one_error_line(esc_root, tmp_path, extra, message, sed_eval):
    result = CliRunner().invoke(main, cli_args(esc_root, tmp_path / "bad", *extra))
    assert result.exit_code == 1, result.output
    lines = [ln for ln in result.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("calm: error:") and message in lines[0], result.output


def test_a_missing_sed_eval_is_one_line_naming_the_extra(esc_root, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "sed_eval", None)
    with pytest.raises(MetricsUnavailable, match=r"calm-audio\[detect-eval\]"):
        SedScores(["Low"])
    result = CliRunner().invoke(main, cli_args(esc_root, tmp_path / "x"))
    assert result.exit_code == 1 and "pip install 'calm-audio[detect-eval]'" in result.output


def test_a_bad_soundscape_spec_is_refused():
    with pytest.raises(ParameterError, match="n_events"):
        SoundscapeSpec(n_events=(4, 2)).check()


@pytest.mark.slow
def test_real_esc10_soundscapes_with_whisper(esc10_root, tmp_path, sed_eval):
    args = [
        "evaluate-detection", "--data", f"esc10:{esc10_root}", "--out", str(tmp_path),
        "-o", "encoder_length=clip", "--seeds", "1", "--soundscapes", "1", "--duration", "20",
    ]  # fmt: skip
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    doc = json.loads((tmp_path / "results.json").read_text())
    assert {r["method"] for r in doc["runs"]} == {"full", "naive"}
    assert all(r["n_reference"] >= 3 for r in doc["runs"])
    assert all(
        0 <= v <= 100 or k == "segment_error_rate" for r in doc["runs"] for k, v in r["metrics"].items()
    )
    # argmax labels every window, so on 20 s of events it overlaps some segment; the full method may
    # reject them all on one short soundscape (its threshold), so only the naive F1 must be positive
    naive = next(r for r in doc["runs"] if r["method"] == "naive")
    assert naive["metrics"]["segment_f1"] > 0
