"""`calm serve`'s command line: install hint without FastAPI, its options, and where they land."""

from __future__ import annotations

import sys

from click.testing import CliRunner

from calm.cli import main
from tests.test_detect import band_model, classifier, model_file  # noqa: F401  (fixtures)


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


def test_timeout_options_reach_the_server_config(model_file, monkeypatch):  # noqa: F811
    """--body/--request/--decode-timeout land in ServeConfig's *_timeout_s fields (click names them)."""
    import calm.serve.server

    seen = {}

    def capture(predictor, config, **kwargs):
        seen["config"] = config
        raise RuntimeError("captured")  # stop before calm serve ends the process

    monkeypatch.setattr(calm.serve.server, "serve", capture)
    args = ["--body-timeout", "5", "--request-timeout", "7", "--decode-timeout", "3", "--replicas", "1"]
    res = CliRunner().invoke(main, ["serve", str(model_file), *args])
    assert "RuntimeError: captured" in res.output, res.output
    config = seen["config"]
    assert (config.body_timeout_s, config.request_timeout_s, config.decode_timeout_s) == (5.0, 7.0, 3.0)
