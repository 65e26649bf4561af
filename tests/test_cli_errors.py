"""Issue 9, item 8: every failure of a command is one line, ``calm: error: <what and which file>``,
with a non-zero exit status; ``--debug`` / ``CALM_DEBUG=1`` adds the traceback; click's usage errors
stay as they are. Each case runs through the real CLI (CliRunner in-process, or a subprocess).

Read-only stores and outputs use a read-only bind mount when this process may mount (root in a
container), else ``chmod`` (which root ignores: those cases then skip); a full disk is a 16 KiB
tmpfs when mounting works, and in every case an ENOSPC injected into ``os.fsync`` with the same
error chained twice behind it, as a failing write followed by a failing cleanup raises it.
"""

from __future__ import annotations

import contextlib
import errno
import os
import subprocess
import sys
import uuid
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

import calm
from calm.cli import main
from calm.models import MODELS, register_model
from tests.test_cli_eval import FREQS, tone


@pytest.fixture(autouse=True)
def fake_model():
    register_model("fake-tones", None, "tests.test_cli_eval:load_tone_extractor")
    yield
    MODELS.pop("fake-tones", None)


def invoke(*args: str, env: dict | None = None):
    return CliRunner().invoke(main, [str(a) for a in args], env=env)


def one_error_line(res, *needles: str) -> str:
    """The single ``calm: error:`` line of a failed run, checked to contain each of ``needles``."""
    assert res.exit_code not in (0, 2), res.output
    lines = [ln for ln in res.output.splitlines() if ln.startswith("calm: error: ")]
    assert len(lines) == 1, res.output
    assert "Traceback" not in res.output, res.output
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def make_data(root: Path, classes=tuple(FREQS), n: int = 6) -> Path:
    for c, name in enumerate(classes):
        for i in range(n):
            tone(root / name / f"{i}.wav", FREQS.get(name, 500.0), 10 * c + i)
    return root


def extract(data: Path, store: Path, *extra: str):
    return invoke(
        "extract",
        "--model",
        "fake-tones",
        "--data",
        f"folder:{data}",
        "--out",
        store,
        "--no-progress",
        *extra,
    )


@pytest.fixture
def store(tmp_path) -> Path:
    out = tmp_path / "store"
    res = extract(make_data(tmp_path / "data"), out)
    assert res.exit_code == 0, res.output
    return out


@pytest.fixture
def model_file(tmp_path, store) -> Path:
    path = tmp_path / "m.safetensors"
    res = invoke("fit", store, "--out", path)
    assert res.exit_code == 0, res.output
    return path


def _mount(*args: str) -> bool:
    if sys.platform != "linux" or os.geteuid() != 0:
        return False
    return subprocess.run(["mount", *args], capture_output=True).returncode == 0


@contextlib.contextmanager
def read_only(path: Path):
    """``path`` made read-only for this process: a read-only bind mount, or chmod when not root."""
    if _mount("-o", "bind,ro", str(path), str(path)):
        try:
            yield
        finally:
            subprocess.run(["umount", str(path)], check=True)
        return
    if os.geteuid() == 0:
        pytest.skip("running as root without mount: permission bits cannot make a folder read-only")
    modes = {p: p.stat().st_mode for p in [path, *path.rglob("*")]}
    for p in modes:
        p.chmod(0o555 if p.is_dir() else 0o444)
    try:
        yield
    finally:
        for p, mode in modes.items():
            p.chmod(mode)


# -- the cases of issue 9, item 8 ---------------------------------------------------------------


@pytest.mark.slow  # `calm evaluate` imports the evaluation stack
def test_fit_and_evaluate_on_a_one_class_store(tmp_path):
    store = tmp_path / "one"
    assert extract(make_data(tmp_path / "data", classes=("low",)), store).exit_code == 0
    one_error_line(invoke("fit", store, "--out", tmp_path / "m.safetensors"), str(store), "two classes")
    res = invoke("evaluate", "--features", store, "--out", tmp_path / "run", "--no-progress", "--shots", "1")
    one_error_line(res, str(store), "at least two")
    assert not (tmp_path / "m.safetensors").exists() and not (tmp_path / "run" / "results.json").exists()


