"""`calm serve` over real HTTP on 127.0.0.1: a server subprocess on a free port, real ESC-10 clips,
the embedded whisper-tiny.en. One server for the module (the model loads once); the SIGTERM test
drains it and so runs last.
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from click.testing import CliRunner

from calm.cli import main
from tests.helpers import shared_data

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")

# the module fixture fits a model and starts the server (up to 300 s on a busy machine) in its first test
pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]
MAX_QUEUE = 6
MAX_UPLOAD_MB = 1


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, model: Path, work: Path):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.access, self.errors = work / "access.log", work / "server.err"
        cmd = [sys.executable, "-m", "calm.cli", "serve", str(model), "--port", str(self.port)]
        cmd += ["--max-queue", str(MAX_QUEUE), "--max-batch", "4", "--max-upload-mb", str(MAX_UPLOAD_MB)]
        cmd += ["--replicas", "2"]  # a batch is cut over two copies of the model
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
        with self.access.open("w") as out, self.errors.open("w") as err:
            self.proc = subprocess.Popen(cmd, stdout=out, stderr=err, env=env)

    def wait_ready(self, timeout: float = 300) -> None:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                pytest.fail(f"calm serve exited {self.proc.returncode}: {self.errors.read_text()[-2000:]}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        pytest.fail("calm serve did not become ready")

    def log_lines(self) -> list[dict]:
        return [json.loads(line) for line in self.access.read_text().splitlines() if line.strip()]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = shared_data() / "esc10"
    if not root.is_dir():
        pytest.skip(f"real ESC-10 audio not found at {root} (set CALM_TEST_DATA)")
    from tests.helpers.esc10_model import fit_esc10_model

    work = tmp_path_factory.mktemp("serve")
    model, queries = fit_esc10_model(root, work)
    server = Server(model, work)
    try:
        # what `calm predict` says about the same files (computed while the server loads)
        res = CliRunner().invoke(
            main, ["predict", str(model), *map(str, queries), "--json", str(work / "p.json")]
        )
        assert res.exit_code == 0, res.output
        expected = {Path(r["path"]).name: r for r in json.loads((work / "p.json").read_text())}
        server.wait_ready()
        yield server, queries, expected
    finally:
        server.stop()


def post_audio(url: str, path: Path, **kw) -> httpx.Response:
    return httpx.post(
        url + "/predict", content=path.read_bytes(), headers={"Content-Type": "audio/ogg"}, **kw
    )


def assert_matches(body: dict, expected: dict) -> None:
    assert body["label"] == expected["label"]
    assert abs(body["probability"] - expected["probability"]) <= 1e-6


def test_predictions_equal_calm_predict(served):
    server, queries, expected = served
    for i, q in enumerate(queries):
        if i % 2:
            r = post_audio(server.url, q, params={"top_k": 3}, timeout=120)
        else:
            r = httpx.post(server.url + "/predict", files={"file": (q.name, q.read_bytes())}, timeout=120)
        assert r.status_code == 200, r.text
        body = r.json()
        assert_matches(body, expected[q.name])
        assert body["model"] == "whisper-tiny.en" and abs(body["duration"] - 5.0) < 0.01
        assert body["top_k"][0] == {"label": body["label"], "probability": body["probability"]}
        assert len(body["top_k"]) == (3 if i % 2 else 1)
        if i % 2:
            assert abs(sum(t["probability"] for t in body["top_k"]) - 1) < 1e-5
    files = [("files", (q.name, q.read_bytes())) for q in queries]
    r = httpx.post(server.url + "/predict/batch", files=files, timeout=120)
    assert r.status_code == 200, r.text
    results = r.json()["results"]
    assert [x["filename"] for x in results] == [q.name for q in queries]
    for x in results:
        assert_matches(x, expected[x["filename"]])


def test_info_health_and_openapi(served):
    from tests.helpers.esc10_model import CLASSES

    server, _, _ = served
    info = httpx.get(server.url + "/info").json()
    assert info["classes"] == sorted(CLASSES)
    assert info["model"] == "whisper-tiny.en" and info["heads"] == "all" and info["version"]
    assert info["limits"]["replicas"] == 2 and info["limits"]["max_batch"] == 4
    assert httpx.get(server.url + "/health").json()["status"] == "ready"
    spec = httpx.get(server.url + "/openapi.json").json()
    assert {"/predict", "/predict/batch", "/health", "/info"} <= set(spec["paths"])
    assert httpx.get(server.url + "/docs").status_code == 200


def short_and_silent(work: Path, clip: Path) -> tuple[bytes, bytes]:
    x, sr = sf.read(clip, dtype="float32")
    short, silent = work / "short.wav", work / "silent.wav"
    sf.write(short, x[: int(0.01 * sr)], sr)
    sf.write(silent, np.zeros(sr, np.float32), sr)
    return short.read_bytes(), silent.read_bytes()


def raw_request(port: int, headers: dict[str, str], body: bytes, *, close_early: bool = False):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    conn.putrequest("POST", "/predict")
    for k, v in headers.items():
        conn.putheader(k, v)
    conn.endheaders()
    conn.send(body)
    if close_early:
        conn.close()
        return None
    r = conn.getresponse()
    out = r.status, json.loads(r.read())
    conn.close()
    return out


def test_bad_inputs_get_their_4xx_and_the_next_request_succeeds(served, tmp_path):
    server, queries, expected = served
    short, silent = short_and_silent(tmp_path, queries[0])
    rng = np.random.default_rng(0)
    ogg = {"Content-Type": "audio/ogg"}
    cases = {
        "random bytes": lambda: httpx.post(server.url + "/predict", content=rng.bytes(5000), headers=ogg),
        "empty body": lambda: httpx.post(server.url + "/predict", content=b"", headers=ogg),
        "0.01 s clip": lambda: httpx.post(server.url + "/predict", content=short, headers=ogg),
        "silent clip": lambda: httpx.post(server.url + "/predict", content=silent, headers=ogg),
        "text part": lambda: httpx.post(
            server.url + "/predict", files={"file": ("notes.txt", b"hello", "text/plain")}
        ),
        "no file part": lambda: httpx.post(
            server.url + "/predict",
            content=b'--XyZ\r\nContent-Disposition: form-data; name="comment"\r\n\r\nhello\r\n--XyZ--\r\n',
            headers={"Content-Type": "multipart/form-data; boundary=XyZ"},
        ),
        "wrong type": lambda: httpx.post(
            server.url + "/predict",
            content=queries[0].read_bytes(),
            headers={"Content-Type": "application/json"},
        ),
        "over the limit": lambda: httpx.post(
            server.url + "/predict", content=iter([b"\0" * 65536] * (16 * MAX_UPLOAD_MB + 1)), headers=ogg
        ),
        "top_k=0": lambda: post_audio(server.url, queries[0], params={"top_k": 0}),
        "unknown path": lambda: httpx.get(server.url + "/nope"),
    }
    wanted = {
        "random bytes": (422, "invalid_audio", "unreadable"),
        "empty body": (422, "empty_body", "empty"),
        "0.01 s clip": (422, "invalid_audio", "too short"),
        "silent clip": (422, "invalid_audio", "silent"),
        "text part": (422, "invalid_audio", "notes.txt"),
        "no file part": (422, "no_file", "no file part"),
        "wrong type": (415, "unsupported_media_type", "application/json"),
        "over the limit": (413, "payload_too_large", "limit"),
        "top_k=0": (422, "invalid_parameter", "top_k"),
        "unknown path": (404, "not_found", ""),
    }
    good = queries[1]
    for name, send in cases.items():
        r = send()
        status, code, words = wanted[name]
        assert r.status_code == status, (name, r.text)
        err = r.json()["error"]
        assert err["code"] == code and err["status"] == status and words in err["message"], (name, err)
        ok = post_audio(server.url, good, timeout=120)
        assert ok.status_code == 200, (name, ok.text)
        assert_matches(ok.json(), expected[good.name])
    # a huge declared length is refused before any of it is read
    status, body = raw_request(
        server.port, {"Content-Type": "audio/ogg", "Content-Length": str(10**12)}, b"x"
    )
    assert status == 413 and body["error"]["code"] == "payload_too_large"
    # a client that goes away mid-upload costs nothing; the next request is served
    raw_request(
        server.port,
        {"Content-Type": "audio/ogg", "Content-Length": "500000"},
        b"OggS" * 100,
        close_early=True,
    )
    ok = post_audio(server.url, good, timeout=120)
    assert ok.status_code == 200 and ok.json()["label"] == expected[good.name]["label"]
    end = time.monotonic() + 30
    while not any(x["status"] == 499 for x in server.log_lines()) and time.monotonic() < end:
        time.sleep(0.2)
    gone = [x for x in server.log_lines() if x["status"] == 499]
    assert gone and gone[0]["error"] == "client_disconnected" and gone[0]["batch_size"] is None
    # a batch with a bad file: that file gets its error, the others their labels
    files = [("files", ("a.ogg", good.read_bytes())), ("files", ("b.ogg", rng.bytes(3000)))]
    results = httpx.post(server.url + "/predict/batch", files=files, timeout=120).json()["results"]
    assert_matches(results[0], expected[good.name])
    assert results[1]["error"]["code"] == "invalid_audio" and "b.ogg" in results[1]["error"]["message"]


def test_burst_over_max_queue_gets_503_never_500(served):
    server, queries, expected = served
    n = 4 * MAX_QUEUE
    with ThreadPoolExecutor(n) as pool:
        responses = list(
            pool.map(lambda i: post_audio(server.url, queries[i % len(queries)], timeout=300), range(n))
        )
    codes = [r.status_code for r in responses]
    assert 503 in codes and 200 in codes and set(codes) <= {200, 503}, codes
    for i, r in enumerate(responses):
        if r.status_code == 200:
            assert_matches(r.json(), expected[queries[i % len(queries)].name])
        else:
            assert r.json()["error"]["code"] == "queue_full" and int(r.headers["Retry-After"]) >= 1
    lines = server.log_lines()
    assert all({"status", "duration_ms", "batch_size", "method", "path"} <= set(x) for x in lines)
    assert max(x["batch_size"] or 0 for x in lines if x["status"] == 200) > 1  # dynamic batching happened


def test_sigterm_during_a_burst_completes_in_flight_requests_and_exits_0(served):
    server, queries, expected = served
    n = MAX_QUEUE - 1
    with ThreadPoolExecutor(n) as pool:
        futures = [
            pool.submit(post_audio, server.url, queries[i % len(queries)], timeout=300) for i in range(n)
        ]
        end = time.monotonic() + 120
        while httpx.get(server.url + "/health").json()["queued"] < n and time.monotonic() < end:
            if any(f.done() for f in futures):
                break
            time.sleep(0.05)
        server.proc.send_signal(signal.SIGTERM)
        responses = [f.result() for f in futures]
    assert server.proc.wait(120) == 0, server.errors.read_text()[-2000:]
    for i, r in enumerate(responses):
        assert r.status_code == 200, r.text
        assert_matches(r.json(), expected[queries[i % len(queries)].name])
    assert "drained" in server.errors.read_text()
