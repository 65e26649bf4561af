"""Issue 23 item 8: a classifier file decides which model `calm predict` / `calm serve` load only when
that is a registered model; a hub id or a local directory it names must be confirmed by the user
(`--model NAME` or `--trust-file-model`), and nothing is loaded before that."""

from __future__ import annotations

import numpy as np
import pytest
from click.testing import CliRunner

from calm.classifiers import CALM
from calm.cli import main
from calm.inference import UntrustedModelError, load_predictor


@pytest.fixture
def file_naming(tmp_path):
    """A classifier file whose metadata names `model` (a directory that does not exist)."""

    def make(model: str):
        rng = np.random.default_rng(0)
        X = rng.normal(size=(6, 2, 4)).astype(np.float32)
        path = tmp_path / "clf.safetensors"
        CALM(k=1).fit(X, ["a", "b"] * 3).save(path, metadata={"model": model, "heads": "all"})
        return path

    return make


@pytest.fixture
def loads(monkeypatch):
    """The models `load_extractor` was asked for (it then fails as a missing checkpoint would)."""
    asked: list[str] = []

    def fake(spec, **_):
        asked.append(spec.model_id)
        raise OSError(f"{spec.model_id}: no such checkpoint")

    monkeypatch.setattr("calm.models.load_extractor", fake)
    return asked


def test_a_directory_named_by_the_file_is_refused_before_anything_loads(file_naming, loads, tmp_path):
    path = file_naming(str(tmp_path / "some-checkpoint"))
    with pytest.raises(UntrustedModelError, match="not a registered model.*--model .*some-checkpoint"):
        load_predictor(path)
    assert loads == []


@pytest.mark.parametrize("confirm", ["model", "trust"])
def test_confirming_the_model_lets_it_load(file_naming, loads, tmp_path, confirm):
    target = str(tmp_path / "some-checkpoint")
    path = file_naming(target)
    kwargs = {"model": target} if confirm == "model" else {"trust_file_model": True}
    with pytest.raises(OSError, match="no such checkpoint"):
        load_predictor(path, **kwargs)
    assert loads == [target]


def test_a_registered_model_needs_no_confirmation(file_naming, loads):
    with pytest.raises(OSError, match="no such checkpoint"):
        load_predictor(file_naming("whisper-tiny.en"))
    assert loads == ["whisper-tiny.en"]


@pytest.mark.parametrize("command", ["predict", "detect", "serve"])
def test_the_commands_refuse_in_one_line_and_name_the_flags(file_naming, loads, tmp_path, command):
    path = file_naming("someone/else-model")
    args = [command, str(path)] + ([str(tmp_path / "x.wav")] if command != "serve" else [])
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 1 and loads == []
    [line] = [ln for ln in res.output.splitlines() if ln.startswith("calm: error:")]
    assert "someone/else-model" in line and "--model" in line and "--trust-file-model" in line


@pytest.mark.parametrize("command", ["predict", "detect"])
def test_the_flag_named_in_the_message_exists_and_confirms(file_naming, loads, tmp_path, command):
    path = file_naming("someone/else-model")
    res = CliRunner().invoke(main, [command, str(path), str(tmp_path / "x.wav"), "--trust-file-model"])
    assert res.exit_code == 1 and loads == ["someone/else-model"], res.output  # then the load itself fails
