"""calm._files: atomic writes keep the usual file mode and leave nothing behind on failure."""

import os
import stat

import pytest

from calm import _files


def test_atomic_write_gives_the_mode_open_would(tmp_path):
    umask = os.umask(0o022)
    try:
        target = tmp_path / "results.json"
        _files.atomic_write_json(target, {"a": 1})
    finally:
        os.umask(umask)
    assert target.read_text() == '{\n  "a": 1\n}\n'
    assert stat.S_IMODE(target.stat().st_mode) == 0o666 & ~umask
    assert [p.name for p in tmp_path.iterdir()] == ["results.json"]


def test_failed_write_leaves_no_temporary_file(tmp_path, monkeypatch):
    def boom(*args):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError, match="results.json"):
        _files.atomic_write_bytes(tmp_path / "results.json", b"x")
    assert list(tmp_path.iterdir()) == []