def test_a_latin1_manifest(tmp_path):
    manifest = tmp_path / "m.csv"
    manifest.write_bytes("path,label\ncaf\xe9.wav,coffee\n".encode("latin-1"))
    res = invoke("extract", "--model", "fake-tones", "--data", f"csv:{manifest}", "--out", tmp_path / "s")
    one_error_line(res, str(manifest), "not UTF-8", "0xe9")


def test_a_csv_field_over_the_limit(tmp_path):
    manifest = tmp_path / "m.csv"
    manifest.write_text("path,label\n" + "a" * 131_073 + ".wav,x\n")
    res = invoke("extract", "--model", "fake-tones", "--data", f"csv:{manifest}", "--out", tmp_path / "s")
    one_error_line(res, f"{manifest}:2", "field larger than field limit (131072)")


def _enospc_chained_twice(*_args, **_kwargs):
    first = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    try:
        try:
            raise first
        except OSError:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)) from None
    except OSError as second:
        second.__context__ = first
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)) from second


def test_disk_full_chained_twice_while_saving_a_model(tmp_path, store, monkeypatch):
    out = tmp_path / "m.safetensors"
    monkeypatch.setattr(os, "fsync", _enospc_chained_twice)
    one_error_line(invoke("fit", store, "--out", out), "No space left on device", str(out))
    assert not out.exists() and not list(tmp_path.glob(".m.safetensors.*"))


def test_disk_full_chained_twice_while_extracting(tmp_path, store, monkeypatch):
    before = calm.load_features(store)[0][:]
    make_data(tmp_path / "data", classes=("extra",), n=3)
    monkeypatch.setattr(os, "fsync", _enospc_chained_twice)
    one_error_line(extract(tmp_path / "data", store), "No space left on device", str(store))
    monkeypatch.undo()
    np.testing.assert_array_equal(calm.load_features(store)[0][:], before)  # finished work kept
    assert extract(tmp_path / "data", store).exit_code == 0  # and the run resumes
    assert len(calm.load_features(store)[1]) == 21


def test_disk_full_on_a_real_small_file_system(tmp_path):
    tiny = tmp_path / "tiny"
    tiny.mkdir()
    if not _mount("-t", "tmpfs", "-o", "size=16k", "tmpfs", str(tiny)):
        pytest.skip("cannot mount a tmpfs here (the injected ENOSPC cases above still run)")
    try:
        res = extract(make_data(tmp_path / "data"), tiny / "s", "--batch-size", "2")
        one_error_line(res, "No space left on device", str(tiny / "s"))
    finally:
        subprocess.run(["umount", str(tiny)], check=True)


def test_resume_on_a_read_only_store(tmp_path, store):
    make_data(tmp_path / "data", classes=("extra",), n=3)
    with read_only(store):
        one_error_line(extract(tmp_path / "data", store), str(store))


def test_out_on_a_read_only_file_system(tmp_path, store):
    ro = tmp_path / "ro"
    ro.mkdir()
    with read_only(ro):
        one_error_line(invoke("fit", store, "--out", ro / "m.safetensors"), str(ro))
        res = invoke("evaluate", "--features", store, "--out", ro / "run", "--no-progress", "--shots", "1")
        one_error_line(res, str(ro / "run"))


