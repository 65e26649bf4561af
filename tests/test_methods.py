"""The method registry (`calm.methods`): each method name spelled in one module of src/, one default per
classifier parameter everywhere, and the same classifier whichever front end builds it
(`calm.CALM()` / `calm.SAV()`, `calm.AudioClassifier`, `calm fit`, `run_evaluation`) on one store."""

from __future__ import annotations

import ast
import html
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import calm
from calm import methods
from calm.audio_classifier import AudioClassifier
from calm.evaluate import ClassifierSpec, EvalConfig, fewshot_methods, run_evaluation
from calm.evaluate.episodes import episodes, make_parts
from calm.evaluate.predictions import PREDICTIONS_FILE
from calm.models.base import FeatureExtractor, HeadName

torch.set_num_threads(1)
SRC = Path(__file__).resolve().parents[1] / "src" / "calm"
# string constants equal to a method name that are not that method (module -> the names, and why)
NOT_METHODS = {
    "serialization.py": {"calm"},  # the metadata key of the classifier file format
    "cli.py": {"calm"},  # the program name
    "evaluate/config.py": {"calm"},  # the program name, in the command that reproduces a run
    "cache.py": {"calm"},  # the cache folder's name
    "answering/clips.py": {"zero-shot"},  # a cache file's kind: renaming the method must not void caches
    "commands/serve.py": {"auto"},  # --replicas auto
    "figures.py": {"auto"},  # matplotlib's aspect="auto"
    "models/base.py": {"auto"},  # dtype="auto"
}


def _string_constants(path: Path) -> set[str]:
    """String constants of a module, docstrings left out."""
    tree = ast.parse(path.read_text())
    docstrings = {
        id(node.body[0].value)
        for node in ast.walk(tree)
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef)
        and node.body
        and isinstance(node.body[0], ast.Expr)
        and isinstance(node.body[0].value, ast.Constant)
    }
    return {
        node.value
        for node in ast.walk(tree)
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings
    }


def test_each_method_name_is_spelled_in_one_module_of_src():
    spelled: dict[str, list[str]] = {name: [] for name in methods.names()}
    for path in sorted(SRC.rglob("*.py")):
        rel = str(path.relative_to(SRC))
        for name in _string_constants(path) & set(spelled) - NOT_METHODS.get(rel, set()):
            spelled[name].append(rel)
    assert {name: where for name, where in spelled.items() if where != ["methods.py"]} == {}


def _click_default(command: Any, name: str) -> Any:
    return next(p.default for p in command.params if p.name == name)


def test_one_default_per_parameter():
    from calm.commands.evaluate import evaluate
    from calm.commands.fit import fit

    d = methods.DEFAULTS
    calm_params, sav_params = calm.CALM().get_params(), calm.SAV().get_params()
    for param in ("k", "tau_p", "tau_w", "normalization", "reliability"):
        assert calm_params[param] == d[param], param
    assert (sav_params["k"], sav_params["tie_break"], sav_params["tau_p"]) == (
        d["k"],
        d["tie_break"],
        d["tau_p"],
    )
    spec = ClassifierSpec()
    assert (spec.k, spec.tau_p, spec.tau_w) == (d["k"], d["tau_p"], d["tau_w"])
    assert (spec.sav_tie_break, spec.normalization, spec.reliability) == (
        d["tie_break"],
        d["normalization"],
        d["reliability"],
    )
    for command in (evaluate, fit):
        assert float(_click_default(command, "k")) == d["k"]
        assert (
            _click_default(command, "tau_p") == d["tau_p"] and _click_default(command, "tau_w") == d["tau_w"]
        )
        assert _click_default(command, "sav_tie_break") == d["tie_break"]
        assert _click_default(command, "normalization") == d["normalization"]
        assert _click_default(command, "reliability") == d["reliability"]
    assert _click_default(fit, "method") == AudioClassifier().method == methods.DEFAULT_METHOD
    registry = fewshot_methods()
    assert registry["calm"].defaults == {p: calm_params[p] for p in registry["calm"].defaults}
    assert registry["sav"].defaults == {p: sav_params[p] for p in registry["sav"].defaults}
    from calm.audio_classifier import head_classifier

    assert head_classifier("calm", {}).get_params() == calm_params


def test_registry_lookups_and_refusals():
    assert methods.build("calm-global", {"k": 3}).get_params()["weighting"] == "global"
    with pytest.raises(ValueError, match="unknown parameter.*weighting"):
        methods.build("calm-global", {"weighting": "class"})  # fixed by the method
    with pytest.raises(ValueError, match="not a few-shot estimator"):
        methods.build("zero-shot")
    with pytest.raises(ValueError, match="unknown method 'knn'"):
        methods.info("knn")
    assert methods.method_of(calm.CALM(weighting="global")) == "calm-global"
    assert methods.method_of(calm.SAV()) == "sav" and methods.principal().name == "calm"
    assert methods.method_of(calm.LinearProbe()) == "linear-probe"
    fit_methods = ("sav", "calm-global", "calm", "auto", "linear-probe")
    assert methods.audio_methods()[:5] == methods.fit_methods() == fit_methods


# -- the same classifier through every front end -------------------------------------------------------

K, D, CLASSES = 8, 6, ("dog", "rain", "siren")


