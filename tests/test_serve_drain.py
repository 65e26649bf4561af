"""Issue 23 item 2 (the drain) and item 1 for `calm predict`: a real `calm serve` subprocess on
127.0.0.1 serving a classifier on a tiny random AST, SIGTERM while a request is stalled in flight.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
from click.testing import CliRunner

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")

from calm.cli import main  # noqa: E402
from tests.test_audio_safety import FifoWatch, playlist  # noqa: E402
from tests.test_serve_hostile import STALLED, read_response  # noqa: E402

pytestmark = pytest.mark.slow
DRAIN = 2.0


@pytest.fixture(scope="module")
def model_file(tmp_path_factory):
    from calm.audio_classifier import AudioClassifier
    from tests.helpers.tiny_encoders import save_encoder, tiny_ast

    work = tmp_path_factory.mktemp("drain")
    directory = save_encoder(*tiny_ast(), work / "ast")
    rng = np.random.default_rng(0)
    waves = [(0.1 * rng.standard_normal(8000) * (1 + i % 2)).astype(np.float32) for i in range(6)]
    clf = AudioClassifier(str(directory), "sav", k=2).fit(waves, ["a", "b"] * 3, sample_rate=16000)
    return clf.save(work / "ast.safetensors") or work / "ast.safetensors"


def test_calm_predict_refuses_a_local_playlist(model_file, tmp_path):
    watch = FifoWatch(tmp_path / "secret.wav")
    (tmp_path / "list.m3u8").write_text(playlist(watch.path))
    out = tmp_path / "p.json"
    res = CliRunner().invoke(
        main,
        ["predict", str(model_file), str(tmp_path / "list.m3u8"), "--json", str(out), "--trust-file-model"],
    )
    assert not watch.close(), "calm predict opened the file the playlist names"
    [row] = json.loads(out.read_text())
    assert "unsupported format: a playlist" in row["error"], (res.output, row)


def test_sigterm_exits_within_the_drain_timeout_without_tracebacks(model_file, tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "calm.cli", "serve", str(model_file), "--port", str(port)]
    cmd += ["--drain-timeout", str(DRAIN), "--replicas", "1", "--trust-file-model"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    err = tmp_path / "server.err"
    with err.open("w") as errors:
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=errors, env=env)
    try:
        end = time.monotonic() + 240
        while True:
            assert proc.poll() is None and time.monotonic() < end, err.read_text()[-3000:]
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.3)
        stalled = socket.create_connection(("127.0.0.1", port), timeout=30)
        stalled.sendall(STALLED)  # its body never comes: in flight until the drain ends it
        time.sleep(0.5)
        start = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        head, body = read_response(stalled)
        code = proc.wait(DRAIN + 10)
        took = time.monotonic() - start
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    log = err.read_text()
    assert code == 0, log[-3000:]
    assert took <= DRAIN + 1.5, (took, log[-3000:])
    assert head.startswith(b"HTTP/1.1 503") and json.loads(body)["error"]["code"] == "draining"
    assert "Traceback" not in log and "CancelledError" not in log, log[-3000:]
