"""report.html as a user sees it: rendered by headless Chromium, screenshot checked, numbers read
back from the DOM and compared with results.json and with confusion matrices computed here by
scikit-learn from the prediction records."""

import json
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote

import numpy as np
import pytest
import soundfile as sf
from sklearn.metrics import confusion_matrix

from calm.data import Clip
from calm.evaluate import ClassifierSpec, EvalConfig, run_evaluation
from calm.evaluate.predictions import (
    PREDICTIONS_FILE,
    confusions,
    misclassified,
    per_class_accuracy,
    read_predictions,
)
from calm.evaluate.report_html import reproduce_command
from calm.store import extract_to_store
from tests.test_store import RATE, FakeExtractor

CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--hide-scrollbars",
]
SHOTS, SEEDS = [1, 3], [0, 1, 2]


def synthetic_store(root: Path, n_per: int = 8, n_classes: int = 5) -> Path:
    """A real feature store over real WAV files: each class has its own amplitude envelope, which
    the fake extractor of test_store (slice means of |x|) turns into class-shaped head features."""
    rng = np.random.default_rng(0)
    t = np.linspace(0, 1, RATE // 2)
    clips = []
    for c in range(n_classes):
        name = f"class {'ABCDEFGH'[c]}"
        envelope = 1 + 0.8 * np.sin(2 * np.pi * (c + 1) * t + c)
        for i in range(n_per):
            path = root / "audio" / name / f"clip {i}.wav"  # a space, to exercise the URL quoting
            path.parent.mkdir(parents=True, exist_ok=True)
            wobble = 0.8 * np.sin(2 * np.pi * rng.uniform(0.5, 5) * t + rng.uniform(0, 6.3))  # overlap
            x = 0.1 * np.clip(envelope + wobble, 0.05, None) * (1 + 0.6 * rng.standard_normal(len(t)))
            sf.write(path, x.astype(np.float32), RATE)
            clips.append(Clip(path=path, labels=(name,), fold=i % 4 + 1))
    extract_to_store(FakeExtractor(), clips, root / "store", batch_size=8, progress=False)
    return root / "store"


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> tuple[Path, list]:
    """`run_evaluation` on the store: results.json, predictions.jsonl, figures/ and report.html."""
    root = tmp_path_factory.mktemp("report")
    store = synthetic_store(root)
    config = EvalConfig(
        out=root / "run",
        features=store,
        shots=SHOTS,
        seeds=SEEDS,
        test_fold=4,
        classifier=ClassifierSpec(k=0.5),
        sweep_seeds=1,
    )
    result = run_evaluation(config)
    assert result.report_html == root / "run" / "report.html"
    return root / "run", read_predictions(root / "run" / PREDICTIONS_FILE)


class Cells(HTMLParser):
    """Text of every <td>/<th> with its attributes and enclosing table class; <audio> sources."""

    def __init__(self):
        super().__init__()
        self.cells, self.audio, self._table, self._cell = [], [], [], None

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "table":
            self._table.append(attrs.get("class", ""))
        elif tag in ("td", "th"):
            self._cell = {"attrs": attrs, "table": self._table[-1] if self._table else "", "text": ""}
        elif tag == "audio":
            self.audio.append(attrs["src"])

    def handle_endtag(self, tag):
        if tag == "table" and self._table:
            self._table.pop()
        elif tag in ("td", "th") and self._cell is not None:
            self.cells.append(self._cell)
            self._cell = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell["text"] += data


def chromium_binary() -> str:
    for name in ("chromium", "chromium-browser"):
        if shutil.which(name):
            return shutil.which(name)
    pytest.skip("headless Chromium not installed (Debian package `chromium`; .ci/run installs it)")


def chromium(args: list[str], tmp_path: Path, dark: bool = False) -> subprocess.CompletedProcess:
    profile = tmp_path / f"profile-{len(list(tmp_path.glob('profile-*')))}"
    cmd = [chromium_binary(), *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *args]
    cmd += ["--force-dark-mode"] if dark else []
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=True)