def _bad_model_files(tmp_path: Path, good: Path) -> dict[str, Path]:
    raw = good.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    files = {
        "empty": b"",
        "junk": b"not a model at all",
        "truncated": raw[: len(raw) // 2],
        "flipped": raw[:-3] + bytes([raw[-3] ^ 0xFF]) + raw[-2:],
        "huge header": (2**40).to_bytes(8, "little") + raw[8:],
        "deep json": (200_002).to_bytes(8, "little") + b"[" * 100_001 + b"]" * 100_001,
        "not utf-8 header": raw[:8] + b"\xff" + raw[9:],
        "appended": raw + b"\0" * 64,
        "wrong header length": (n - 1).to_bytes(8, "little") + raw[8:],
    }
    out = {}
    for name, blob in files.items():
        out[name] = tmp_path / f"{name.replace(' ', '_')}.safetensors"
        out[name].write_bytes(blob)
    return out


def test_any_bad_model_file_given_to_predict(tmp_path, model_file):
    wav = tone(tmp_path / "q.wav", 300.0, 1)
    for name, path in _bad_model_files(tmp_path, model_file).items():
        line = one_error_line(invoke("predict", path, wav), str(path))
        assert len(line) < 400, (name, line)
    res = invoke("predict", model_file, wav)
    assert res.exit_code == 0, res.output


# -- the handler itself -------------------------------------------------------------------------


def test_debug_flag_and_env_show_the_traceback(tmp_path, model_file):
    wav = tone(tmp_path / "q.wav", 300.0, 1)
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"junk")
    one_error_line(invoke("predict", junk, wav), str(junk))
    for args, env in ((["--debug"], None), ([], {"CALM_DEBUG": "1"})):
        res = invoke(*args, "predict", junk, wav, env=env)
        assert res.exit_code == 1 and "Traceback" in res.output and "ModelFileError" in res.output
        assert res.output.strip().splitlines()[-1].startswith(f"calm: error: {junk}")


@pytest.mark.slow  # a fresh interpreter importing torch: seconds
def test_the_entry_point_in_its_own_process_prints_one_line(tmp_path):
    wav = tone(tmp_path / "q.wav", 300.0, 1)
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"junk")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(calm.__file__).parents[1]), os.getcwd()])}
    cmd = [sys.executable, "-m", "calm.cli", "predict", str(junk), str(wav)]
    quiet = subprocess.run(cmd, capture_output=True, text=True, env=env)
    assert quiet.returncode == 1 and "Traceback" not in quiet.stderr
    assert quiet.stderr.strip().splitlines()[-1].startswith(f"calm: error: {junk}")


INTERNAL = "calm: internal error (a bug, please report it): "


def internal_error_line(res, *needles: str) -> str:
    """The single internal-error line of a run stopped by a bug, exit status 3, no traceback."""
    assert res.exit_code == 3, res.output
    lines = [ln for ln in res.output.splitlines() if ln.startswith(INTERNAL)]
    assert len(lines) == 1 and "calm: error:" not in res.output and "Traceback" not in res.output, res.output
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


@pytest.mark.parametrize("error", [ZeroDivisionError("division by zero"), ValueError("boom\nsecond line")])
def test_a_bug_says_so_in_one_line_with_exit_status_3(tmp_path, store, monkeypatch, error):
    """Anything but a CalmError, an OSError or a parameter check is a bug, even a bare ValueError."""
    import calm.store

    def boom(*_a, **_k):
        raise error

    monkeypatch.setattr(calm.store, "load_features", boom)
    what = f"{type(error).__name__}: {str(error).replace(chr(10), ' | ')}"
    line = internal_error_line(invoke("fit", store, "--out", tmp_path / "m.safetensors"), what)
    assert line.endswith("; rerun with --debug (or CALM_DEBUG=1) for the traceback")
    res = invoke("--debug", "fit", store, "--out", tmp_path / "m.safetensors")
    assert res.exit_code == 3 and isinstance(res.exception, SystemExit)
    assert "Traceback" in res.output and res.output.strip().splitlines()[-1].startswith(INTERNAL)


