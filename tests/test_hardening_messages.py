"""Issue 23, item 9 (outside the HTTP service): one-line messages that name the right thing.

`--k` values that are neither a fraction nor a count, a manifest whose bad byte is on line 2, a full
disk while a figure is written, and `calm predict` printing a name that is not UTF-8.
"""

from __future__ import annotations

import errno
import os
import subprocess

import click
import numpy as np
import pytest
from click.testing import CliRunner

from calm.cli import main
from calm.commands.options import parse_k
from calm.data import DatasetError, load_dataset
from calm.data.manifest import load_manifest
from tests.test_predict import fake_models, model, queries  # noqa: F401  (fixtures)


@pytest.mark.parametrize("text", ["nan", "inf", "-inf", "1.5", "0", "0.0", "-2", "many"])
def test_k_that_is_neither_a_fraction_nor_a_count_is_refused_in_one_line(text):
    with pytest.raises(click.BadParameter) as info:
        parse_k(text)
    message = info.value.format_message()
    assert "\n" not in message and "--k" in message and "cannot convert" not in message


@pytest.mark.parametrize(
    ("text", "value"), [("0.25", 0.25), ("1.0", 1.0), ("1", 1), ("18", 18), ("18.0", 18), ("1e-1", 0.1)]
)
def test_k_as_a_fraction_or_a_count(text, value):
    got = parse_k(text)
    assert got == value and type(got) is type(value)


def test_k_nan_through_the_command_line(tmp_path):
    args = ["evaluate", "--features", str(tmp_path), "--out", str(tmp_path / "run"), "--k", "nan"]
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 2 and "'nan' is neither a fraction in (0, 1] nor a whole head count" in res.output


def test_a_latin1_byte_on_line_2_is_reported_on_line_2(tmp_path):
    manifest = tmp_path / "m.csv"
    manifest.write_bytes("path,label\ncaf\xe9.wav,coffee\n".encode("latin-1"))
    with pytest.raises(DatasetError) as info:
        load_dataset(f"csv:{manifest}")
    assert str(info.value).startswith(f"{manifest}:2: not UTF-8 text (byte 0xe9)")


def test_a_bad_byte_far_down_a_long_manifest_names_its_line(tmp_path):
    manifest = tmp_path / "m.csv"
    lines = ["path,label"] + [f"clip{i}.wav,dog" for i in range(3000)] + ["caf\xe9.wav,coffee"]
    manifest.write_bytes("\n".join(lines).encode("latin-1"))
    with pytest.raises(DatasetError, match=r"m\.csv:3002: not UTF-8 text \(byte 0xe9\)"):
        load_manifest(manifest, check_files=False)


def _figure_png(path):
    from calm.figures import confusion_matrix_png

    return confusion_matrix_png(np.eye(3) * 4, ["a", "b", "c"], path)


def _enospc(*_args, **_kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_disk_full_while_writing_a_figure_names_it_and_leaves_no_partial_file(tmp_path, monkeypatch):
    path = tmp_path / "figures" / "confusion.png"
    monkeypatch.setattr(os, "fsync", _enospc)
    with pytest.raises(OSError) as info:
        _figure_png(path)
    assert info.value.errno == errno.ENOSPC and info.value.filename == str(path)
    assert list(path.parent.iterdir()) == []  # neither the PNG nor a temporary file


def test_a_real_full_file_system_while_writing_a_figure(tmp_path):
    tiny = tmp_path / "tiny"
    tiny.mkdir()
    mount = ["mount", "-t", "tmpfs", "-o", "size=8k", "tmpfs", str(tiny)]
    if os.geteuid() != 0 or subprocess.run(mount, capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here (the injected ENOSPC case still runs)")
    try:
        with pytest.raises(OSError) as info:
            _figure_png(tiny / "confusion.png")
        assert info.value.errno == errno.ENOSPC and info.value.filename == str(tiny / "confusion.png")
        assert list(tiny.iterdir()) == []
    finally:
        subprocess.run(["umount", str(tiny)], check=True)


def test_predict_prints_a_name_that_is_not_utf8_with_backslash_escapes(tmp_path, model):  # noqa: F811
    src = queries(tmp_path)[0]
    odd = os.path.join(os.fsencode(tmp_path), b"caf\xe9.wav")
    os.link(src, odd)
    res = CliRunner().invoke(main, ["predict", str(model), os.fsdecode(odd)])
    assert res.exit_code in (0, 1), res.output
    assert "caf\\xe9.wav\t" in res.output and "udce9" not in res.output


@pytest.mark.parametrize("k", [float("nan"), float("inf"), 1.5, 0, -1, 0.0])
def test_the_classifiers_refuse_the_same_k_values(k):
    from sklearn.utils._param_validation import InvalidParameterError

    from calm import CALM

    X = np.random.default_rng(0).standard_normal((4, 3, 2)).astype(np.float32)
    with pytest.raises(InvalidParameterError, match="'k' parameter"):
        CALM(k=k).fit(X, [0, 0, 1, 1])
