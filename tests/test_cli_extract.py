import shutil

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from calm.cli import main
from calm.commands import extract as extract_cmd
from calm.commands.options import parse_layers, parse_options
from calm.store import list_keys, load_features
from tests.test_store import FakeExtractor, make_clips


@pytest.fixture
def fake_model(monkeypatch):
    calls = []

    def load(spec):  # the command hands over one `LoadSpec`
        calls.append((spec.label, spec.load_kwargs()))
        return FakeExtractor(prompt=spec.prompt or "")

    monkeypatch.setattr(extract_cmd, "_load_extractor", load)
    return calls


def test_extract_end_to_end_with_a_fake_model(tmp_path, fake_model):
    root = tmp_path / "audio"
    make_clips(root, n=7)
    out = tmp_path / "store"
    runner = CliRunner()
    args = ["extract", "--model", "fake", "--data", f"folder:{root}", "--out", str(out), "--batch-size", "2"]
    result = runner.invoke(
        main,
        [
            *args,
            "--no-progress",
            "--prompt",
            "hi",
            "--layers",
            "0-1",
            "-o",
            "encoder_length=clip",
            "--attn-implementation",
            "eager",
            "--model-dtype",
            "bf16",
            "--device",
            "cpu",
        ],
    )
    assert result.exit_code == 0, result.output
    assert "7 stored, 0 already stored, 0 failed of 7 clips" in result.output
    model, kwargs = fake_model[0]
    assert model == "fake" and kwargs["prompt"] == "hi" and kwargs["layers"] == [0, 1]
    assert kwargs["encoder_length"] == "clip" and kwargs["heads"] == "all"
    assert (
        kwargs["attn_implementation"] == "eager"
        and kwargs["dtype"] is torch.bfloat16
        and kwargs["device"] == "cpu"
    )
    X, y, meta = load_features(out)
    assert X.shape == (7, 6, 4) and sorted(set(y)) == ["dog", "rain", "siren"]

    again = runner.invoke(main, [*args, "--no-progress", "--prompt", "hi", "--compact"])
    assert again.exit_code == 0 and "0 stored, 7 already stored" in again.output
    assert "compacted 4 shards into 1" in again.output
    np.testing.assert_array_equal(np.asarray(load_features(out)[0]), np.asarray(X))

    # a clip that cannot be read: listed, exit status 1 unless --allow-failures
    (root / "dog" / "broken.wav").write_bytes(b"RIFF nonsense")
    failed = runner.invoke(main, [*args, "--no-progress", "--prompt", "hi"])
    assert failed.exit_code == 1
    assert "1 failed" in failed.output and "broken.wav: unreadable" in failed.output
    allowed = runner.invoke(main, [*args, "--no-progress", "--prompt", "hi", "--allow-failures"])
    assert allowed.exit_code == 0 and "broken.wav" in allowed.output

    # another prompt is another key: nothing reused
    other = runner.invoke(main, [*args, "--no-progress", "--prompt", "another", "--allow-failures"])
    assert "7 stored, 0 already stored" in other.output
    assert len(list_keys(out)) == 2


def test_extract_reports_bad_dataset_and_model(tmp_path, monkeypatch):
    runner = CliRunner()
    result = runner.invoke(
        main, ["extract", "--data", f"folder:{tmp_path / 'none'}", "--out", str(tmp_path / "s")]
    )
    assert result.exit_code == 1 and "calm: error:" in result.output
    make_clips(tmp_path / "audio", n=3)

    def broken(model, **kwargs):  # what load_extractor raises for an unknown name (a CalmError)
        from calm.models.base import ExtractorError

        raise ExtractorError("no such model")

    monkeypatch.setattr(extract_cmd, "_load_extractor", broken)
    result = runner.invoke(
        main,
        [
            "extract",
            "--model",
            "nope",
            "--data",
            f"folder:{tmp_path / 'audio'}",
            "--out",
            str(tmp_path / "s"),
        ],
    )
    assert result.exit_code == 1 and "cannot load model 'nope'" in result.output


def test_option_parsing():
    assert parse_layers(None) is None and parse_layers("4") == 4
    assert parse_layers("0,2,5-7") == [0, 2, 5, 6, 7]
    assert parse_options(("a=1", "b=clip", "c=true", "d=1.5")) == {"a": 1, "b": "clip", "c": True, "d": 1.5}
    import click

    with pytest.raises(click.BadParameter):
        parse_layers("x-y")
    with pytest.raises(click.BadParameter):
        parse_options(("novalue",))


@pytest.mark.slow
def test_extract_with_real_whisper(tmp_path, esc10_root):
    pytest.importorskip("calm.models.whisper")
    root = tmp_path / "audio"
    for cls in sorted(p for p in esc10_root.iterdir() if p.is_dir())[:2]:
        (root / cls.name).mkdir(parents=True)
        for f in sorted(cls.glob("*.ogg"))[:2]:
            shutil.copy(f, root / cls.name / f.name)
    out = tmp_path / "store"
    args = ["extract", "--data", f"folder:{root}", "--out", str(out), "--batch-size", "2", "--no-progress"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    X, y, meta = load_features(out)
    assert X.shape[0] == 4 and X.shape[1] == len(meta.attrs["head_names"]) and X.shape[2] == 64
    assert np.isfinite(np.asarray(X)).all()
    assert meta.attrs["key"]["model"] == "whisper-tiny.en"
    assert len(set(y)) == 2


def test_ctrl_c_keeps_finished_batches(tmp_path, monkeypatch):
    make_clips(tmp_path / "audio", n=6)

    class Interrupted(FakeExtractor):
        def extract(self, inputs):
            if self.calls >= 1:
                raise KeyboardInterrupt
            return super().extract(inputs)

    monkeypatch.setattr(extract_cmd, "_load_extractor", lambda model, **kw: Interrupted())
    args = [
        "extract",
        "--data",
        f"folder:{tmp_path / 'audio'}",
        "--out",
        str(tmp_path / "s"),
        "--batch-size",
        "2",
    ]
    result = CliRunner().invoke(main, [*args, "--no-progress"])
    assert result.exit_code == 130 and "run the same command again" in result.output
    assert len(load_features(tmp_path / "s")[0]) == 2


def test_progress_bar_is_drawn_by_the_cli(tmp_path, fake_model):
    root = tmp_path / "audio"
    make_clips(root, n=5)
    (root / "dog" / "broken.wav").write_bytes(b"not audio" * 20)
    args = ["extract", "--data", f"folder:{root}", "--out", str(tmp_path / "store"), "--batch-size", "2"]
    result = CliRunner().invoke(main, [*args, "--progress", "--allow-failures"])
    assert result.exit_code == 0, result.output
    assert "extracting (1 failed)" in result.stderr and "6/6" in result.stderr
    assert "clips/s" in result.stderr and "ETA" in result.stderr
    quiet = CliRunner().invoke(main, [*args, "--no-progress", "--allow-failures"])
    assert quiet.exit_code == 0 and "clips/s" not in quiet.stderr and "ETA" not in quiet.stderr
