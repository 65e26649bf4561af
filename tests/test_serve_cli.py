"""`calm serve` without its optional dependencies says how to install them."""

from __future__ import annotations

import sys

from click.testing import CliRunner

from calm.cli import main


def test_serve_without_fastapi_says_how_to_install(tmp_path, monkeypatch):
    for name in [m for m in sys.modules if m == "calm.serve" or m.startswith("calm.serve.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "fastapi", None)  # import fastapi now raises ImportError
    model = tmp_path / "m.safetensors"
    model.write_bytes(b"unused")
    res = CliRunner().invoke(main, ["serve", str(model)])
    assert res.exit_code == 1 and "pip install 'calm-audio[serve]'" in res.output
    assert "Traceback" not in res.output


def test_serve_help_lists_the_limits():
    res = CliRunner().invoke(main, ["serve", "--help"])
    assert res.exit_code == 0
    for option in (
        "--max-batch",
        "--max-wait-ms",
        "--max-queue",
        "--max-upload-mb",
        "--device",
        "--replicas",
    ):
        assert option in res.output


def test_serve_refuses_a_bad_replica_count(tmp_path):
    model = tmp_path / "m.safetensors"
    model.write_bytes(b"x")
    for bad in ("0", "two", "-1"):
        res = CliRunner().invoke(main, ["serve", str(model), "--replicas", bad])
        assert res.exit_code == 2 and "--replicas" in res.output and "Traceback" not in res.output