def test_scikit_learn_parameter_checks_are_user_errors(tmp_path, store, monkeypatch):
    from sklearn.utils._param_validation import InvalidParameterError

    import calm.store

    def refuse(*_a, **_k):
        raise InvalidParameterError("The 'k' parameter of SAV must be a float in (0.0, 1.0]. Got 7.5.")

    monkeypatch.setattr(calm.store, "load_features", refuse)
    res = invoke("fit", store, "--out", tmp_path / "m.safetensors")
    assert res.exit_code == 1
    one_error_line(res, "The 'k' parameter of SAV must be")


def _refuse(error: Exception):
    def refuse(*_a, **_k):
        raise error

    return refuse


# command -> (its arguments, the library function it calls, a CalmError that function may raise)
USER_ERRORS = {
    "extract": (
        lambda tmp: ["extract", "--model", "fake-tones", "--data", f"folder:{tmp}", "--out", tmp / "s"],
        "calm.data:load_dataset",
        lambda tmp: calm.data.DatasetError(f"{tmp}/labels.csv:3: no such class"),
    ),
    "fit": (
        lambda tmp: ["fit", tmp, "--out", tmp / "m.safetensors"],
        "calm.store:load_features",
        lambda tmp: calm.store.StoreError(f"{tmp}/index.jsonl: not a feature store"),
    ),
    "evaluate": (
        lambda tmp: ["evaluate", "--features", tmp, "--out", tmp / "run", "--no-progress"],
        "calm.evaluate:run_evaluation",
        lambda tmp: calm.evaluate.ProtocolError(f"{tmp}: a test class without support clips"),
    ),
    "predict": (
        lambda tmp: ["predict", tmp / "m.safetensors", tmp / "q.wav"],
        "calm.inference:load_predictor",
        lambda tmp: calm.serialization.ModelFileError(f"{tmp}/m.safetensors: not a classifier"),
    ),
    "serve": (
        lambda tmp: ["serve", tmp / "m.safetensors", "--port", "0"],
        "calm.inference:load_predictor",
        lambda tmp: calm.serialization.ModelFileError(f"{tmp}/m.safetensors: truncated header"),
    ),
    "verify": (
        lambda tmp: ["verify", tmp],
        "calm.store:verify_store",
        lambda tmp: calm.store.StoreError(f"{tmp}: no feature store here"),
    ),
}


@pytest.mark.parametrize("command", sorted(USER_ERRORS))
def test_each_command_prints_a_user_error_in_one_line(tmp_path, monkeypatch, command):
    import importlib

    args, target, error = USER_ERRORS[command]
    (tmp_path / "m.safetensors").write_bytes(b"x")
    tone(tmp_path / "q.wav", 300.0, 1)
    module, name = target.split(":")
    monkeypatch.setattr(importlib.import_module(module), name, _refuse(error(tmp_path)))
    res = invoke(*args(tmp_path))
    assert res.exit_code == 1, res.output
    one_error_line(res, str(tmp_path), str(error(tmp_path)).partition(": ")[2])


def test_usage_errors_stay_as_click_prints_them(tmp_path):
    res = invoke("fit")
    assert res.exit_code == 2 and "Usage:" in res.output and "calm: error" not in res.output
    res = invoke("predict", tmp_path / f"absent-{uuid.uuid4().hex}.safetensors", "x.wav")
    assert res.exit_code == 2 and "does not exist" in res.output


def test_fit_on_a_store_without_labels(tmp_path):
    """A store whose clips carry no labels (e.g. an `AudioClassifier` cache) is refused in one line."""
    from calm.data.base import Clip
    from calm.store import extract_to_store

    data = make_data(tmp_path / "data", n=2)
    clips = [Clip(path=p, labels=()) for p in sorted(data.rglob("*.wav"))]
    store = tmp_path / "unlabelled"
    extract_to_store(calm.load_extractor("fake-tones"), clips, store, progress=False, allow_failures=False)
    res = invoke("fit", store, "--out", tmp_path / "m.safetensors")
    one_error_line(res, str(store), f"{len(clips)} of {len(clips)} clips have no label")
    assert not (tmp_path / "m.safetensors").exists()