class NpyExtractor:
    """A `FeatureExtractor` over .npy "clips": fixed random per-head projections of the clip's vector."""

    model_id, sample_rate, max_seconds = "npy-test", 100, None  # 12 samples: 0.12 s, above the minimum

    def __init__(self) -> None:
        self.head_names = [HeadName(i // 4, i % 4, "decoder") for i in range(K)]
        self.weights = np.random.default_rng(7).normal(size=(K, D, 12)).astype(np.float32)

    @property
    def key(self) -> dict[str, Any]:
        return {"model": self.model_id, "heads": "all", "prompt": None, "layers": None}

    def load_input(self, path: Any) -> np.ndarray:
        return np.load(path)

    def extract(self, inputs: Any) -> np.ndarray:
        x = np.stack(inputs).astype(np.float32)
        return np.tanh(np.einsum("kdj,nj->nkd", self.weights, x)).astype(np.float32)


def _clips(folder: Path, n_per_class: int, seed: int) -> tuple[list[Path], list[str]]:
    rng = np.random.default_rng(seed)
    centres = np.random.default_rng(0).normal(size=(len(CLASSES), 12))
    folder.mkdir(parents=True)
    paths, labels = [], []
    for c, name in enumerate(CLASSES):
        for i in range(n_per_class):
            path = folder / f"{name}{i}.npy"
            np.save(path, (centres[c] + 1.3 * rng.normal(size=12)).astype(np.float32))
            paths.append(path)
            labels.append(name)
    return paths, labels


@pytest.fixture
def store(tmp_path, monkeypatch):
    from calm.data.base import Clip
    from calm.store import extract_to_store

    fake = NpyExtractor()
    assert isinstance(fake, FeatureExtractor)
    paths, labels = _clips(tmp_path / "clips", 5, seed=1)
    clips = [Clip(path=p, labels=(label,)) for p, label in zip(paths, labels, strict=True)]
    extract_to_store(fake, clips, tmp_path / "store", dtype="float32", progress=False, allow_failures=False)
    monkeypatch.setattr("calm.models.load_extractor", lambda *a, **k: fake)
    queries, _ = _clips(tmp_path / "queries", 3, seed=2)
    return tmp_path / "store", fake, queries


@pytest.mark.parametrize("method", ["sav", "calm-global", "calm", "linear-probe"])
def test_python_audio_classifier_and_calm_fit_build_the_same_classifier(store, tmp_path, method):
    """`calm.SAV()` / `calm.CALM()` with their defaults, `AudioClassifier(method=)` and `calm fit
    --method` on the same store: the same probabilities for new clips (the defaults used to differ:
    CALM k 0.4, SAV k 20, calm fit 0.25)."""
    from calm.cli import main
    from calm.store import load_features

    folder, fake, queries = store
    X, y, meta = load_features(folder)
    direct = {
        "sav": calm.SAV(),
        "calm-global": calm.CALM(weighting="global"),
        "calm": calm.CALM(),
        "linear-probe": calm.LinearProbe(),
    }[method]
    direct.fit(np.asarray(X, dtype=np.float32), y)
    Xq = fake.extract([fake.load_input(p) for p in queries])
    expected = direct.predict_proba(Xq)
    out = tmp_path / "fit.safetensors"
    result = CliRunner().invoke(main, ["fit", str(folder), "--method", method, "--out", str(out)])
    assert result.exit_code == 0, result.output
    np.testing.assert_allclose(calm.load(out).predict_proba(Xq), expected, rtol=0, atol=1e-6)
    audio = AudioClassifier("npy-test", method, cache=folder).fit(list(meta["path"]), list(y))
    np.testing.assert_allclose(audio.predict_proba(queries), expected, rtol=0, atol=1e-6)
    assert list(audio.predict(queries)) == list(direct.predict(Xq))


def test_run_evaluation_predicts_like_the_defaults_fitted_on_its_support_set(store, tmp_path):
    """predictions.jsonl of one episode = `calm.SAV()` / `calm.CALM()` fitted on that episode's support
    set with their defaults (EvalConfig's defaults are theirs)."""
    from calm.store import load_features

    folder, _, _ = store
    config = EvalConfig(
        out=tmp_path / "run", features=folder, shots=[2], seeds=[3], methods=["sav", "calm-global", "calm"]
    )
    result = run_evaluation(config)
    command = config.command()  # what reproduces the run, in results.json and report.html
    assert result.results["config"]["command"] == command and command.startswith("calm evaluate --features")
    assert html.escape(command) in result.report_html.read_text()
    X, y, meta = load_features(folder)
    (episode,) = episodes(np.asarray(y), make_parts(meta, config.test_fold)[0], [2], [3])
    records = [json.loads(line) for line in (tmp_path / "run" / PREDICTIONS_FILE).read_text().splitlines()]
    assert {r["method"] for r in records} == {"sav", "calm-global", "calm"}
    for record in records:
        clf = {"sav": calm.SAV(), "calm-global": calm.CALM(weighting="global"), "calm": calm.CALM()}[
            record["method"]
        ]
        clf.fit(np.asarray(X[episode.support], dtype=np.float32), episode.support_y)
        assert record["query"] == [int(i) for i in episode.query]
        proba = clf.predict_proba(np.asarray(X[episode.query], dtype=np.float32))
        assert record["classes"] == list(clf.classes_)
        assert record["y_pred"] == [int(i) for i in proba.argmax(axis=1)]
        np.testing.assert_allclose(record["p_pred"], proba.max(axis=1), rtol=0, atol=5e-5)  # 4 decimals