def test_report_in_headless_chromium_holds_the_results(run_dir, tmp_path):
    run, records = run_dir
    page = (run / "report.html").as_uri()
    dom = chromium(["--dump-dom", page], tmp_path).stdout
    parser = Cells()
    parser.feed(dom)
    results = json.loads((run / "results.json").read_text())
    summary = {
        (c["attrs"]["data-method"], int(c["attrs"]["data-shots"]), c["attrs"]["data-metric"]): c["text"]
        for c in parser.cells
        if c["table"] == "summary" and "data-metric" in c["attrs"]
    }
    assert {s["metric"] for s in results["summary"]} == {"accuracy", "ece"}
    assert len(summary) == len(results["summary"]) == 4 * len(SHOTS) * 2
    for s in results["summary"]:
        assert summary[s["method"], s["shots"], s["metric"]] == f"{s['mean']:.2f} ± {s['std']:.2f}"
    paired = {
        (c["attrs"]["data-a"], c["attrs"]["data-b"], int(c["attrs"]["data-shots"])): c["text"]
        for c in parser.cells
        if c["table"] == "paired" and "data-a" in c["attrs"]
    }
    assert len(paired) == 6 * len(SHOTS)
    for p in (p for p in results["paired"] if p["metric"] == "accuracy"):  # the primary metric's
        assert paired[p["a"], p["b"], p["shots"]] == f"{p['mean_diff']:+.2f}"
    # CALM's 3-shot confusion matrix: the first in the DOM order of its card, mean over seeds
    calm = [r for r in records if r["method"] == "calm" and r["shots"] == 3]
    n = len(calm[0]["classes"])
    expected = np.mean([confusion_matrix(r["y_true"], r["y_pred"], labels=range(n)) for r in calm], axis=0)
    cm_cells = [c for c in parser.cells if c["table"] == "cm" and "data-i" in c["attrs"]]
    methods = list(dict.fromkeys(r["method"] for r in records if r["shots"] == 3))
    calm_cells = cm_cells[methods.index("calm") * n * n : (methods.index("calm") + 1) * n * n]
    for c in calm_cells:
        i, j = int(c["attrs"]["data-i"]), int(c["attrs"]["data-j"])
        pct = 100 * expected[i, j] / expected[i].sum()
        assert c["text"] == f"{expected[i, j]:.1f}".removesuffix(".0") + f"{pct:.0f}%"
    # every audio player links (relatively) to an existing file
    assert parser.audio and all((run / unquote(src)).is_file() for src in parser.audio)
    assert all(not src.startswith(("/", "file:")) for src in parser.audio)
    # the reproducing command and the embedded figures
    assert f"calm evaluate --features {run.parent / 'store'} --out {run}" in dom
    assert "--shots 1,3 --seeds 3 --methods sav,calm-global,calm,linear-probe --test-fold 4" in dom
    # Fig. 3-6, the reliability diagrams and the head maps (a panel for each of SAV, CALM-global, CALM)
    assert dom.count("data:image/png;base64,") == 4 + 1 + 1
    ece = {
        (c["attrs"]["data-method"], int(c["attrs"]["data-shots"])): c["text"]
        for c in parser.cells
        if c["table"] == "reliability" and "data-method" in c["attrs"]
    }
    assert ece == {(e["method"], e["shots"]): f"{e['ece_pooled']:.2f}" for e in results["reliability"]}
    assert {m for m, _ in ece} == {
        "sav",
        "calm-global",
        "calm",
        "linear-probe",
    } and '<h2 id="head-maps">' in dom
    assert "http://" not in dom.replace("http://www.w3.org", "") and "https://" not in dom


@pytest.mark.parametrize("dark", [False, True], ids=["light", "dark"])
def test_report_screenshot_is_not_blank(run_dir, tmp_path, dark):
    from PIL import Image

    run, _ = run_dir
    shot = tmp_path / "shot.png"
    chromium(
        ["--window-size=1280,2000", f"--screenshot={shot}", (run / "report.html").as_uri()], tmp_path, dark
    )
    image = np.asarray(Image.open(shot).convert("RGB"), dtype=np.float64)
    grey = image.mean(2)
    assert image.shape[:2] == (2000, 1280)
    assert grey.std() > 15  # text, tables and heat-mapped cells, not an empty page
    background = np.median(grey)
    assert (background < 60) if dark else (background > 200)  # prefers-color-scheme followed
    blue = (image[..., 2] > image[..., 0] + 60).mean()  # the confusion heat map's cells
    assert blue > 0.002


def test_aggregation_matches_scikit_learn(run_dir):
    _, records = run_dir
    for conf in confusions(records):
        recs = [r for r in records if r["method"] == conf.method and r["shots"] == conf.shots]
        n = len(conf.classes)
        per_seed = [confusion_matrix(r["y_true"], r["y_pred"], labels=range(n)) for r in recs]
        np.testing.assert_allclose(conf.counts[:, :n], np.mean(per_seed, axis=0))
        mean, std = per_class_accuracy(conf)
        recall = np.array([np.diag(m) / m.sum(1) * 100 for m in per_seed])
        np.testing.assert_allclose(mean, recall.mean(0))
        np.testing.assert_allclose(std, recall.std(0, ddof=1))
    wrong = misclassified(records, "sav", 3)
    first = [r for r in records if r["method"] == "sav" and r["shots"] == 3 and r["seed"] == 0]
    assert len(wrong) == sum(t != p for r in first for t, p in zip(r["y_true"], r["y_pred"], strict=True))
    assert all(w["true"] != w["pred"] for w in wrong)


def test_reproduce_command():
    config = {
        "features": "/runs/esc10/features",
        "shots": [1, 5],
        "seeds": [0, 1, 2],
        "methods": ["sav", "calm"],
        "test_fold": 5,
        "tune": True,
        "defaults": {
            "sav": {"k": 0.1, "tie_break": "index"},
            "calm": {"k": 0.25, "tau_p": 0.03, "tau_w": 0.5},
        },
    }
    cmd = reproduce_command(config, "out dir")
    assert cmd.startswith(
        "calm evaluate --features /runs/esc10/features --out 'out dir' --shots 1,5 --seeds 3"
    )
    assert "--tune" in cmd and "--k 0.25 --tau-p 0.03 --tau-w 0.5" in cmd and "--sav-k 0.1" in cmd
